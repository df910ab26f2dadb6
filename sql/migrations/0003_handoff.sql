-- 0003_handoff: a release hands the slots it frees straight to the head of the queue.
--
-- Why: before, a release only notified the waiters the freed slots could serve, and each of them
-- then called acquire to take them: a second pass through the limit's row lock per hand-off, and a
-- gap between the release and the grant in which the slot stood idle. Now a waiter that named its
-- lease up front (acquire's new_lease_id, as the Python client always does) leaves in its queue row
-- what a lease needs, and release writes that lease itself, in its own transaction, and says so in
-- the notification. Rules that keep it safe:
--  * Only the head of the queue, in ticket order, and only while the freed slots fit it; a waiter
--    queued on several limits, or for a rate limit, is woken as before (release holds the row lock
--    of its own limits only). So the queue stays first-come, first-served.
--  * A handed lease first runs for at most 2 x waiter_ttl_seconds: if its waiter died after its last
--    heartbeat, the slots come back that soon. The waiter's client renews it to full length.
--  * A release that hands slots over is a grant, so it always waits for the WAL flush, even when
--    called with durable => false.
--  * A waiter that asks again with the same ticket and lease id gets the lease it was handed
--    (renewed to full length), so a lost or unread notification costs one call, never a slot.
--
-- Notifications go to each waiting client's own channel, "pgslots:<queue_client>", so a release
-- wakes the one process it serves instead of every listening process.
--
-- Also here, because each lock-holding statement slows every other caller of a busy limit:
--  * acquire decides the common case (one limit, room after those queued) with one conditional
--    UPDATE beside the lease row, and release of a one-limit lease is one UPDATE and one DELETE;
--  * a refused acquire that queues (one limit, queue_client given) does not lock the limit's row.
--    It holds the limit's queue lock, an advisory lock (class 1885827953, key hashtext(limit id)),
--    shared until it commits; every release and wake-up takes it exclusively before reading the
--    queue, so none can miss a waiter that was being queued. Whoever holds the queue lock shared
--    never asks for a row lock, so the two never deadlock. Its refusal pressure goes to
--    pgslots.refusals, which the status view adds to denied_slots.
-- Anything else takes the full path of 0001.
-- Payload, comma-separated entries:
--   <ticket>                                       look again: the freed slots may fit you now
--   <ticket>:<fencing_token>:<expires_epoch>:<seconds>   your named lease is granted; it expires at
--                                                  expires_epoch (seconds from now: <seconds>)

ALTER TABLE pgslots.waiters
    ADD COLUMN parts smallint NOT NULL DEFAULT 1,
    ADD COLUMN lease_id uuid,
    ADD COLUMN lease_seconds float8,
    ADD COLUMN host text,
    ADD COLUMN pid integer,
    ADD COLUMN application_name text,
    ADD COLUMN holder jsonb;
CREATE INDEX waiters_lease ON pgslots.waiters (lease_id) WHERE lease_id IS NOT NULL;

-- Refusals counted without locking the limit (acquire's queueing path); status adds them in.
CREATE TABLE pgslots.refusals (
    limit_id uuid PRIMARY KEY,
    denied_slots bigint NOT NULL
);
COMMENT ON COLUMN pgslots.waiters.lease_id IS
    'The lease the waiter named (acquire''s new_lease_id): release may grant it directly.';

-- As in 0001, plus: the answer for a waiter already handed its lease, and the lease details in a
-- named waiter's queue row.
CREATE OR REPLACE FUNCTION pgslots._admit(
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

    IF names IS NULL OR slots IS NULL OR slots <= 0
       OR EXISTS (SELECT 1 FROM unnest(names) AS n
                  WHERE n IS NULL OR n = '' OR n ~ '[/%&><]' OR char_length(n) > 255) THEN
        wanted := pgslots._check_names(names);   -- raises the precise error
        PERFORM pgslots._check_slots(slots);
    END IF;
    IF cardinality(wanted) > 1 THEN
        wanted := pgslots._check_names(wanted);  -- drops repeats
    END IF;
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

    -- A queued waiter asking again may have been granted its named lease by a release meanwhile
    -- (its notification lost or not read yet): that lease is the answer, renewed to full length.
    IF ticket IS NOT NULL AND new_lease_id IS NOT NULL AND NOT for_rate_limit THEN
        UPDATE pgslots.leases x SET expires_at = at + lease_for
        WHERE x.id = new_lease_id AND x.limit_id = ANY (ids)
        RETURNING x.fencing_token, x.expires_at INTO fencing_token, expires_at;
        IF FOUND THEN
            granted := true;
            lease_id := new_lease_id;
            DELETE FROM pgslots.waiters w WHERE w.id = ticket;
            RETURN;
        END IF;
    END IF;

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
        -- With a named lease, it also leaves what a release needs to grant it that lease directly.
        INSERT INTO pgslots.waiters AS w (id, limit_id, slots, client_id, enqueued_at, expires_at,
                                          parts, lease_id, lease_seconds, host, pid,
                                          application_name, holder)
        SELECT waiter, i, slots, queue_client, at, at + make_interval(secs => cfg.waiter_ttl_seconds),
               cardinality(ids), new_lease_id, lease_seconds,
               coalesce(holder ->> 'host', host(inet_client_addr()), 'local'),
               CASE WHEN holder ->> 'pid' ~ '^[0-9]{1,9}$' THEN (holder ->> 'pid')::integer
                    ELSE pg_backend_pid() END,
               nullif(current_setting('application_name'), ''),
               holder
        FROM unnest(ids) AS i
        ON CONFLICT (limit_id, id) DO UPDATE
        SET expires_at = excluded.expires_at, lease_id = excluded.lease_id,
            lease_seconds = excluded.lease_seconds;
        DELETE FROM pgslots.waiters w
        WHERE w.limit_id = ANY (blocked) AND w.expires_at <= at;
    END IF;
END
$$;
-- Grants the freed slots of one limit (whose row lock and queue lock the caller holds) to the head
-- of its queue: each waiter in ticket order that named its lease, waits on this limit alone and
-- fits. Writes the leases, removes the waiters, notifies them. A waiter it cannot serve this way
-- (queued on several limits, or for a rate limit) stops it; if the free slots fit that one, it and
-- those behind it that fit are notified to ask again. Returns how many waiters it served.
CREATE FUNCTION pgslots._hand_off(target uuid, at timestamptz) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    lim record;
    ttl float8 := (SELECT s.waiter_ttl_seconds FROM pgslots.settings s);
    free float8;
    w record;
    given integer := 0;
    served integer := 0;
    token bigint;
    run_for float8;
    expiry timestamptz;
    wake_rest boolean := false;
BEGIN
    IF EXISTS (SELECT 1 FROM pgslots.leases x WHERE x.limit_id = target AND x.expires_at <= at) THEN
        PERFORM pgslots._reclaim(target, at);
    END IF;
    SELECT l."limit", l.active, l.leased_slots,
           greatest(0::float8, l.unleased_slots - l.slot_decay_per_second
                    * greatest(0::float8, extract(epoch FROM at - l.decayed_at)::float8)) AS unleased_now
    INTO lim FROM pgslots.limits l WHERE l.id = target;
    IF NOT FOUND OR NOT lim.active THEN
        PERFORM pgslots._wake(target, at);   -- deleted or disabled: every waiter must look again
        RETURN 0;
    END IF;
    free := lim."limit" - lim.leased_slots - lim.unleased_now;
    FOR w IN SELECT x.id, x.slots, x.parts, x.lease_id, x.lease_seconds, x.host, x.pid,
                    x.application_name, x.holder, x.client_id
             FROM pgslots.waiters x
             WHERE x.limit_id = target AND x.expires_at > at ORDER BY x.id LOOP
        EXIT WHEN w.slots > free + 1e-9;   -- nobody behind it may overtake it
        IF w.lease_id IS NULL OR w.parts <> 1 THEN
            wake_rest := true;
            EXIT;
        END IF;
        token := nextval('pgslots.fencing_tokens');
        run_for := least(w.lease_seconds, 2 * ttl);
        expiry := at + make_interval(secs => run_for);
        INSERT INTO pgslots.leases (id, limit_id, slots, parts, fencing_token, acquired_at,
                                    expires_at, host, pid, application_name, holder)
        VALUES (w.lease_id, target, w.slots, 1, token, at, expiry, w.host, w.pid,
                w.application_name, w.holder)
        ON CONFLICT (id, limit_id) DO NOTHING;
        IF FOUND THEN
            given := given + w.slots;
            free := free - w.slots;
            PERFORM pg_notify('pgslots:' || w.client_id,
                              format('%s:%s:%s:%s', w.id, token, extract(epoch FROM expiry), run_for));
        END IF;
        DELETE FROM pgslots.waiters x WHERE x.id = w.id;
        served := served + 1;
    END LOOP;
    IF given > 0 THEN
        UPDATE pgslots.limits l SET leased_slots = l.leased_slots + given WHERE l.id = target;
    END IF;
    IF wake_rest THEN
        PERFORM pgslots._wake(target, at);
    END IF;
    RETURN served;
END
$$;

-- Notifies the waiters of one limit that the slots free now can serve, each client on its channel.
CREATE OR REPLACE FUNCTION pgslots._wake(target uuid, at timestamptz) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    woken bigint[];
    c record;
BEGIN
    PERFORM pg_advisory_xact_lock(1885827953, hashtext(target::text));   -- see acquire
    woken := pgslots._wakeable(target, at);
    IF cardinality(woken) > 0 THEN
        FOR c IN SELECT w.client_id, string_agg(w.id::text, ',' ORDER BY w.id) AS tickets
                 FROM pgslots.waiters w WHERE w.limit_id = target AND w.id = ANY (woken)
                 GROUP BY w.client_id LOOP
            PERFORM pg_notify('pgslots:' || c.client_id, c.tickets);
        END LOOP;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgslots.release(lease_id uuid, durable boolean DEFAULT true) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER   -- as set by 0002: CREATE OR REPLACE resets it
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz;
    part record;
    released boolean := false;
    handed integer := 0;
    commit_mode text := current_setting('synchronous_commit');
    target uuid;
    freed integer;
BEGIN
    IF NOT durable THEN
        -- Commit without waiting for the WAL flush. A crash may then forget this release, which
        -- keeps the slot taken until its lease expires: slower, never over-admitting.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- The common case first: a lease on one limit. Its UPDATE takes the limit's row lock (the only
    -- one this release needs), then the lease row goes. Had a reclaim removed the lease meanwhile
    -- (it expired, and a full limit took its slots back), the count is put back as it was.
    UPDATE pgslots.limits l
    SET leased_slots = greatest(0, l.leased_slots - x.slots),
        avg_slot_occupancy_seconds = greatest(0.1,
            l.avg_slot_occupancy_seconds
            + (date_part('epoch', clock_timestamp() + s.clock_offset - x.acquired_at)
               - l.avg_slot_occupancy_seconds) / (2.0 * greatest(l."limit", 1)))
    FROM pgslots.leases x, pgslots.settings s
    WHERE x.id = release.lease_id AND x.parts = 1 AND l.id = x.limit_id
    RETURNING l.id, x.slots INTO target, freed;
    IF FOUND THEN
        DELETE FROM pgslots.leases x WHERE x.id = release.lease_id AND x.limit_id = target;
        IF NOT FOUND THEN
            UPDATE pgslots.limits l SET leased_slots = l.leased_slots + freed WHERE l.id = target;
            RETURN false;
        END IF;
        PERFORM pg_advisory_xact_lock(1885827953, hashtext(target::text));   -- see acquire
        IF EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = target) THEN
            at := clock_timestamp() + (SELECT s.clock_offset FROM pgslots.settings s);
            handed := pgslots._hand_off(target, at);
            IF handed > 0 AND NOT durable THEN
                PERFORM set_config('synchronous_commit', commit_mode, true);   -- see below
            END IF;
        END IF;
        RETURN true;
    END IF;
    -- The limits of the lease, and of a queued request that named it: a release handing it over
    -- right now holds their locks, and the statements below then see what it wrote.
    PERFORM 1 FROM pgslots.limits l
    WHERE l.id IN (SELECT x.limit_id FROM pgslots.leases x WHERE x.id = release.lease_id
                   UNION ALL
                   SELECT w.limit_id FROM pgslots.waiters w WHERE w.lease_id = release.lease_id)
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
        PERFORM pg_advisory_xact_lock(1885827953, hashtext(part.limit_id::text));   -- see acquire
        IF EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = part.limit_id) THEN
            handed := handed + pgslots._hand_off(part.limit_id, at);
        END IF;
    END LOOP;
    IF NOT released THEN
        -- Not granted yet: the caller gave up on a queued request. Take it out of the queue, so
        -- that no release can hand it the lease later; those behind may fit now.
        FOR part IN DELETE FROM pgslots.waiters w WHERE w.lease_id = release.lease_id
                    RETURNING w.limit_id LOOP
            PERFORM pgslots._wake(part.limit_id, at);
        END LOOP;
    END IF;
    IF handed > 0 AND NOT durable THEN
        -- Handing slots over grants a lease: that must survive a crash like any grant.
        PERFORM set_config('synchronous_commit', commit_mode, true);
    END IF;
    RETURN released;
END
$$;
COMMENT ON FUNCTION pgslots.release(uuid, boolean) IS
'Releases a lease''s slots. Idempotent: an unknown or already released lease changes nothing '
'and returns false; a queued request that named this lease (new_lease_id) leaves the queue. The freed slots go straight to the head of the queue when it named its lease '
'(see acquire), else the queued waiters they can serve are notified. durable => false commits '
'without waiting for the WAL flush (use it in its own transaction only) unless slots were handed '
'over: a crash can then delay the slot until its lease expires, but never over-admit.';

CREATE OR REPLACE FUNCTION pgslots.acquire(
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
SECURITY DEFINER   -- as set by 0002: CREATE OR REPLACE resets it
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    cfg pgslots.settings;
    at timestamptz;
    target uuid;
    lim record;
    need float8;
BEGIN
    -- The common case first: one limit, room for us after those queued. A single UPDATE decides
    -- and counts under the row lock, like a bare semaphore, and the lease row is written beside it.
    -- Everything else (errors, refusals, queues, several limits) is decided by _admit. Should the
    -- UPDATE wait for the row lock, it checks the count the other transaction committed.
    IF ticket IS NULL AND cardinality(names) = 1 AND slots > 0 THEN
        SELECT * INTO cfg FROM pgslots.settings;
        IF lease_seconds >= cfg.min_lease_seconds AND lease_seconds <= cfg.max_lease_seconds THEN
            at := clock_timestamp() + cfg.clock_offset;
            UPDATE pgslots.limits l SET leased_slots = l.leased_slots + slots
            WHERE l.name = names[1] AND l.active
              AND l.leased_slots + slots - l."limit"
                  + greatest(0::float8, l.unleased_slots - l.slot_decay_per_second
                             * greatest(0::float8, extract(epoch FROM at - l.decayed_at)::float8))
                  + (SELECT coalesce(sum(w.slots), 0) FROM pgslots.waiters w
                     WHERE w.limit_id = l.id AND w.expires_at > at) <= 1e-9
            RETURNING l.id INTO target;
            IF FOUND THEN
                granted := true;
                lease_id := coalesce(new_lease_id, gen_random_uuid());
                fencing_token := nextval('pgslots.fencing_tokens');
                expires_at := at + make_interval(secs => lease_seconds);
                missing := '{}';
                INSERT INTO pgslots.leases (id, limit_id, slots, parts, fencing_token, acquired_at,
                                            expires_at, host, pid, application_name, holder)
                VALUES (lease_id, target, slots, 1, fencing_token, at, expires_at,
                        coalesce(holder ->> 'host', host(inet_client_addr()), 'local'),
                        CASE WHEN holder ->> 'pid' ~ '^[0-9]{1,9}$' THEN (holder ->> 'pid')::integer
                             ELSE pg_backend_pid() END,
                        nullif(current_setting('application_name'), ''),
                        holder);
                RETURN;
            END IF;
            -- Refused at a glance, and the caller queues: queue it without the limit's row lock,
            -- so refusals neither wait for grants and releases nor hold them up. What keeps a
            -- release from missing a waiter queued this way is the limit's queue lock (advisory):
            -- shared here until this commits, exclusive in every release and wake-up before it
            -- reads the queue. Expired leases to reclaim, and anything unusual, take _admit's path.
            IF queue_client IS NOT NULL THEN
                SELECT l.id, l.name, l.active, l."limit" INTO lim FROM pgslots.limits l WHERE l.name = names[1];
                IF FOUND AND lim.active AND slots <= lim."limit"
                   AND NOT EXISTS (SELECT 1 FROM pgslots.leases x
                                   WHERE x.limit_id = lim.id AND x.expires_at <= at) THEN
                    PERFORM pg_advisory_xact_lock_shared(1885827953, hashtext(lim.id::text));
                    SELECT l.id, l.name, l.active, l."limit", l.leased_slots, l.slot_decay_per_second,
                           l.avg_slot_occupancy_seconds,
                           greatest(0::float8, l.unleased_slots - l.slot_decay_per_second
                                    * greatest(0::float8, extract(epoch FROM at - l.decayed_at)::float8))
                               AS unleased_now,
                           (SELECT coalesce(sum(w.slots), 0) FROM pgslots.waiters w
                            WHERE w.limit_id = l.id AND w.expires_at > at) AS ahead
                    INTO lim FROM pgslots.limits l WHERE l.id = lim.id;
                    need := lim.leased_slots + lim.unleased_now + lim.ahead + slots - lim."limit";
                    IF FOUND AND lim.active AND need > 1e-9 THEN
                        PERFORM set_config('synchronous_commit', 'off', true);   -- as in _admit
                        granted := false;
                        missing := '{}';
                        blocked_by := ARRAY[lim.name];
                        retry_after := CASE
                            WHEN lim.slot_decay_per_second > 0 AND lim.leased_slots + slots <= lim."limit"
                                THEN need / lim.slot_decay_per_second
                            ELSE least(30, greatest(0.1,
                                lim.avg_slot_occupancy_seconds * need / greatest(lim."limit", 1))) END;
                        waiter := nextval('pgslots.waiter_tickets');
                        INSERT INTO pgslots.waiters (id, limit_id, slots, client_id, enqueued_at,
                                                     expires_at, parts, lease_id, lease_seconds, host,
                                                     pid, application_name, holder)
                        VALUES (waiter, lim.id, slots, queue_client, at,
                                at + make_interval(secs => cfg.waiter_ttl_seconds), 1, new_lease_id,
                                lease_seconds,
                                coalesce(holder ->> 'host', host(inet_client_addr()), 'local'),
                                CASE WHEN holder ->> 'pid' ~ '^[0-9]{1,9}$'
                                     THEN (holder ->> 'pid')::integer ELSE pg_backend_pid() END,
                                nullif(current_setting('application_name'), ''),
                                holder);
                        -- Refusal pressure, counted beside the limit so as not to lock it.
                        INSERT INTO pgslots.refusals AS r (limit_id, denied_slots) VALUES (lim.id, slots)
                        ON CONFLICT (limit_id) DO UPDATE SET denied_slots = r.denied_slots + excluded.denied_slots;
                        RETURN;
                    END IF;
                    -- Room appeared (or the limit changed) since the UPDATE looked: ask again at
                    -- once. Not via _admit: its row locks must never be taken under the queue lock.
                    granted := false;
                    retry_after := 0;
                    missing := '{}';
                    blocked_by := '{}';
                    RETURN;
                END IF;
            END IF;
        END IF;
    END IF;
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
'new_lease_id names the lease up front: the caller can release it after an interrupted call, and '
'a queued caller waiting on one limit may be granted it by a release (the notification says so; '
'asking again with the same ticket and new_lease_id returns it).';

CREATE OR REPLACE FUNCTION pgslots.leave_queue(ticket bigint) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER   -- as set by 0002: CREATE OR REPLACE resets it
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz;
    left_limit uuid;
BEGIN
    -- Lock the ticket's limits first, as a release does: a release that is handing this ticket its
    -- lease right now finishes first, so the caller's release of that lease, next, finds it.
    PERFORM 1 FROM pgslots.limits l
    WHERE l.id IN (SELECT w.limit_id FROM pgslots.waiters w WHERE w.id = leave_queue.ticket)
    ORDER BY l.id FOR UPDATE;
    at := pgslots._now();
    FOR left_limit IN DELETE FROM pgslots.waiters w WHERE w.id = leave_queue.ticket RETURNING w.limit_id LOOP
        PERFORM pgslots._wake(left_limit, at);   -- those behind may fit now
    END LOOP;
END
$$;

DROP FUNCTION pgslots.heartbeat(uuid);
CREATE FUNCTION pgslots.heartbeat(queue_client uuid, tickets bigint[] DEFAULT NULL) RETURNS bigint[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    mine bigint[];
BEGIN
    -- Given the tickets it waits on, only those keep their place: a request abandoned in the middle
    -- of its call (its ticket never known to the client) leaves the queue when its time is up.
    UPDATE pgslots.waiters w
    SET expires_at = at + make_interval(secs => s.waiter_ttl_seconds)
    FROM pgslots.settings s
    WHERE w.client_id = queue_client AND (tickets IS NULL OR w.id = ANY (tickets));
    -- One walk of the queue per limit, not per waiter.
    SELECT array_agg(DISTINCT t ORDER BY t) INTO mine
    FROM (SELECT q.t FROM (SELECT DISTINCT w.limit_id FROM pgslots.waiters w
                           WHERE w.client_id = queue_client) l,
                          unnest(pgslots._wakeable(l.limit_id, at)) AS q(t)
          WHERE (tickets IS NULL OR q.t = ANY (tickets))
            AND EXISTS (SELECT 1 FROM pgslots.waiters v WHERE v.id = q.t AND v.client_id = queue_client)
          UNION ALL
          -- Tickets no longer queued: handed their lease, or dropped. Asking again tells which.
          SELECT g.t FROM unnest(tickets) AS g(t)
          WHERE NOT EXISTS (SELECT 1 FROM pgslots.waiters v WHERE v.id = g.t)) u(t);
    RETURN coalesce(mine, '{}');
END
$$;
COMMENT ON FUNCTION pgslots.heartbeat(uuid, bigint[]) IS
'Keeps every queued waiter of one client in its place for another waiter_ttl_seconds, and returns '
'the tickets that should ask again now: those among them that free slots could serve, and those '
'of `tickets` (the ones the client waits on) that are no longer queued, e.g. because a release '
'handed them their lease. A backstop for lost notifications. A client that stops calling it '
'leaves the queue by itself.';

REVOKE ALL ON FUNCTION pgslots._hand_off(uuid, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgslots.heartbeat(uuid, bigint[]) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_user') THEN
        GRANT EXECUTE ON FUNCTION pgslots.heartbeat(uuid, bigint[]) TO pgslots_user;
    END IF;
END
$$;

CREATE OR REPLACE VIEW pgslots.status AS
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
       l.denied_slots + coalesce((SELECT r.denied_slots FROM pgslots.refusals r WHERE r.limit_id = l.id), 0)
           AS denied_slots,
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
REVOKE ALL ON pgslots.refusals FROM PUBLIC;
