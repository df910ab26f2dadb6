-- 0001_initial: the whole slot core of pgslots.
--
-- Why it is built this way:
--  * Every decision (grant, refuse, decay, expiry, queue order) is made here, under the row lock of
--    the limits involved, with the database clock. Clients only ask, wait, renew and release.
--  * Rows of `limits` are always locked in `id` order, by every function that locks more than one,
--    so multi-limit acquires and releases never deadlock. Lease and waiter rows of a limit are only
--    written by a transaction that holds that limit's row lock (renew and heartbeat excepted: they
--    touch only their own rows and never wait for a limit).
--  * A limit counts two kinds of occupied slots: `leased_slots`, the exact sum of its lease rows,
--    and `unleased_slots`, slots taken by rate limits (or set by an operator) that decay
--    continuously at `slot_decay_per_second` from `decayed_at`. Decay is computed exactly, never
--    floored, and `decayed_at` moves only when `unleased_slots` is rewritten, so refusals and edits
--    never slow decay down.
--  * Public functions pin `search_path`, so objects planted in a caller's schemas cannot hijack them.

CREATE TABLE pgslots.settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    min_lease_seconds float8 NOT NULL DEFAULT 60,
    max_lease_seconds float8 NOT NULL DEFAULT 86400,
    waiter_ttl_seconds float8 NOT NULL DEFAULT 3,
    clock_offset interval NOT NULL DEFAULT '0',
    CONSTRAINT settings_lease_bounds CHECK (
        min_lease_seconds > 0 AND max_lease_seconds >= min_lease_seconds
        AND max_lease_seconds < 'Infinity'::float8),
    CONSTRAINT settings_waiter_ttl CHECK (waiter_ttl_seconds > 0 AND waiter_ttl_seconds < 3600)
);
INSERT INTO pgslots.settings DEFAULT VALUES;
COMMENT ON TABLE pgslots.settings IS
    'One row. Lease bounds honoured by acquire and renew; waiter_ttl_seconds: how long a queued '
    'waiter keeps its place without a heartbeat; clock_offset: moves the pgslots clock (tests only).';

CREATE TABLE pgslots.limits (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL UNIQUE,
    "limit" integer NOT NULL,
    active boolean NOT NULL DEFAULT true,
    slot_decay_per_second float8 NOT NULL DEFAULT 0,
    leased_slots integer NOT NULL DEFAULT 0,
    unleased_slots float8 NOT NULL DEFAULT 0,
    decayed_at timestamptz NOT NULL,
    denied_slots bigint NOT NULL DEFAULT 0,
    avg_slot_occupancy_seconds float8 NOT NULL DEFAULT 2,
    created timestamptz NOT NULL,
    updated timestamptz NOT NULL,
    CONSTRAINT limits_name_rule CHECK (
        name <> '' AND name !~ '[/%&><]' AND char_length(name) <= 255),
    CONSTRAINT limits_limit_rule CHECK ("limit" >= 0),
    CONSTRAINT limits_decay_rule CHECK (
        slot_decay_per_second >= 0 AND slot_decay_per_second < 'Infinity'::float8),
    CONSTRAINT limits_counts_rule CHECK (
        leased_slots >= 0 AND unleased_slots >= 0 AND unleased_slots < 'Infinity'::float8)
);

-- One row per (lease, limit it occupies). All rows of a lease share id, expiry and `parts`.
CREATE TABLE pgslots.leases (
    id uuid NOT NULL,
    limit_id uuid NOT NULL,
    slots integer NOT NULL CHECK (slots > 0),
    parts smallint NOT NULL,
    fencing_token bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    host text,
    pid integer,
    application_name text,
    holder jsonb,
    PRIMARY KEY (id, limit_id)
);
CREATE INDEX leases_limit_expiry ON pgslots.leases (limit_id, expires_at);

-- Queued waiters, one row per (waiter, limit). Served in id order per limit.
CREATE TABLE pgslots.waiters (
    id bigint NOT NULL,
    limit_id uuid NOT NULL,
    slots integer NOT NULL CHECK (slots > 0),
    client_id uuid NOT NULL,
    enqueued_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (limit_id, id)
);
CREATE INDEX waiters_client ON pgslots.waiters (client_id);
CREATE INDEX waiters_ticket ON pgslots.waiters (id);

CREATE SEQUENCE pgslots.fencing_tokens AS bigint;
CREATE SEQUENCE pgslots.waiter_tickets AS bigint;

---------------------------------------------------------------------------------------------------
-- Internal helpers (not part of the public API).
---------------------------------------------------------------------------------------------------

CREATE FUNCTION pgslots._now() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    RETURN clock_timestamp() + (SELECT s.clock_offset FROM pgslots.settings s);
END
$$;

-- Unleased slots left at `at`, decaying continuously from `since`.
CREATE FUNCTION pgslots._decayed(amount float8, rate float8, since timestamptz, at timestamptz)
RETURNS float8
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
    SELECT CASE WHEN rate > 0
        THEN greatest(0::float8,
             amount - rate * greatest(0::float8,
                 pg_catalog.date_part('epoch', at - since)::float8))
        ELSE amount END
$$;

CREATE FUNCTION pgslots._list_literal(names text[]) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
    SELECT '[' || coalesce(pg_catalog.string_agg(
        '''' || pg_catalog.replace(n, '''', '\''') || '''', ', ' ORDER BY ord), '') || ']'
    FROM pg_catalog.unnest(names) WITH ORDINALITY AS u(n, ord)
$$;

CREATE FUNCTION pgslots._check_name(name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'A limit name must not be empty.'
            USING ERRCODE = 'PS001', HINT = 'Give the limit a name, e.g. ''api''.';
    END IF;
    IF name ~ '[/%&><]' THEN
        RAISE EXCEPTION 'Limit name % contains a forbidden character: names must not contain any of / %% & > <.',
            quote_literal(left(name, 80))
            USING ERRCODE = 'PS001', HINT = 'Choose a name without / % & > <.';
    END IF;
    IF char_length(name) > 255 THEN
        RAISE EXCEPTION 'Limit name ''%...'' is % characters long: names are at most 255 characters.',
            left(name, 40), char_length(name)
            USING ERRCODE = 'PS001', HINT = 'Choose a shorter name.';
    END IF;
END
$$;

CREATE FUNCTION pgslots._check_names(names text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    n text;
BEGIN
    IF names IS NULL THEN
        RAISE EXCEPTION 'names must be an array of limit names, not NULL.' USING ERRCODE = 'PS011';
    END IF;
    FOREACH n IN ARRAY names LOOP
        PERFORM pgslots._check_name(n);
    END LOOP;
    -- Keep the caller's order, drop repeats: a name given twice is one limit.
    RETURN ARRAY(SELECT u.n FROM unnest(names) WITH ORDINALITY AS u(n, ord)
                 GROUP BY u.n ORDER BY min(u.ord));
END
$$;

CREATE FUNCTION pgslots._check_limit_values("limit" integer, slot_decay_per_second float8)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    IF "limit" IS NOT NULL AND "limit" < 0 THEN
        RAISE EXCEPTION 'limit must be 0 or more, got %.', "limit"
            USING ERRCODE = 'PS002', HINT = 'Pass a whole number of slots >= 0.';
    END IF;
    IF slot_decay_per_second IS NOT NULL AND NOT (
            slot_decay_per_second >= 0 AND slot_decay_per_second < 'Infinity'::float8) THEN
        RAISE EXCEPTION 'slot_decay_per_second must be a finite number >= 0, got %.', slot_decay_per_second
            USING ERRCODE = 'PS002', HINT = 'Use 0 for no decay, or the number of slots freed per second.';
    END IF;
END
$$;

CREATE FUNCTION pgslots._check_slots(slots integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    IF slots IS NULL OR slots <= 0 THEN
        RAISE EXCEPTION 'slots must be 1 or more, got %.', coalesce(slots::text, 'NULL')
            USING ERRCODE = 'PS005', HINT = 'Ask for at least one slot.';
    END IF;
END
$$;

-- Validates a lease duration against the settings; returns it as an interval.
CREATE FUNCTION pgslots._lease_interval(lease_seconds float8) RETURNS interval
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    lo float8;
    hi float8;
BEGIN
    SELECT s.min_lease_seconds, s.max_lease_seconds INTO lo, hi FROM pgslots.settings s;
    IF lease_seconds IS NULL OR NOT (lease_seconds >= lo AND lease_seconds <= hi) THEN
        RAISE EXCEPTION 'lease_seconds must be between % and % seconds, got %.',
            lo, hi, coalesce(lease_seconds::text, 'NULL')
            USING ERRCODE = 'PS007',
                  HINT = 'Choose a lease duration within the bounds in pgslots.settings.';
    END IF;
    RETURN make_interval(secs => lease_seconds);
END
$$;

-- The queued waiters of one limit that the slots free now can serve, head first. Slots of expired
-- leases count as free: the waiter's own acquire will reclaim them.
CREATE FUNCTION pgslots._wakeable(target uuid, at timestamptz) RETURNS bigint[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    lim record;
    free float8;
    taken bigint := 0;
    w record;
    woken bigint[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgslots.waiters x WHERE x.limit_id = target) THEN
        RETURN woken;
    END IF;
    SELECT * INTO lim FROM pgslots.limits l WHERE l.id = target;
    IF NOT FOUND OR NOT lim.active THEN
        free := 'Infinity';   -- deleted or disabled: every waiter must look again
    ELSE
        free := lim."limit" - lim.leased_slots
                - pgslots._decayed(lim.unleased_slots, lim.slot_decay_per_second, lim.decayed_at, at)
                + (SELECT coalesce(sum(x.slots), 0) FROM pgslots.leases x
                   WHERE x.limit_id = target AND x.expires_at <= at);
    END IF;
    FOR w IN SELECT x.id, x.slots FROM pgslots.waiters x
             WHERE x.limit_id = target AND x.expires_at > at ORDER BY x.id LOOP
        EXIT WHEN taken + w.slots > free + 1e-9;
        taken := taken + w.slots;
        woken := woken || w.id;
        EXIT WHEN cardinality(woken) >= 400;   -- a NOTIFY payload holds about 8000 bytes
    END LOOP;
    RETURN woken;
END
$$;

-- Notifies the waiters of one limit that the slots free now can serve (payload: their tickets).
CREATE FUNCTION pgslots._wake(target uuid, at timestamptz) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    woken bigint[] := pgslots._wakeable(target, at);
BEGIN
    IF cardinality(woken) > 0 THEN
        PERFORM pg_notify('pgslots', array_to_string(woken, ','));
    END IF;
END
$$;

-- Deletes the expired lease rows of one limit (whose row lock the caller holds); returns the slots.
CREATE FUNCTION pgslots._reclaim(target uuid, at timestamptz) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    freed bigint;
BEGIN
    WITH gone AS (
        DELETE FROM pgslots.leases x WHERE x.limit_id = target AND x.expires_at <= at
        RETURNING x.slots
    )
    SELECT coalesce(sum(gone.slots), 0) INTO freed FROM gone;
    IF freed > 0 THEN
        UPDATE pgslots.limits l SET leased_slots = greatest(0, l.leased_slots - freed)
        WHERE l.id = target;
    END IF;
    RETURN freed;
END
$$;

---------------------------------------------------------------------------------------------------
-- The decision: one function behind acquire and rate_limit.
---------------------------------------------------------------------------------------------------

CREATE FUNCTION pgslots._admit(
    names text[], slots integer, lease_seconds float8, holder jsonb, strict boolean,
    ticket bigint, queue_client uuid, for_rate_limit boolean, new_lease_id uuid,
    OUT granted boolean, OUT lease_id uuid, OUT fencing_token bigint, OUT expires_at timestamptz,
    OUT retry_after float8, OUT missing text[], OUT blocked_by text[], OUT waiter bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
-- The hot path: one pass over the locked rows, no helper calls unless something is wrong.
DECLARE
    wanted text[] := names;
    cfg pgslots.settings;
    lease_for interval;
    at timestamptz;
    lim record;
    ids uuid[] := '{}';
    found_names text[] := '{}';
    no_decay text[] := '{}';
    blocked uuid[];
    occupied float8;
    ahead bigint;
    need float8;
    hint float8;
    attempt integer;
BEGIN
    IF names IS NULL OR slots IS NULL OR slots <= 0
       OR EXISTS (SELECT 1 FROM unnest(names) AS n
                  WHERE n IS NULL OR n = '' OR n ~ '[/%&><]' OR char_length(n) > 255) THEN
        wanted := pgslots._check_names(names);   -- raises the precise error
        PERFORM pgslots._check_slots(slots);
    END IF;
    IF cardinality(wanted) > 1 THEN
        wanted := pgslots._check_names(wanted);  -- drops repeats
    END IF;
    SELECT * INTO cfg FROM pgslots.settings;
    IF NOT for_rate_limit THEN
        IF lease_seconds IS NULL OR NOT (lease_seconds >= cfg.min_lease_seconds
                                         AND lease_seconds <= cfg.max_lease_seconds) THEN
            lease_for := pgslots._lease_interval(lease_seconds);   -- raises
        END IF;
        lease_for := make_interval(secs => lease_seconds);
    END IF;
    granted := false;
    waiter := ticket;
    missing := '{}';

    -- Lock the named limits in id order, the one order every locker uses, and look at each once.
    FOR lim IN SELECT l.id, l.name, l.active, l."limit", l.slot_decay_per_second
               FROM pgslots.limits l WHERE l.name = ANY (wanted) ORDER BY l.id FOR UPDATE LOOP
        found_names := found_names || lim.name;
        CONTINUE WHEN NOT lim.active;
        IF slots > lim."limit" THEN
            RAISE EXCEPTION 'Unable to acquire concurrency slots on %: slots requested is greater than the limit (% > %)',
                pgslots._list_literal(ARRAY[lim.name]), slots, lim."limit"
                USING ERRCODE = 'PS006',
                      HINT = 'Ask for fewer slots or raise the limit; this request can never succeed.';
        END IF;
        IF for_rate_limit AND lim.slot_decay_per_second <= 0 THEN
            no_decay := no_decay || lim.name;
        END IF;
        ids := ids || lim.id;
    END LOOP;
    at := clock_timestamp() + cfg.clock_offset;

    IF cardinality(found_names) < cardinality(wanted) THEN
        missing := ARRAY(SELECT n FROM unnest(wanted) AS n WHERE n <> ALL (found_names));
        IF strict THEN
            RAISE EXCEPTION 'Concurrency limits % must be created before acquiring slots',
                pgslots._list_literal(missing)
                USING ERRCODE = 'PS008', HINT = 'Create them first, e.g. with pgslots create NAME --limit N.';
        END IF;
    END IF;
    IF cardinality(no_decay) > 0 THEN
        RAISE EXCEPTION 'Only concurrency limits with slot decay can be used for rate limiting. The following limits do not have a decay configured: %',
            (SELECT string_agg(quote_literal(n), ', ') FROM unnest(no_decay) AS n)
            USING ERRCODE = 'PS009',
                  HINT = 'Give the limits a decay, e.g. pgslots update NAME --slot-decay-per-second 1.';
    END IF;
    IF cardinality(ids) = 0 THEN
        granted := true;   -- nothing active to enforce
        RETURN;
    END IF;

    -- Decide; on a refusal, reclaim expired leases of the limits that refused and decide again.
    FOR attempt IN 1..2 LOOP
        blocked := '{}';
        retry_after := 0;
        FOR lim IN SELECT l.id, l."limit", l.leased_slots, l.slot_decay_per_second,
                          l.avg_slot_occupancy_seconds,
                          greatest(0::float8, l.unleased_slots - l.slot_decay_per_second
                                   * greatest(0::float8, extract(epoch FROM at - l.decayed_at)::float8))
                              AS unleased_now
                   FROM pgslots.limits l WHERE l.id = ANY (ids) LOOP
            occupied := lim.leased_slots + lim.unleased_now;
            SELECT coalesce(sum(w.slots), 0) INTO ahead FROM pgslots.waiters w
            WHERE w.limit_id = lim.id AND w.expires_at > at AND (ticket IS NULL OR w.id < ticket);
            need := occupied + ahead + slots - lim."limit";
            IF need > 1e-9 THEN
                blocked := blocked || lim.id;
                IF lim.slot_decay_per_second > 0 AND lim.leased_slots + slots <= lim."limit" THEN
                    -- Exact: decay is continuous, and the slots of waiters ahead decay too.
                    hint := need / lim.slot_decay_per_second;
                ELSE
                    hint := least(30, greatest(0.1,
                        lim.avg_slot_occupancy_seconds * need / greatest(lim."limit", 1)));
                END IF;
                retry_after := greatest(retry_after, hint);
            END IF;
        END LOOP;
        EXIT WHEN cardinality(blocked) = 0 OR attempt = 2;
        IF (SELECT sum(pgslots._reclaim(b, at)) FROM unnest(blocked) AS b) = 0 THEN
            EXIT;
        END IF;
    END LOOP;

    IF cardinality(blocked) = 0 THEN
        granted := true;
        retry_after := NULL;
        IF for_rate_limit THEN
            UPDATE pgslots.limits l
            SET unleased_slots = greatest(0::float8, l.unleased_slots - l.slot_decay_per_second
                                 * greatest(0::float8, extract(epoch FROM at - l.decayed_at)::float8)) + slots,
                decayed_at = at
            WHERE l.id = ANY (ids);
        ELSE
            lease_id := coalesce(new_lease_id, gen_random_uuid());
            fencing_token := nextval('pgslots.fencing_tokens');
            expires_at := at + lease_for;
            INSERT INTO pgslots.leases (id, limit_id, slots, parts, fencing_token, acquired_at,
                                        expires_at, host, pid, application_name, holder)
            SELECT lease_id, i, slots, cardinality(ids), fencing_token, at, expires_at,
                   coalesce(holder ->> 'host', host(inet_client_addr()), 'local'),
                   CASE WHEN holder ->> 'pid' ~ '^[0-9]{1,9}$' THEN (holder ->> 'pid')::integer
                        ELSE pg_backend_pid() END,
                   nullif(current_setting('application_name'), ''),
                   holder
            FROM unnest(ids) AS i;
            UPDATE pgslots.limits l SET leased_slots = l.leased_slots + slots WHERE l.id = ANY (ids);
        END IF;
        IF ticket IS NOT NULL THEN
            DELETE FROM pgslots.waiters w WHERE w.id = ticket;
        END IF;
        RETURN;
    END IF;

    -- A refusal writes only pressure and a queue place; losing those in a crash costs nothing, so
    -- its commit need not wait for the WAL flush while it holds the limit's row lock.
    PERFORM set_config('synchronous_commit', 'off', true);
    blocked_by := ARRAY(SELECT l.name FROM pgslots.limits l WHERE l.id = ANY (blocked) ORDER BY l.name);
    UPDATE pgslots.limits l SET denied_slots = l.denied_slots + slots WHERE l.id = ANY (blocked);
    IF queue_client IS NOT NULL THEN
        waiter := coalesce(ticket, nextval('pgslots.waiter_tickets'));
        -- A waiter keeps its place on every limit it asked for, not just the full ones.
        INSERT INTO pgslots.waiters AS w (id, limit_id, slots, client_id, enqueued_at, expires_at)
        SELECT waiter, i, slots, queue_client, at, at + make_interval(secs => cfg.waiter_ttl_seconds)
        FROM unnest(ids) AS i
        ON CONFLICT (limit_id, id) DO UPDATE SET expires_at = excluded.expires_at;
        DELETE FROM pgslots.waiters w
        WHERE w.limit_id = ANY (blocked) AND w.expires_at <= at;
    END IF;
END
$$;

---------------------------------------------------------------------------------------------------
-- Public API: slots.
---------------------------------------------------------------------------------------------------

CREATE FUNCTION pgslots.acquire(
    names text[],
    slots integer DEFAULT 1,
    lease_seconds float8 DEFAULT 300,
    holder jsonb DEFAULT NULL,
    strict boolean DEFAULT false,
    ticket bigint DEFAULT NULL,
    queue_client uuid DEFAULT NULL,
    new_lease_id uuid DEFAULT NULL,
    OUT granted boolean, OUT lease_id uuid, OUT fencing_token bigint, OUT expires_at timestamptz,
    OUT retry_after float8, OUT missing text[], OUT blocked_by text[], OUT waiter bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    SELECT a.granted, a.lease_id, a.fencing_token, a.expires_at, a.retry_after, a.missing, a.blocked_by, a.waiter
    INTO granted, lease_id, fencing_token, expires_at, retry_after, missing, blocked_by, waiter
    FROM pgslots._admit(names, slots, lease_seconds, holder, strict, ticket, queue_client, false,
                        new_lease_id) AS a;
END
$$;
COMMENT ON FUNCTION pgslots.acquire(text[], integer, float8, jsonb, boolean, bigint, uuid, uuid) IS
'Non-blocking, all-or-nothing acquire of `slots` on every active limit in `names`. Granted: a lease '
'(lease_id, fencing_token, expires_at) to release or renew. Refused: retry_after seconds and '
'blocked_by. missing lists names with no limit (strict => error). With queue_client, a refused '
'caller is queued and gets a waiter ticket to pass back; queued callers are served first-come. '
'new_lease_id lets a client name the lease up front, so it can release it after an interrupted call.';

CREATE FUNCTION pgslots.rate_limit(
    names text[],
    slots integer DEFAULT 1,
    strict boolean DEFAULT false,
    ticket bigint DEFAULT NULL,
    queue_client uuid DEFAULT NULL,
    OUT granted boolean, OUT retry_after float8, OUT missing text[], OUT blocked_by text[],
    OUT waiter bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    SELECT a.granted, a.retry_after, a.missing, a.blocked_by, a.waiter
    INTO granted, retry_after, missing, blocked_by, waiter
    FROM pgslots._admit(names, slots, NULL, NULL, strict, ticket, queue_client, true, NULL) AS a;
END
$$;
COMMENT ON FUNCTION pgslots.rate_limit(text[], integer, boolean, bigint, uuid) IS
'Non-blocking rate limit: occupies `slots` on every active limit in `names` that then decay at '
'each limit''s slot_decay_per_second. Refused: retry_after is the exact wait until they fit.';

CREATE FUNCTION pgslots.release(lease_id uuid, durable boolean DEFAULT true) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz;
    part record;
    released boolean := false;
BEGIN
    IF NOT durable THEN
        -- Commit without waiting for the WAL flush. A crash may then forget this release, which
        -- keeps the slot taken until its lease expires: slower, never over-admitting.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    PERFORM 1 FROM pgslots.limits l
    WHERE l.id IN (SELECT x.limit_id FROM pgslots.leases x WHERE x.id = release.lease_id)
    ORDER BY l.id FOR UPDATE;
    at := clock_timestamp() + (SELECT s.clock_offset FROM pgslots.settings s);
    FOR part IN DELETE FROM pgslots.leases x WHERE x.id = release.lease_id
                RETURNING x.limit_id, x.slots, x.acquired_at LOOP
        released := true;
        -- Moving average of seconds a slot is held, weight 1/(2*limit): the refusal hint.
        UPDATE pgslots.limits l
        SET leased_slots = greatest(0, l.leased_slots - part.slots),
            avg_slot_occupancy_seconds = greatest(0.1,
                l.avg_slot_occupancy_seconds
                + (date_part('epoch', at - part.acquired_at) - l.avg_slot_occupancy_seconds)
                  / (2.0 * greatest(l."limit", 1)))
        WHERE l.id = part.limit_id;
        IF EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = part.limit_id) THEN
            PERFORM pgslots._wake(part.limit_id, at);
        END IF;
    END LOOP;
    RETURN released;
END
$$;
COMMENT ON FUNCTION pgslots.release(uuid, boolean) IS
'Releases a lease''s slots. Idempotent: an unknown or already released lease changes nothing '
'and returns false. Wakes queued waiters that the freed slots can serve. durable => false commits '
'without waiting for the WAL flush (use it in its own transaction only): a crash can then delay '
'the slot until its lease expires, but never over-admit.';

CREATE FUNCTION pgslots.renew(lease_id uuid, lease_seconds float8 DEFAULT 300)
RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    lease_for interval := pgslots._lease_interval(lease_seconds);
    at timestamptz := pgslots._now();
    renewed integer;
    expected integer;
    new_expiry timestamptz := at + lease_for;
BEGIN
    WITH r AS (
        UPDATE pgslots.leases x SET expires_at = new_expiry
        WHERE x.id = renew.lease_id AND x.expires_at > at
        RETURNING x.parts
    )
    SELECT count(*), min(r.parts) INTO renewed, expected FROM r;
    IF renewed = 0 OR renewed < expected THEN
        RAISE EXCEPTION 'Lease % was lost: it expired or was released, so its slots may be held by others now.',
            lease_id
            USING ERRCODE = 'PS010',
                  HINT = 'Stop the work that needed the slots and acquire them again.';
    END IF;
    RETURN new_expiry;
END
$$;
COMMENT ON FUNCTION pgslots.renew(uuid, float8) IS
'Extends a live lease to now + lease_seconds and returns the new expiry. A lease that expired or '
'was released is lost: renewing it raises SQLSTATE PS010 and changes nothing.';

CREATE FUNCTION pgslots.sweep() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    targets uuid[];
    reclaimed integer;
BEGIN
    targets := ARRAY(SELECT l.id FROM pgslots.limits l
                     WHERE l.id IN (SELECT x.limit_id FROM pgslots.leases x WHERE x.expires_at <= at)
                     ORDER BY l.id FOR UPDATE);
    SELECT count(DISTINCT x.id) INTO reclaimed FROM pgslots.leases x
    WHERE x.limit_id = ANY (targets) AND x.expires_at <= at;
    PERFORM pgslots._reclaim(t, at) FROM unnest(targets) AS t;
    PERFORM pgslots._wake(t, at) FROM unnest(targets) AS t;
    -- Lease rows of deleted limits, and waiters nobody heartbeats any more.
    DELETE FROM pgslots.leases x WHERE x.expires_at <= at
        AND NOT EXISTS (SELECT 1 FROM pgslots.limits l WHERE l.id = x.limit_id);
    DELETE FROM pgslots.waiters w WHERE w.expires_at <= at;
    RETURN reclaimed;
END
$$;
COMMENT ON FUNCTION pgslots.sweep() IS
'Reclaims the slots of every expired lease and drops dead waiters; returns how many leases it '
'reclaimed. Not required for correctness (a full limit reclaims its own expired leases); for cron.';

---------------------------------------------------------------------------------------------------
-- Public API: queue upkeep for waiting clients.
---------------------------------------------------------------------------------------------------

CREATE FUNCTION pgslots.heartbeat(queue_client uuid) RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    mine bigint[];
BEGIN
    UPDATE pgslots.waiters w
    SET expires_at = at + make_interval(secs => s.waiter_ttl_seconds)
    FROM pgslots.settings s
    WHERE w.client_id = queue_client;
    -- One walk of the queue per limit, not per waiter.
    SELECT array_agg(DISTINCT t ORDER BY t) INTO mine
    FROM (SELECT DISTINCT w.limit_id FROM pgslots.waiters w WHERE w.client_id = queue_client) q,
         unnest(pgslots._wakeable(q.limit_id, at)) AS t
    WHERE EXISTS (SELECT 1 FROM pgslots.waiters v WHERE v.id = t AND v.client_id = queue_client);
    RETURN coalesce(mine, '{}');
END
$$;
COMMENT ON FUNCTION pgslots.heartbeat(uuid) IS
'Keeps every queued waiter of one client in its place for another waiter_ttl_seconds, and returns '
'the tickets among them that free slots could serve now (a backstop for lost notifications). A '
'client that stops calling it leaves the queue by itself.';

CREATE FUNCTION pgslots.leave_queue(ticket bigint) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    left_limit uuid;
BEGIN
    FOR left_limit IN DELETE FROM pgslots.waiters w WHERE w.id = ticket RETURNING w.limit_id LOOP
        PERFORM pgslots._wake(left_limit, at);   -- those behind may fit now
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgslots.leave_queue(bigint) IS
'Takes a waiter ticket out of the queue (the caller gave up waiting). Idempotent.';

---------------------------------------------------------------------------------------------------
-- Public API: managing limits.
---------------------------------------------------------------------------------------------------

CREATE FUNCTION pgslots.create_limit(
    name text, "limit" integer, slot_decay_per_second float8 DEFAULT 0, active boolean DEFAULT true,
    active_slots integer DEFAULT 0)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    new_id uuid;
BEGIN
    PERFORM pgslots._check_name(name);
    IF "limit" IS NULL THEN
        RAISE EXCEPTION 'limit is required: the number of slots the limit has.' USING ERRCODE = 'PS002';
    END IF;
    PERFORM pgslots._check_limit_values("limit", slot_decay_per_second);
    IF active_slots IS NULL OR active_slots < 0 THEN
        RAISE EXCEPTION 'active_slots must be 0 or more, got %.', coalesce(active_slots::text, 'NULL')
            USING ERRCODE = 'PS002';
    END IF;
    INSERT INTO pgslots.limits AS l (name, "limit", slot_decay_per_second, active, unleased_slots,
                                     decayed_at, created, updated)
    VALUES (name, "limit", coalesce(slot_decay_per_second, 0), coalesce(active, true),
            active_slots, at, at, at)
    ON CONFLICT ON CONSTRAINT limits_name_key DO NOTHING
    RETURNING l.id INTO new_id;
    IF new_id IS NULL THEN
        RAISE EXCEPTION 'Global concurrency limit % already exists.', quote_literal(name)
            USING ERRCODE = 'PS003', HINT = 'Pick another name, or change the existing limit with update.';
    END IF;
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION pgslots.create_limit(text, integer, float8, boolean, integer) IS
'Creates a limit of "limit" slots; returns its id. Names are unique, non-empty, at most 255 '
'characters, without / % & > <. A decay > 0 makes it usable for rate limits.';

CREATE FUNCTION pgslots.update_limit(
    name text, "limit" integer DEFAULT NULL, slot_decay_per_second float8 DEFAULT NULL,
    active boolean DEFAULT NULL, active_slots integer DEFAULT NULL, new_name text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz;
    lim record;
BEGIN
    PERFORM pgslots._check_limit_values("limit", slot_decay_per_second);
    IF new_name IS NOT NULL THEN
        PERFORM pgslots._check_name(new_name);
    END IF;
    IF active_slots IS NOT NULL AND active_slots < 0 THEN
        RAISE EXCEPTION 'active_slots must be 0 or more, got %.', active_slots USING ERRCODE = 'PS002';
    END IF;
    SELECT * INTO lim FROM pgslots.limits l WHERE l.name = update_limit.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Global concurrency limit % not found.', quote_literal(coalesce(name, 'NULL'))
            USING ERRCODE = 'PS004', HINT = 'List the limits with pgslots ls.';
    END IF;
    IF active_slots IS NOT NULL AND active_slots < lim.leased_slots THEN
        RAISE EXCEPTION 'Cannot set active slots of % to %: % slots are held by leases.',
            quote_literal(name), active_slots, lim.leased_slots
            USING ERRCODE = 'PS002', HINT = 'Release those leases first (pgslots leases NAME).';
    END IF;
    IF new_name IS NOT NULL AND new_name <> name
       AND EXISTS (SELECT 1 FROM pgslots.limits l WHERE l.name = new_name) THEN
        RAISE EXCEPTION 'Global concurrency limit % already exists.', quote_literal(new_name)
            USING ERRCODE = 'PS003';
    END IF;
    at := pgslots._now();
    -- Bring decay up to now at the old rate before changing the rate or the count: exact, no loss.
    UPDATE pgslots.limits l SET
        "limit" = coalesce(update_limit."limit", l."limit"),
        slot_decay_per_second = coalesce(update_limit.slot_decay_per_second, l.slot_decay_per_second),
        active = coalesce(update_limit.active, l.active),
        unleased_slots = CASE WHEN update_limit.active_slots IS NOT NULL
            THEN update_limit.active_slots - l.leased_slots
            ELSE pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at) END,
        decayed_at = at,
        name = coalesce(new_name, l.name),
        updated = at
    WHERE l.id = lim.id;
    PERFORM pgslots._wake(lim.id, at);
    RETURN lim.id;
END
$$;
COMMENT ON FUNCTION pgslots.update_limit(text, integer, float8, boolean, integer, text) IS
'Changes a limit; NULL arguments leave a field as it is. Lowering the limit below the slots held '
'pre-empts nobody. active_slots sets the occupied count (it cannot go below the leased slots). '
'Raising the limit or activating it wakes the waiters that now fit.';

CREATE FUNCTION pgslots.delete_limit(name text) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    gone uuid;
BEGIN
    DELETE FROM pgslots.limits l WHERE l.name = delete_limit.name RETURNING l.id INTO gone;
    IF gone IS NULL THEN
        RAISE EXCEPTION 'Global concurrency limit % not found.', quote_literal(coalesce(name, 'NULL'))
            USING ERRCODE = 'PS004', HINT = 'List the limits with pgslots ls.';
    END IF;
    DELETE FROM pgslots.leases x WHERE x.limit_id = gone;
    PERFORM pgslots._wake(gone, pgslots._now());   -- waiters find out it is gone
    DELETE FROM pgslots.waiters w WHERE w.limit_id = gone;
    RETURN gone;
END
$$;
COMMENT ON FUNCTION pgslots.delete_limit(text) IS
'Deletes a limit with its leases and queue; returns its id. Holders of its leases are not '
'interrupted; their release is a no-op.';

---------------------------------------------------------------------------------------------------
-- Public API: reading.
---------------------------------------------------------------------------------------------------

CREATE VIEW pgslots.status AS
SELECT l.id,
       l.name,
       l."limit",
       l.active,
       l.slot_decay_per_second,
       l.leased_slots + pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, c.at)
           AS active_slots,
       l.leased_slots,
       pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, c.at)
           AS unleased_slots,
       l.denied_slots,
       l.avg_slot_occupancy_seconds,
       (SELECT count(*) FROM pgslots.leases x WHERE x.limit_id = l.id)::integer AS leases,
       (SELECT count(*) FROM pgslots.leases x
        WHERE x.limit_id = l.id AND x.expires_at <= c.at)::integer AS expired_leases,
       (SELECT count(*) FROM pgslots.waiters w
        WHERE w.limit_id = l.id AND w.expires_at > c.at)::integer AS waiters,
       (SELECT date_part('epoch', c.at - min(w.enqueued_at)) FROM pgslots.waiters w
        WHERE w.limit_id = l.id AND w.expires_at > c.at)::float8 AS oldest_waiter_seconds,
       l.created,
       l.updated
FROM pgslots.limits l, LATERAL (SELECT pgslots._now() AS at) c;
COMMENT ON VIEW pgslots.status IS
'One row per limit: occupied slots after decay (active_slots), leases, queued waiters and the age '
'of the oldest, refusal pressure (denied_slots).';

CREATE FUNCTION pgslots.get_limits(names text[] DEFAULT NULL) RETURNS SETOF pgslots.status
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
    SELECT * FROM pgslots.status s WHERE names IS NULL OR s.name = ANY (names) ORDER BY s.name
$$;
COMMENT ON FUNCTION pgslots.get_limits(text[]) IS
'The status rows of the named limits (all limits when names is NULL), by name.';

CREATE FUNCTION pgslots.lock_for_apply() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$ SELECT pg_advisory_xact_lock(7048297117402) $$;
COMMENT ON FUNCTION pgslots.lock_for_apply() IS
'Taken by declarative appliers (pgslots apply) for the rest of their transaction, so two of them '
'never plan against the same state.';

CREATE FUNCTION pgslots.list_leases(name text DEFAULT NULL)
RETURNS TABLE (lease_id uuid, limit_names text[], slots integer, fencing_token bigint,
               acquired_at timestamptz, expires_at timestamptz, expired boolean,
               host text, pid integer, application_name text, holder jsonb)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
    SELECT x.id, array_agg(l.name ORDER BY l.name), min(x.slots), min(x.fencing_token),
           min(x.acquired_at), min(x.expires_at), min(x.expires_at) <= pgslots._now(),
           min(x.host), min(x.pid), min(x.application_name), (array_agg(x.holder))[1]
    FROM pgslots.leases x JOIN pgslots.limits l ON l.id = x.limit_id
    WHERE list_leases.name IS NULL
       OR x.id IN (SELECT y.id FROM pgslots.leases y JOIN pgslots.limits m ON m.id = y.limit_id
                   WHERE m.name = list_leases.name)
    GROUP BY x.id
    ORDER BY min(x.acquired_at), x.id
$$;
COMMENT ON FUNCTION pgslots.list_leases(text) IS
'Who holds what: one row per lease (of one limit, or all), oldest first, with holder details.';

CREATE FUNCTION pgslots.schema_version() RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$ SELECT coalesce(max(m.version), 0) FROM pgslots.migrations m $$;
COMMENT ON FUNCTION pgslots.schema_version() IS
'The number of the newest migration applied to this database.';
