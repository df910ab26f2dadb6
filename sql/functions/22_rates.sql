-- Rate slots: rate_limit and reserve (one decision, _admit, for rate slots; a reservation also
-- leaves the row that settle needs), and settle, which makes a reservation's cost final.

-- rate_limit and reserve answer declared row types, not OUT parameters (migrations 0020 and 0021),
-- and so does _rate, the decision both call: rate_limit takes its answer in an assignment, not a
-- statement.
CREATE FUNCTION pgslots._rate(names text[], slots integer, strict boolean, ticket bigint, queue_client uuid,
                              wait_seconds float8, priority integer, fairness_key text, reserving boolean)
RETURNS pgslots.reserved
LANGUAGE plpgsql
AS $$
DECLARE
    a pgslots.reserved;   -- the answer
    prior text := pgslots._bound_waits(wait_seconds);
    d pgslots.decision;
    cfg pgslots.settings;
    at timestamptz;
BEGIN
    IF priority IS DISTINCT FROM 0 OR fairness_key IS NOT NULL THEN
        PERFORM pgslots._check_queue_args(priority, fairness_key);
    END IF;
    IF reserving THEN
        a.reservation_id := gen_random_uuid();
    END IF;
    -- Stage 1 of admission (20_admission.sql): one decay limit with room, or a template's new key.
    IF ticket IS NULL AND cardinality(names) = 1 AND slots > 0 THEN
        SELECT * INTO cfg FROM pgslots.settings;
        at := pgslots._clock(cfg.clock_offset);
        d.lease_limits := ARRAY[coalesce(
            pgslots._fast_grant(names[1], slots, coalesce(priority, 0), fairness_key, cfg.priority_aging_seconds, at, true),
            pgslots._fast_new_key(names[1], slots, coalesce(priority, 0), fairness_key, cfg, at, true))];
        IF d.lease_limits[1] IS NOT NULL THEN
            d.granted := true;
            d.missing := '{}';
        END IF;
    END IF;
    IF d.granted IS NULL THEN
        d := pgslots._admit(names, slots, NULL, NULL, strict, ticket, queue_client, true, NULL, NULL,
                            coalesce(priority, 0), fairness_key, a.reservation_id);
    END IF;
    a := (d.granted, d.retry_after, d.missing, d.blocked_by, d.waiter, a.reservation_id)::pgslots.reserved;
    -- A reservation that counted on no limit (its names have none, or none is active) has nothing
    -- to settle: nothing is stored, and reservation_id is NULL.
    IF reserving AND a.granted AND cardinality(d.lease_limits) > 0 THEN
        IF at IS NULL THEN
            SELECT * INTO cfg FROM pgslots.settings;
            at := pgslots._clock(cfg.clock_offset);
        END IF;
        INSERT INTO pgslots.reservations (id, limit_ids, slots, reserved_at, expires_at, owner, held, held_at, shard)
        VALUES (a.reservation_id, d.lease_limits, slots, at, at + make_interval(secs => cfg.reservation_seconds), session_user,
                array_fill(slots::float8, ARRAY[cardinality(d.lease_limits)]), at, pg_backend_pid() % 16);
        PERFORM pgslots._count_reservation(a.reservation_id, at, cfg);
    ELSE
        a.reservation_id := NULL;
    END IF;
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    RETURN a;
END
$$;

CREATE FUNCTION pgslots.rate_limit(
    names text[],
    slots integer DEFAULT 1,
    strict boolean DEFAULT false,
    ticket bigint DEFAULT NULL,
    queue_client uuid DEFAULT NULL,
    wait_seconds float8 DEFAULT NULL,
    priority integer DEFAULT 0,
    fairness_key text DEFAULT NULL)
RETURNS pgslots.rated
LANGUAGE plpgsql   -- not sql: PL/pgSQL keeps its plan across calls
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of 30_slots.sql
SET jit = off
AS $$
DECLARE
    r pgslots.reserved := pgslots._rate(names, slots, strict, ticket, queue_client, wait_seconds, priority,
                                        fairness_key, false);
BEGIN
    RETURN (r.granted, r.retry_after, r.missing, r.blocked_by, r.waiter)::pgslots.rated;
END
$$;
COMMENT ON FUNCTION pgslots.rate_limit(text[], integer, boolean, bigint, uuid, float8, integer, text) IS
'Non-blocking rate limit: occupies `slots` on every active limit in `names`, which then decay at '
'each limit''s slot_decay_per_second, or leave a window limit''s window window_seconds after the '
'grant. Refused: retry_after is the exact wait until they fit. Inside the caller''s transaction, a '
'rollback gives the slots back. '
'Template keys, ticket, queue_client, wait_seconds, priority and fairness_key as for acquire.';

CREATE FUNCTION pgslots.reserve(
    names text[],
    slots integer DEFAULT 1,
    strict boolean DEFAULT false,
    ticket bigint DEFAULT NULL,
    queue_client uuid DEFAULT NULL,
    wait_seconds float8 DEFAULT NULL,
    priority integer DEFAULT 0,
    fairness_key text DEFAULT NULL)
RETURNS pgslots.reserved
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of 30_slots.sql
SET jit = off
AS $$
BEGIN
    RETURN pgslots._rate(names, slots, strict, ticket, queue_client, wait_seconds, priority, fairness_key, true);
END
$$;
COMMENT ON FUNCTION pgslots.reserve(text[], integer, boolean, bigint, uuid, float8, integer, text) IS
'rate_limit with a cost known only later: occupies `slots` (the estimate) like rate_limit and, when '
'granted, returns a reservation_id to pass to settle with the actual cost, within '
'settings.reservation_seconds (default 3600). A reservation never settled costs its estimate.';

-- Counts a new reservation in its role's shard, and keeps the role within max_reservations_per_role:
-- first its reservations of this shard past settling go (a few at a time, more than one reserve
-- adds), then, while the role has more than its most, its oldest of this shard (they can no longer
-- be settled: their estimates stay their costs). Never waits for a row another call holds.
CREATE FUNCTION pgslots._count_reservation(new_id uuid, at timestamptz, cfg pgslots.settings) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    mine smallint := pg_backend_pid() % 16;
    total bigint;
    gone bigint;
BEGIN
    INSERT INTO pgslots.role_reservations AS c (owner, shard, open) VALUES (session_user, mine, 1)
    ON CONFLICT (owner, shard) DO UPDATE SET open = c.open + 1;
    WITH old AS (
        DELETE FROM pgslots.reservations r
        WHERE r.id IN (SELECT x.id FROM pgslots.reservations x
                       WHERE x.owner = session_user AND x.shard = mine
                         AND x.reserved_at <= at - make_interval(secs => cfg.reservation_seconds)
                         AND x.expires_at <= at
                       ORDER BY x.reserved_at LIMIT 8 FOR UPDATE SKIP LOCKED)
        RETURNING 1)
    SELECT count(*) INTO gone FROM old;
    total := (SELECT sum(c.open) FROM pgslots.role_reservations c WHERE c.owner = session_user) - gone;
    IF total > cfg.max_reservations_per_role THEN
        WITH oldest AS (
            DELETE FROM pgslots.reservations r
            WHERE r.id IN (SELECT x.id FROM pgslots.reservations x
                           WHERE x.owner = session_user AND x.shard = mine AND x.id <> new_id
                           ORDER BY x.reserved_at
                           LIMIT least(8, total - cfg.max_reservations_per_role) FOR UPDATE SKIP LOCKED)
            RETURNING 1)
        SELECT gone + count(*) INTO gone FROM oldest;
    END IF;
    IF gone > 0 THEN
        UPDATE pgslots.role_reservations c SET open = greatest(0, c.open - gone)
        WHERE c.owner = session_user AND c.shard = mine;
    END IF;
END
$$;

CREATE FUNCTION pgslots.settle(reservation_id uuid, actual float8, wait_seconds float8 DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
-- Per limit, what the reservation still holds there decides a refund: on a bucket, `held` (its
-- slots at held_at) decays at the limit's rate as if its own slots left first, so a refund never
-- gives back slots that already left the bucket; on a window limit, its grant still in the window.
-- A debt is capped so that the limit's rate slots stay within twice its limit: a debt closes a
-- limit for at most twice the time a full bucket takes to drain, or until its grant leaves the
-- window.
DECLARE
    prior text := pgslots._bound_waits(wait_seconds);
    r record;
    diff float8;
    at timestamptz;
    lim record;
    holds float8[];
    since timestamptz;
    kept float8;
    moved float8;
    room float8;
    cost float8;
    used float8;
    g record;
BEGIN
    IF actual IS NULL OR NOT (actual >= 0 AND actual <= 1e9) THEN
        RAISE EXCEPTION 'actual must be a number of slots from 0 to 1000000000, got %.', coalesce(actual::text, 'NULL')
            USING ERRCODE = 'PS011', HINT = 'Pass what the reserved work really cost, e.g. the tokens it used.';
    END IF;
    -- Another role's reservation is as unknown as one never made: its id proves nothing.
    SELECT * INTO r FROM pgslots.reservations x
    WHERE x.id = settle.reservation_id AND x.owner = session_user FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Reservation % is unknown: it was never made by this role, or it can no longer be settled and was removed.',
            coalesce(reservation_id::text, 'NULL')
            USING ERRCODE = 'PS017',
                  HINT = 'Settle the reservation_id that reserve returned, within reservation_seconds of the reserve.';
    END IF;
    at := pgslots._now();
    IF r.expires_at <= at THEN
        RAISE EXCEPTION 'Reservation % expired at %: it can be settled for % seconds after it was made, and its estimate (% slots) stays its cost.',
            reservation_id, r.expires_at, date_part('epoch', r.expires_at - r.reserved_at), r.slots
            USING ERRCODE = 'PS017',
                  HINT = 'Settle sooner, or raise settings.reservation_seconds.';
    END IF;
    diff := actual - r.slots;   -- 0: settled with this value already, nothing changes
    holds := coalesce(r.held, array_fill(r.slots, ARRAY[cardinality(r.limit_ids)]));
    since := coalesce(r.held_at, r.reserved_at);
    FOR lim IN SELECT l.id, l."limit", l.slot_decay_per_second, l.window_seconds, l.margin_seconds, u.ord::integer AS ord
               FROM pgslots.limits l JOIN unnest(r.limit_ids) WITH ORDINALITY AS u(id, ord) ON u.id = l.id
               WHERE diff <> 0 ORDER BY l.id FOR UPDATE OF l LOOP
        IF lim.window_seconds > 0 THEN
            -- The cost counts when the grant was made: while that grant is in the window.
            PERFORM pgslots._window_purge(lim.id, pgslots._span(lim.window_seconds, lim.margin_seconds), at);
            SELECT x.id, x.granted_at, x.slots INTO g FROM pgslots.window_grants x
            WHERE x.limit_id = lim.id AND x.reservation_id = settle.reservation_id;
            IF FOUND THEN
                room := pgslots._debt_room(lim."limit", (SELECT l.unleased_slots FROM pgslots.limits l WHERE l.id = lim.id));
                -- The grant's new cost: `actual` itself when nothing capped it (exact), else capped.
                cost := CASE WHEN g.slots = r.slots AND diff <= room THEN actual
                             WHEN diff < 0 THEN greatest(0, g.slots + diff)
                             ELSE g.slots + least(diff, room) END;
                PERFORM pgslots._window_settle(lim.id, g.id, g.granted_at, cost);
                UPDATE pgslots.limits l SET unleased_slots = greatest(0, l.unleased_slots + (cost - g.slots))
                WHERE l.id = lim.id;
            END IF;
        ELSIF lim.slot_decay_per_second > 0 THEN
            kept := greatest(0, holds[lim.ord] - lim.slot_decay_per_second * greatest(0, date_part('epoch', at - since)));
            SELECT pgslots._unleased(l, at) INTO used
            FROM pgslots.limits l WHERE l.id = lim.id;
            moved := CASE WHEN diff < 0 THEN greatest(diff, -least(kept, used))
                          ELSE least(diff, pgslots._debt_room(lim."limit", used)) END;
            UPDATE pgslots.limits l SET unleased_slots = greatest(0, used + moved), decayed_at = at
            WHERE l.id = lim.id;
            holds[lim.ord] := greatest(0, kept + moved);
        END IF;
        IF diff < 0 THEN
            PERFORM pgslots._wake(lim.id, at);
        END IF;
    END LOOP;
    IF diff <> 0 THEN
        UPDATE pgslots.reservations x SET slots = actual, held = holds, held_at = at WHERE x.id = r.id;
    END IF;
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    RETURN diff <> 0;
END
$$;
COMMENT ON FUNCTION pgslots.settle(uuid, float8, float8) IS
'Makes `actual` (0 to 1e9) the final cost of a reservation: each of its limits changes by actual '
'minus the cost settled last (the estimate at first): a refund when lower, a debt that must decay, '
'or leave the window with the grant, when higher. A refund gives back only what the reservation '
'still holds (on a bucket, its slots that have not decayed yet; on a window limit, its grant while '
'in the window), never below empty. A debt stops where the limit''s rate slots reach twice its '
'limit. Settling again with the same value changes nothing and returns false; true when the cost '
'changed. Only the role that reserved can settle, within settings.reservation_seconds: otherwise '
'SQLSTATE PS017.';
