-- Slots: release, renew and sweep, what a holder (or an operator) does with a lease.
--
-- The hot path's entry points (release, renew, renew_leases here; acquire, rate_limit, reserve,
-- acquire_each, release_each and keep_alive) look rows up by key, and run with enable_seqscan off (and jit
-- off, which a statement with no index to use would otherwise trigger with the cost enable_seqscan
-- gives it). PostgreSQL prices a lookup at the index's pages divided by the table's live rows: a
-- busy table's index, grown by churn between vacuums, with a few live leases, is priced above a
-- scan of the whole table. Then every release read every page of `leases` twice (vacuum keeps the
-- pages, migration 0018), every refused acquire that queues did so to look for leases to take
-- back, and no index scan marked the dead entries for reuse, so the index kept growing. Measured
-- in the server alone on such a table (462 pages, an index of 1,423, 11 live leases): 230 us an
-- uncontended cycle, 163 us with the lookups by key (tests/sql/test_sql_plans.py).

CREATE FUNCTION pgslots.release(lease_id uuid, durable boolean DEFAULT true,
                                wait_seconds float8 DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of this file
SET jit = off
AS $$
DECLARE
    at timestamptz;
    part record;
    released boolean := false;
    handed integer := 0;
    commit_mode text;
    target uuid;
    freed integer;
    held_since timestamptz;
    prior text;
BEGIN
    -- The settings below are made in assignments, not calls or PERFORMs, each of which would cost
    -- every release a statement of its own.
    IF wait_seconds IS NOT NULL THEN
        prior := pg_catalog.current_setting('lock_timeout');
        prior := pgslots._set_lock_timeout(wait_seconds, prior);
    END IF;
    IF NOT durable THEN
        -- Commit without waiting for the WAL flush. A crash may then forget this release, which
        -- keeps the slot taken until its lease expires: slower, never over-admitting. (set_config
        -- answers the new setting, never NULL: commit_mode keeps the one it replaced.)
        commit_mode := pg_catalog.current_setting('synchronous_commit');
        commit_mode := CASE WHEN pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL THEN commit_mode END;
    END IF;
    -- The common case first: a lease on one limit, found by its key (id, part). Then its limit's
    -- row is locked by the UPDATE (the only row lock this release needs), then the lease row goes.
    -- Had a reclaim removed the lease meanwhile (it expired, and a full limit took its slots back),
    -- the count is put back as it was. Each statement names one table by its key: whatever the
    -- table's statistics say after a vacuum (few live leases, many pages), no plan can prefer
    -- another index or a scan, as a join of leases and limits did.
    SELECT x.limit_id, x.slots, x.acquired_at INTO target, freed, held_since
    FROM pgslots.leases x WHERE x.id = release.lease_id AND x.part = 1 AND x.parts = 1;
    IF FOUND THEN
        UPDATE pgslots.limits l
        SET leased_slots = greatest(0, l.leased_slots - freed),
            avg_slot_occupancy_seconds = pgslots._occupancy_after(l.avg_slot_occupancy_seconds,
                pg_catalog.date_part('epoch', pgslots._clock(s.clock_offset) - held_since), l."limit")
        FROM pgslots.settings s
        WHERE l.id = target;
        DELETE FROM pgslots.leases x WHERE x.id = release.lease_id AND x.part = 1;
        IF FOUND THEN
            released := pgslots._lock_queue(target);   -- true; the lock is held before the queue is read
            IF EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = target) THEN
                handed := pgslots._hand_off(target, pgslots._now());
            END IF;
        ELSE
            UPDATE pgslots.limits l SET leased_slots = l.leased_slots + freed WHERE l.id = target;
        END IF;
    ELSE
        -- The limits of the lease, and of a queued request that named it: a release handing it
        -- over right now holds their locks, and the statements below then see what it wrote.
        PERFORM 1 FROM pgslots.limits l
        WHERE l.id IN (SELECT x.limit_id FROM pgslots.leases x WHERE x.id = release.lease_id
                       UNION ALL
                       SELECT w.limit_id FROM pgslots.waiters w WHERE w.lease_id = release.lease_id)
        ORDER BY l.id FOR UPDATE;
        at := pgslots._now();
        FOR part IN DELETE FROM pgslots.leases x WHERE x.id = release.lease_id
                    RETURNING x.limit_id, x.slots, x.acquired_at LOOP
            released := true;
            UPDATE pgslots.limits l
            SET leased_slots = greatest(0, l.leased_slots - part.slots),
                avg_slot_occupancy_seconds = pgslots._occupancy_after(
                    l.avg_slot_occupancy_seconds, pg_catalog.date_part('epoch', at - part.acquired_at), l."limit")
            WHERE l.id = part.limit_id;
            PERFORM pgslots._lock_queue(part.limit_id);
            IF EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = part.limit_id) THEN
                handed := handed + pgslots._hand_off(part.limit_id, at);
            END IF;
        END LOOP;
        IF NOT released THEN
            -- Not granted yet: the caller gave up on a queued request. Take it out of the queue, so
            -- that no release can hand it the lease later; those behind may fit now.
            FOR part IN DELETE FROM pgslots.waiters w WHERE w.lease_id = release.lease_id
                        RETURNING w.limit_id, w.refused LOOP
                PERFORM pgslots._wake(part.limit_id, at);
                IF part.refused THEN
                    PERFORM pgslots._gave_up(ARRAY[part.limit_id]);
                END IF;
            END LOOP;
        END IF;
    END IF;
    IF handed > 0 AND NOT durable THEN
        -- Handing slots over grants a lease: that must survive a crash like any grant.
        PERFORM set_config('synchronous_commit', commit_mode, true);
    END IF;
    IF prior IS NOT NULL AND durable THEN   -- not durable: its own transaction, whose end resets it
        prior := pgslots._reset_lock_timeout(prior);
    END IF;
    RETURN released;
END
$$;
COMMENT ON FUNCTION pgslots.release(uuid, boolean, float8) IS
'Releases a lease''s slots. Idempotent: an unknown or already released lease changes nothing '
'and returns false; a queued request that named this lease (new_lease_id) leaves the queue. The '
'freed slots go straight to the head of the queue when it named its lease (see acquire), else the '
'queued waiters they can serve are notified. durable => false commits without waiting for the WAL '
'flush (use it in its own transaction only) unless slots were handed over: a crash can then delay '
'the slot until its lease expires, but never over-admit. wait_seconds bounds each lock wait as '
'in acquire (with durable => false, until the end of the release''s own transaction).';

CREATE FUNCTION pgslots.renew(lease_id uuid, lease_seconds float8 DEFAULT 300,
                              wait_seconds float8 DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of this file
SET jit = off
AS $$
DECLARE
    cfg pgslots.settings;
    at timestamptz;
    renewed integer;
    expected integer;
    new_expiry timestamptz;
    prior text := pgslots._bound_waits(wait_seconds);
BEGIN
    SELECT * INTO cfg FROM pgslots.settings;
    PERFORM pgslots._check_lease_seconds(lease_seconds, cfg);
    at := pgslots._clock(cfg.clock_offset);
    new_expiry := at + make_interval(secs => lease_seconds);
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
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    RETURN new_expiry;
END
$$;
COMMENT ON FUNCTION pgslots.renew(uuid, float8, float8) IS
'Extends a live lease to now + lease_seconds and returns the new expiry. A lease that expired or '
'was released is lost: renewing it raises SQLSTATE PS010 and changes nothing. wait_seconds bounds '
'each lock wait as in acquire.';

-- Renewals of one process, in one call: every live lease named is extended to now + its
-- lease_seconds; the leases returned are lost (expired, released, or partly taken back), and for
-- those nothing changed. Lease rows are locked in id order, as every batch locks them.
CREATE FUNCTION pgslots.renew_leases(lease_ids uuid[], lease_seconds float8[], wait_seconds float8 DEFAULT NULL)
RETURNS uuid[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of this file
SET jit = off
AS $$
DECLARE
    prior text := pgslots._bound_waits(wait_seconds);
    cfg pgslots.settings;
    at timestamptz;
    lost uuid[];
BEGIN
    IF lease_ids IS NULL OR lease_seconds IS NULL OR cardinality(lease_ids) <> cardinality(lease_seconds)
       OR cardinality(lease_ids) > 10000 THEN
        RAISE EXCEPTION 'renew_leases takes one lease_seconds per lease id, at most 10000 of each, got % ids and % durations.',
            coalesce(cardinality(lease_ids)::text, 'NULL'), coalesce(cardinality(lease_seconds)::text, 'NULL')
            USING ERRCODE = 'PS011', HINT = 'Pass two arrays of the same length, e.g. ARRAY[id1, id2] and ARRAY[300, 300].';
    END IF;
    SELECT * INTO cfg FROM pgslots.settings;
    PERFORM pgslots._check_lease_seconds(s, cfg) FROM unnest(lease_seconds) AS s;
    at := pgslots._clock(cfg.clock_offset);
    WITH wanted AS (
        SELECT DISTINCT ON (u.id) u.id, u.secs FROM unnest(lease_ids, lease_seconds) AS u(id, secs)
        WHERE u.id IS NOT NULL ORDER BY u.id),
    rows_ AS (
        SELECT x.ctid AS row_id, x.id, x.parts, x.expires_at > at AS live FROM pgslots.leases x
        WHERE x.id IN (SELECT w.id FROM wanted w) ORDER BY x.id, x.limit_id FOR UPDATE OF x),
    whole AS (
        SELECT r.id FROM rows_ r GROUP BY r.id HAVING bool_and(r.live) AND count(*) = min(r.parts)),
    renewed AS (
        UPDATE pgslots.leases x SET expires_at = at + make_interval(secs => w.secs)
        FROM wanted w WHERE x.id = w.id AND x.id IN (SELECT h.id FROM whole h)
        RETURNING x.id)
    SELECT coalesce(array_agg(w.id ORDER BY w.id) FILTER (WHERE w.id NOT IN (SELECT h.id FROM whole h)), '{}')
    INTO lost FROM wanted w;
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    RETURN lost;
END
$$;
COMMENT ON FUNCTION pgslots.renew_leases(uuid[], float8[], float8) IS
'Renews many leases in one call: each live lease in lease_ids is extended to now + its lease_seconds '
'(the same position in the second array). Returns the ids that were lost (expired, released, or '
'partly taken back): those changed nothing. At most 10000 leases; wait_seconds as in acquire.';

CREATE FUNCTION pgslots.sweep() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    liveness float8 := (SELECT s.liveness_seconds FROM pgslots.settings s);
    targets uuid[];
    reclaimed integer;
BEGIN
    targets := ARRAY(SELECT l.id FROM pgslots.limits l
                     WHERE l.id IN (SELECT x.limit_id FROM pgslots.leases x
                                    WHERE pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, at, liveness))
                     ORDER BY l.id FOR UPDATE);
    SELECT count(DISTINCT x.id) INTO reclaimed FROM pgslots.leases x
    WHERE x.limit_id = ANY (targets) AND pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, at, liveness);
    PERFORM pgslots._reclaim(t, at) FROM unnest(targets) AS t;
    PERFORM pgslots._wake(t, at) FROM unnest(targets) AS t;
    -- Lease rows of deleted limits, waiters nobody heartbeats any more, and sessions that are gone
    -- and hold nothing.
    DELETE FROM pgslots.leases x WHERE x.expires_at <= at
        AND NOT EXISTS (SELECT 1 FROM pgslots.limits l WHERE l.id = x.limit_id);
    PERFORM pgslots._drop_expired_waiters(NULL, at);
    -- Grants that left their window (of limits nobody is deciding on right now), and reservations
    -- that can no longer be settled.
    PERFORM pgslots._window_purge(l.id, l.span, at)
    FROM (SELECT m.id, pgslots._span(m.window_seconds, m.margin_seconds) AS span FROM pgslots.limits m
          WHERE m.window_seconds > 0
            AND EXISTS (SELECT 1 FROM pgslots.window_grants g
                        WHERE g.limit_id = m.id
                          AND g.granted_at <= at - make_interval(secs => pgslots._span(m.window_seconds, m.margin_seconds)))
          ORDER BY m.id FOR UPDATE SKIP LOCKED) l;
    WITH gone AS (DELETE FROM pgslots.reservations r WHERE r.expires_at <= at RETURNING r.owner, r.shard),
         counted AS (SELECT g.owner, g.shard, count(*) AS n FROM gone g GROUP BY g.owner, g.shard),
         locked AS (SELECT c.owner, c.shard FROM pgslots.role_reservations c
                    WHERE (c.owner, c.shard) IN (SELECT n.owner, n.shard FROM counted n)
                    ORDER BY c.owner, c.shard FOR UPDATE)
    UPDATE pgslots.role_reservations c SET open = greatest(0, c.open - n.n)
    FROM counted n WHERE c.owner = n.owner AND c.shard = n.shard AND (c.owner, c.shard) IN (SELECT * FROM locked);
    -- Instances nobody uses (and retiring ones), and round-robin history of queues now empty.
    PERFORM pgslots._drop_idle(NULL, at, NULL);
    DELETE FROM pgslots.served_keys k
    WHERE NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = k.limit_id);
    DELETE FROM pgslots.sessions s
    WHERE s.seen_at <= at - make_interval(secs => liveness)
      AND NOT EXISTS (SELECT 1 FROM pgslots.leases x WHERE x.session_id = s.id);
    RETURN reclaimed;
END
$$;
COMMENT ON FUNCTION pgslots.sweep() IS
'Reclaims the slots of every expired lease and of every lease whose session died, drops dead '
'waiters and sessions, grants that left their window and reservations past settling, and deletes '
'the instances of templates nobody uses (no lease, no waiter, no rate slot left); returns how many leases it reclaimed. Not required for correctness (a full '
'limit reclaims its own); for cron.';
