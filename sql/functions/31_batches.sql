-- Batches: the concurrent acquires (or releases) of one process's tasks sent as one call, decided
-- in one transaction. Each acquire request is decided in turn by acquire itself, exactly as if the
-- requests had been sent one after another: all-or-nothing per request, a refused request queued
-- (with its queue_client) before the next one is asked, so that no later request overtakes it; each
-- granted request gets its own lease and fencing token. Releases of leases on one limit are done
-- together (see release_each). One transaction means one commit, and one wait for the WAL flush,
-- for the whole batch.
--
-- A batch keeps every lock its requests took until it commits, so it first locks the rows of all
-- the limits it names, in id order, as _admit does for one request. Otherwise a refused request
-- would hold its limit's queue lock (stage 2 takes it shared) while a later request of the batch
-- waited for that limit's row, which a release may hold while it waits for the queue lock: both
-- would wait for the deadlock detector. Row locks first, then queue locks, like every release.

-- At most this many requests per batch: a batch holds the row locks of its limits until it commits.
CREATE FUNCTION pgslots._most_per_batch() RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$ SELECT 1000 $$;

-- A run of plain requests on one limit (one name, no ticket, queued, no priority or fairness key)
-- is decided by acquire for its first request; once that one was refused and queued, the requests
-- after it on the same limit go straight to the queued refusal stage (_queue_refusal), which still
-- decides each of them (room for it behind the queue: acquire decides it instead) but without
-- looking again for leases to take back: the batch holds the limit's row, so its leases have not
-- changed since the first request looked (one may have expired meanwhile, milliseconds ago: it is
-- taken back by the next call that finds it). A refused request so costs a third of an acquire.
-- Any other request naming the limit ends the run.
CREATE FUNCTION pgslots.acquire_each(requests jsonb, wait_seconds float8 DEFAULT NULL)
RETURNS TABLE (granted boolean, lease_id uuid, fencing_token bigint, expires_at timestamptz, retry_after float8,
               missing text[], blocked_by text[], waiter bigint, liveness_seconds float8)
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of 30_slots.sql
SET jit = off
AS $$
DECLARE
    r jsonb;
    commit_mode text := current_setting('synchronous_commit');
    prior text;
    cfg pgslots.settings;
    runs jsonb := '{}';   -- the limits (by name) on which a run of plain refusals is going on
    name text;
    plain boolean;
    slots integer;
    lease_seconds float8;
    session uuid;
    checked uuid;   -- the last session whose owner _check_caller accepted
    d pgslots.decision;
BEGIN
    IF jsonb_typeof(requests) IS DISTINCT FROM 'array' OR jsonb_array_length(requests) > pgslots._most_per_batch() THEN
        RAISE EXCEPTION 'requests must be a JSON array of at most % acquire requests, got %.', pgslots._most_per_batch(),
            CASE WHEN jsonb_typeof(requests) = 'array' THEN jsonb_array_length(requests) || ' requests'
                 ELSE coalesce(jsonb_typeof(requests), 'NULL') END
            USING ERRCODE = 'PS002',
                  HINT = 'Each element: {"names": [...], "slots": n, "lease_seconds": s, "holder": {...}, "strict": b, '
                         '"ticket": t, "queue_client": id, "new_lease_id": id, "session": id, "priority": p, "fairness_key": k}.';
    END IF;
    -- The bound stays over the whole batch (each acquire sets and puts back its own).
    prior := pgslots._bound_waits(wait_seconds);
    PERFORM 1 FROM pgslots.limits l
    WHERE l.name IN (SELECT jsonb_array_elements_text(e -> 'names') FROM jsonb_array_elements(requests) AS e
                     WHERE jsonb_typeof(e -> 'names') = 'array')
    ORDER BY l.id FOR UPDATE;
    SELECT * INTO cfg FROM pgslots.settings;
    FOR r IN SELECT a.e FROM jsonb_array_elements(requests) WITH ORDINALITY AS a(e, i) ORDER BY a.i LOOP
        IF jsonb_typeof(r) IS DISTINCT FROM 'object' OR jsonb_typeof(r -> 'names') IS DISTINCT FROM 'array' THEN
            RAISE EXCEPTION 'Each request must be a JSON object with "names", an array of limit names; got %.', left(r::text, 80)
                USING ERRCODE = 'PS002';
        END IF;
        name := CASE WHEN jsonb_array_length(r -> 'names') = 1 THEN r -> 'names' ->> 0 END;
        plain := name IS NOT NULL AND r ->> 'ticket' IS NULL AND r ->> 'queue_client' IS NOT NULL
                 AND coalesce((r ->> 'priority')::integer, 0) = 0 AND r ->> 'fairness_key' IS NULL;
        IF plain AND runs ? name THEN
            slots := coalesce((r ->> 'slots')::integer, 1);
            lease_seconds := coalesce((r ->> 'lease_seconds')::float8, 300);
            session := (r ->> 'session')::uuid;
            IF slots > 0 AND pgslots._lease_seconds_ok(lease_seconds, cfg) THEN
                IF session IS NOT NULL AND session IS DISTINCT FROM checked THEN
                    PERFORM pgslots._check_caller(0, NULL, session);
                    checked := session;
                END IF;
                d := pgslots._queue_refusal(name, slots, (r ->> 'queue_client')::uuid, (r ->> 'new_lease_id')::uuid,
                                            lease_seconds, nullif(r -> 'holder', 'null'::jsonb), session, 0, NULL, cfg,
                                            pgslots._clock(cfg.clock_offset), true);
                IF d.waiter IS NOT NULL THEN
                    SELECT false, NULL, NULL, NULL, d.retry_after, d.missing, d.blocked_by, d.waiter,
                           CASE WHEN session IS NOT NULL THEN cfg.liveness_seconds END
                    INTO granted, lease_id, fencing_token, expires_at, retry_after, missing, blocked_by, waiter, liveness_seconds;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
            END IF;
        END IF;
        runs := runs - ARRAY(SELECT jsonb_array_elements_text(r -> 'names'));
        SELECT a.granted, a.lease_id, a.fencing_token, a.expires_at, a.retry_after, a.missing, a.blocked_by, a.waiter,
               a.liveness_seconds
        INTO granted, lease_id, fencing_token, expires_at, retry_after, missing, blocked_by, waiter, liveness_seconds
        FROM pgslots.acquire(
            ARRAY(SELECT jsonb_array_elements_text(r -> 'names')),
            coalesce((r ->> 'slots')::integer, 1),
            coalesce((r ->> 'lease_seconds')::float8, 300),
            nullif(r -> 'holder', 'null'::jsonb),
            coalesce((r ->> 'strict')::boolean, false),
            (r ->> 'ticket')::bigint,
            (r ->> 'queue_client')::uuid,
            (r ->> 'new_lease_id')::uuid,
            wait_seconds,
            (r ->> 'session')::uuid,
            coalesce((r ->> 'priority')::integer, 0),
            r ->> 'fairness_key') a;
        RETURN NEXT;
        IF plain AND NOT granted AND waiter IS NOT NULL THEN
            runs := runs || jsonb_build_object(name, true);
        END IF;
    END LOOP;
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    -- A refusal lets its transaction commit without waiting for the WAL flush (_refuse): the grants
    -- of the same batch must not, so the batch commits as the caller's session would.
    PERFORM set_config('synchronous_commit', commit_mode, true);
END
$$;
COMMENT ON FUNCTION pgslots.acquire_each(jsonb, float8) IS
'Several acquires in one call and one transaction, decided in order as if sent one after another: '
'one row per request, in order, as acquire answers it. requests: a JSON array (at most 1000) of '
'objects with acquire''s arguments by name (names is required). wait_seconds bounds each lock wait.';

CREATE FUNCTION pgslots.release_each(lease_ids uuid[], wait_seconds float8 DEFAULT NULL)
RETURNS TABLE (lease_id uuid, released boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of 30_slots.sql
SET jit = off
AS $$
DECLARE
    prior text;
    locked uuid[];
    at timestamptz;
    one record;
    average float8;
    capacity integer;
    held float8;
    done uuid[] := '{}';
BEGIN
    IF lease_ids IS NULL OR cardinality(lease_ids) > pgslots._most_per_batch() THEN
        RAISE EXCEPTION 'lease_ids must be an array of at most % lease ids, got %.', pgslots._most_per_batch(),
            coalesce(cardinality(lease_ids)::text, 'NULL')
            USING ERRCODE = 'PS002';
    END IF;
    -- The rows of the limits of every lease (and of every queued request that named one), in id
    -- order, before any release takes a queue lock (see above).
    prior := pgslots._bound_waits(wait_seconds);
    locked := ARRAY(SELECT l.id FROM pgslots.limits l
                    WHERE l.id IN (SELECT x.limit_id FROM pgslots.leases x WHERE x.id = ANY (lease_ids)
                                   UNION ALL
                                   SELECT w.limit_id FROM pgslots.waiters w WHERE w.lease_id = ANY (lease_ids))
                    ORDER BY l.id FOR UPDATE);
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    -- Leases on one limit whose row this call holds (nobody can reclaim them meanwhile) go together:
    -- each such limit's count and occupancy are written once, and its queue is served once, by one
    -- hand-off of all the slots freed on it. The queue gets the same grants, in the same order, as
    -- from one release after another; a limit's row written once is what makes a batch cheap, as
    -- every update of one row within a transaction lengthens the chain the next one walks.
    at := pgslots._now();
    FOR one IN
        WITH gone AS (
            DELETE FROM pgslots.leases x
            WHERE x.id = ANY (lease_ids) AND x.parts = 1 AND x.limit_id = ANY (locked)
            RETURNING x.id, x.limit_id, x.slots, x.acquired_at
        )
        SELECT g.limit_id, sum(g.slots)::integer AS slots, array_agg(g.id) AS ids,
               array_agg(pg_catalog.date_part('epoch', at - g.acquired_at) ORDER BY g.acquired_at) AS held
        FROM gone g GROUP BY g.limit_id ORDER BY g.limit_id
    LOOP
        SELECT l.avg_slot_occupancy_seconds, l."limit" INTO average, capacity FROM pgslots.limits l WHERE l.id = one.limit_id;
        FOREACH held IN ARRAY one.held LOOP
            average := pgslots._occupancy_after(average, held, capacity);
        END LOOP;
        UPDATE pgslots.limits l
        SET leased_slots = greatest(0, l.leased_slots - one.slots), avg_slot_occupancy_seconds = average
        WHERE l.id = one.limit_id;
        done := done || one.ids;
        PERFORM pgslots._lock_queue(one.limit_id);
        IF EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = one.limit_id) THEN
            PERFORM pgslots._hand_off(one.limit_id, at);
        END IF;
    END LOOP;
    -- The rest one at a time (leases on several limits, queued requests that named a lease, ids
    -- of nothing), durably: the batch waits for one WAL flush, so a hand-off it makes is never lost.
    -- An id named twice is released once.
    RETURN QUERY
    SELECT i.id, CASE WHEN i.id = ANY (done) THEN i.first ELSE pgslots.release(i.id, true, wait_seconds) END
    FROM (SELECT u.id, u.n, u.n = min(u.n) OVER (PARTITION BY u.id) AS first
          FROM unnest(lease_ids) WITH ORDINALITY AS u(id, n)) i
    ORDER BY i.n;
END
$$;
COMMENT ON FUNCTION pgslots.release_each(uuid[], float8) IS
'Several releases in one call and one transaction: one row per lease id, in order (released: false '
'when it was not held, or was named earlier in the same call). At most 1000.';
