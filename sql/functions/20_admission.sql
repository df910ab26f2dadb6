-- Admission: acquire and rate_limit, and the one decision behind both (_admit).
--
-- Every decision is made under the row lock of the limits involved, with the database clock.
-- Rows of pgslots.limits are always locked in id order, by every function that locks more than one,
-- so multi-limit acquires and releases never deadlock. A name with no limit that matches a template
-- gets its instance first (see _create_instances), before any row lock is taken. A refused caller
-- that passes queue_client is queued: waiters of a limit are served in the order of _queue (priority,
-- then round-robin across fairness keys, then first-come), and a request never overtakes the slots
-- of the waiters served before it.

CREATE FUNCTION pgslots._admit(
    names text[], slots integer, lease_seconds float8, holder jsonb, strict boolean,
    ticket bigint, queue_client uuid, for_rate_limit boolean, new_lease_id uuid, session uuid,
    priority integer, fairness_key text, reservation uuid,
    OUT granted boolean, OUT lease_id uuid, OUT fencing_token bigint, OUT expires_at timestamptz,
    OUT retry_after float8, OUT missing text[], OUT blocked_by text[], OUT waiter bigint,
    OUT lease_limits uuid[])
LANGUAGE plpgsql
AS $$
-- A grant returns the limits it counts on in lease_limits: acquire writes a lease row for each,
-- reserve remembers them. A rate-limit grant on a window limit logs the grant (with `reservation`).
-- A shadow limit never refuses: a request it would have refused adds to its shadow_refusals.
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
    windowed uuid[] := '{}';
    shadowed uuid[];
    asked_again boolean;
    created integer := 0;
    vanished text[];
    waited float8;
BEGIN
    SELECT * INTO cfg FROM pgslots.settings;
    IF NOT for_rate_limit THEN
        PERFORM pgslots._check_lease_seconds(lease_seconds, cfg);
        lease_for := make_interval(secs => lease_seconds);
    END IF;
    granted := false;
    missing := '{}';
    -- A ticket counts only for the client and role it was issued to; any other is a new arrival.
    asked_again := ticket IS NOT NULL;
    IF asked_again THEN
        ticket := pgslots._own_ticket(ticket, queue_client);
    END IF;
    waiter := ticket;

    IF names IS NULL OR slots IS NULL OR slots <= 0
       OR EXISTS (SELECT 1 FROM unnest(names) AS n WHERE pgslots._bad_name(n)) THEN
        wanted := pgslots._check_names(names);   -- raises the precise error
        PERFORM pgslots._check_slots(slots);
    END IF;
    IF cardinality(wanted) > 1 THEN
        wanted := pgslots._check_names(wanted);  -- drops repeats
    END IF;
    -- Keys of templates get their instances, before any row lock is taken (see _create_instances).
    IF (SELECT count(*) FROM pgslots.limits l WHERE l.name = ANY (wanted) AND NOT l.retiring)
       < cardinality(wanted) THEN
        created := pgslots._create_instances(wanted, pgslots._clock(cfg.clock_offset));
    END IF;
    -- Lock the named limits in id order, the one order every locker uses, and look at each once.
    FOR lim IN SELECT l.id, l.name, l.active, l."limit", l.slot_decay_per_second, l.is_template,
                      l.window_seconds
               FROM pgslots.limits l WHERE l.name = ANY (wanted) AND NOT l.retiring
               ORDER BY l.id FOR UPDATE LOOP
        IF lim.is_template THEN
            PERFORM pgslots._template_not_acquirable(lim.name);
        END IF;
        found_names := found_names || lim.name;
        CONTINUE WHEN NOT lim.active;
        IF slots > lim."limit" THEN
            RAISE EXCEPTION 'Unable to acquire concurrency slots on %: slots requested is greater than the limit (% > %)',
                pgslots._list_literal(ARRAY[lim.name]), slots, lim."limit"
                USING ERRCODE = 'PS006',
                      HINT = 'Ask for fewer slots or raise the limit; this request can never succeed.';
        END IF;
        IF lim.window_seconds > 0 THEN
            IF NOT for_rate_limit THEN
                RAISE EXCEPTION '% is a window limit (at most % slots in any % s): its slots are never released, so concurrency() cannot hold them. Use rate_limit() or reserve() on it.',
                    quote_literal(lim.name), lim."limit", lim.window_seconds
                    USING ERRCODE = 'PS018',
                          HINT = 'Use rate_limit() (or reserve()) on a window limit; concurrency() needs a limit without a window.';
            END IF;
            windowed := windowed || lim.id;
        ELSIF for_rate_limit AND lim.slot_decay_per_second <= 0 THEN
            no_decay := no_decay || lim.name;
        END IF;
        ids := ids || lim.id;
    END LOOP;
    at := pgslots._clock(cfg.clock_offset);

    -- A queued waiter asking again may have been granted its named lease by a release meanwhile
    -- (its notification lost or not read yet; its ticket left the queue then): that lease is the
    -- answer, renewed to full length. The lease id, known to its holder alone, is the proof.
    IF asked_again AND new_lease_id IS NOT NULL AND NOT for_rate_limit THEN
        UPDATE pgslots.leases x SET expires_at = at + lease_for
        WHERE x.id = new_lease_id AND x.limit_id = ANY (ids)
        RETURNING x.fencing_token, x.expires_at INTO fencing_token, expires_at;
        IF FOUND THEN
            granted := true;
            lease_id := new_lease_id;
            IF ticket IS NOT NULL THEN
                DELETE FROM pgslots.waiters w WHERE w.id = ticket;
            END IF;
            RETURN;
        END IF;
    END IF;

    IF cardinality(found_names) < cardinality(wanted) THEN
        missing := ARRAY(SELECT n FROM unnest(wanted) AS n WHERE n <> ALL (found_names));
        -- An idle instance deleted (by sweep) between its lookup and its lock: ask again at once,
        -- and it is created afresh. Not here: no instance is created under row locks.
        vanished := ARRAY(SELECT n FROM unnest(missing) AS n WHERE pgslots._template_for(n) IS NOT NULL);
        IF cardinality(vanished) > 0 THEN
            missing := '{}';
            retry_after := 0;
            blocked_by := vanished;
            RETURN;
        END IF;
        IF strict THEN
            RAISE EXCEPTION 'Concurrency limits % must be created before acquiring slots',
                pgslots._list_literal(missing)
                USING ERRCODE = 'PS008', HINT = 'Create the limits first (create_limit), or acquire without strict.';
        END IF;
    END IF;
    IF cardinality(no_decay) > 0 THEN
        RAISE EXCEPTION 'Only concurrency limits with slot decay can be used for rate limiting. The following limits do not have a decay configured: %',
            (SELECT string_agg(quote_literal(n), ', ') FROM unnest(no_decay) AS n)
            USING ERRCODE = 'PS009',
                  HINT = 'Give the limits a slot_decay_per_second or a window_seconds above 0 (update_limit).';
    END IF;
    IF cardinality(ids) = 0 THEN
        granted := true;   -- nothing active to enforce
        RETURN;
    END IF;

    -- Grants that have left their window no longer count.
    PERFORM pgslots._window_purge(l.id, l.window_seconds, at)
    FROM pgslots.limits l WHERE l.id = ANY (windowed);

    -- Decide; on a refusal, reclaim expired leases of the limits that refused and decide again.
    FOR attempt IN 1..2 LOOP
        blocked := '{}';
        shadowed := '{}';
        retry_after := 0;
        FOR lim IN SELECT l.id, l."limit", l.leased_slots, l.slot_decay_per_second,
                          l.avg_slot_occupancy_seconds, l.window_seconds, l.shadow,
                          pgslots._shortfall(l."limit", l.leased_slots,
                              pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at),
                              pgslots._ahead(l.id, at, cfg.priority_aging_seconds, ticket, priority,
                                             fairness_key),
                              slots) AS short
                   FROM pgslots.limits l WHERE l.id = ANY (ids) LOOP
            IF pgslots._fits(lim.short) THEN
                CONTINUE;
            ELSIF lim.shadow THEN
                shadowed := shadowed || lim.id;
            ELSE
                blocked := blocked || lim.id;
                retry_after := greatest(retry_after, CASE WHEN lim.window_seconds > 0
                    THEN pgslots._window_wait(lim.id, lim.short, lim.window_seconds, at)
                    ELSE pgslots._retry_after(lim.short, lim."limit", lim.leased_slots, slots,
                                              lim.slot_decay_per_second, lim.avg_slot_occupancy_seconds) END);
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
        IF ticket IS NOT NULL THEN   -- a queued waiter: how long it waited counts
            waited := (SELECT date_part('epoch', at - min(w.enqueued_at)) FROM pgslots.waiters w WHERE w.id = ticket);
        END IF;
        IF for_rate_limit THEN
            UPDATE pgslots.limits l
            SET unleased_slots = pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at)
                                 + slots,
                decayed_at = at, grants_total = l.grants_total + 1,
                wait_seconds_total = l.wait_seconds_total + coalesce(waited, 0)
            WHERE l.id = ANY (ids);
            INSERT INTO pgslots.window_grants (limit_id, granted_at, slots, reservation_id)
            SELECT w, at, slots, reservation FROM unnest(windowed) AS w;
            lease_limits := ids;
        ELSE
            lease_id := coalesce(new_lease_id, gen_random_uuid());
            fencing_token := nextval('pgslots.fencing_tokens');
            expires_at := at + lease_for;
            lease_limits := ids;
            UPDATE pgslots.limits l
            SET leased_slots = l.leased_slots + slots, grants_total = l.grants_total + 1,
                wait_seconds_total = l.wait_seconds_total + coalesce(waited, 0)
            WHERE l.id = ANY (ids);
        END IF;
        IF ticket IS NOT NULL THEN
            DELETE FROM pgslots.waiters w WHERE w.id = ticket;
        END IF;
        IF cardinality(shadowed) > 0 THEN
            UPDATE pgslots.limits l SET shadow_refusals = l.shadow_refusals + 1 WHERE l.id = ANY (shadowed);
        END IF;
        PERFORM pgslots._served(ids, fairness_key, at);
        IF created > 0 THEN
            -- New keys come and go: each new instance takes a few idle ones of its template away.
            PERFORM pgslots._drop_idle(t.template_id, at, 4)
            FROM (SELECT DISTINCT l.template_id FROM pgslots.limits l
                  WHERE l.id = ANY (ids) AND l.template_id IS NOT NULL) t;
        END IF;
        RETURN;
    END IF;

    -- A refusal writes only pressure and a queue place; losing those in a crash costs nothing, so
    -- its commit need not wait for the WAL flush while it holds the limit's row lock.
    PERFORM set_config('synchronous_commit', 'off', true);
    blocked_by := ARRAY(SELECT l.name FROM pgslots.limits l WHERE l.id = ANY (blocked) ORDER BY l.name);
    PERFORM pgslots._count_refusal(blocked, slots);
    IF queue_client IS NOT NULL THEN
        waiter := coalesce(ticket, nextval('pgslots.waiter_tickets'));
        PERFORM pgslots._enqueue(waiter, ids, slots, queue_client, at, cfg.waiter_ttl_seconds,
                                 new_lease_id, lease_seconds, holder, session, priority, fairness_key);
        DELETE FROM pgslots.waiters w
        WHERE w.limit_id = ANY (blocked) AND w.expires_at <= at;
    END IF;
END
$$;

CREATE FUNCTION pgslots.acquire(
    names text[],
    slots integer DEFAULT 1,
    lease_seconds float8 DEFAULT 300,
    holder jsonb DEFAULT NULL,
    strict boolean DEFAULT false,
    ticket bigint DEFAULT NULL,
    queue_client uuid DEFAULT NULL,
    new_lease_id uuid DEFAULT NULL,
    wait_seconds float8 DEFAULT NULL,
    session uuid DEFAULT NULL,
    priority integer DEFAULT 0,
    fairness_key text DEFAULT NULL,
    OUT granted boolean, OUT lease_id uuid, OUT fencing_token bigint, OUT expires_at timestamptz,
    OUT retry_after float8, OUT missing text[], OUT blocked_by text[], OUT waiter bigint,
    OUT liveness_seconds float8)
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
-- The common case first: one limit, room for us after those queued. A single UPDATE decides and
-- counts under the row lock, like a bare semaphore, and the lease row is written beside it. Should
-- the UPDATE wait for the row lock, it checks the count the other transaction committed.
-- A refused caller that queues (one limit, queue_client given) is queued without the limit's row
-- lock, under the limit's queue lock held shared (see _lock_queue), so refusals neither wait for
-- grants and releases nor hold them up. Everything else (errors, queued callers asking again,
-- several limits, expired leases to reclaim) is decided by _admit.
DECLARE
    cfg pgslots.settings;
    at timestamptz;
    target uuid;
    lim record;
    lease_limits uuid[];
    written integer;
    prior_lock_timeout text;
    others_wait boolean;
BEGIN
    IF wait_seconds IS NOT NULL THEN
        prior_lock_timeout := pgslots._bound_waits(wait_seconds);
    END IF;
    IF priority IS DISTINCT FROM 0 OR fairness_key IS NOT NULL THEN
        PERFORM pgslots._check_queue_args(priority, fairness_key);
    END IF;
    -- A session binds only leases of the role that keeps it alive.
    IF session IS NOT NULL AND EXISTS (SELECT 1 FROM pgslots.sessions s WHERE s.id = session AND s.owner <> session_user) THEN
        PERFORM pgslots._not_your_session(session);
    END IF;
    IF ticket IS NULL AND cardinality(names) = 1 AND slots > 0 THEN
        SELECT * INTO cfg FROM pgslots.settings;
        IF pgslots._lease_seconds_ok(lease_seconds, cfg) THEN
            at := pgslots._clock(cfg.clock_offset);
            UPDATE pgslots.limits l SET leased_slots = l.leased_slots + slots, grants_total = l.grants_total + 1
            WHERE l.name = names[1] AND l.active AND NOT l.is_template AND NOT l.retiring
              AND NOT l.shadow AND l.window_seconds = 0   -- those are decided by _admit
              -- A full limit refuses before anyone counts the queue (cheaper quals run first).
              AND pgslots._fits(pgslots._shortfall(l."limit", l.leased_slots,
                      pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at), 0, slots))
              AND pgslots._fits(pgslots._shortfall(l."limit", l.leased_slots,
                      pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at),
                      -- _ahead, with the plain queue's case written out: no function call on the hot path.
                      CASE WHEN priority = 0 AND fairness_key IS NULL
                                AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id
                                                  AND (w.priority <> 0 OR w.fairness_key IS NOT NULL))
                           THEN (SELECT coalesce(sum(w.slots), 0) FROM pgslots.waiters w
                                 WHERE w.limit_id = l.id AND w.expires_at > at)
                           ELSE pgslots._ahead(l.id, at, cfg.priority_aging_seconds, NULL, priority, fairness_key)
                      END,
                      slots))
            RETURNING l.id, EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id)
            INTO target, others_wait;
            IF FOUND THEN
                IF others_wait AND (fairness_key IS NOT NULL OR NOT pgslots._plain_queue(target)) THEN
                    PERFORM pgslots._served(ARRAY[target], fairness_key, at);
                END IF;
                granted := true;
                lease_id := coalesce(new_lease_id, gen_random_uuid());
                fencing_token := nextval('pgslots.fencing_tokens');
                expires_at := at + make_interval(secs => lease_seconds);
                missing := '{}';
                lease_limits := ARRAY[target];
            ELSIF queue_client IS NOT NULL THEN
                SELECT l.id, l.active, l."limit", l.shadow, l.window_seconds INTO lim FROM pgslots.limits l
                WHERE l.name = names[1] AND NOT l.is_template AND NOT l.retiring;
                IF FOUND AND lim.active AND slots <= lim."limit" AND NOT lim.shadow AND lim.window_seconds = 0
                   AND NOT EXISTS (SELECT 1 FROM pgslots.leases x
                                   WHERE x.limit_id = lim.id
                                     AND pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, at,
                                                             cfg.liveness_seconds)) THEN
                    PERFORM pgslots._lock_queue_shared(lim.id);
                    SELECT l.id, l.name, l.active, l."limit", l.leased_slots, l.slot_decay_per_second,
                           l.avg_slot_occupancy_seconds,
                           pgslots._shortfall(l."limit", l.leased_slots,
                               pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at),
                               -- Full without the queue: refused whatever is queued, no need to count it.
                               CASE WHEN pgslots._fits(pgslots._shortfall(l."limit", l.leased_slots,
                                             pgslots._decayed(l.unleased_slots, l.slot_decay_per_second,
                                                              l.decayed_at, at), 0, slots))
                                    THEN pgslots._ahead(l.id, at, cfg.priority_aging_seconds, NULL, priority,
                                                        fairness_key)
                                    ELSE 0 END,
                               slots) AS short
                    INTO lim FROM pgslots.limits l WHERE l.id = lim.id;
                    granted := false;
                    missing := '{}';
                    IF FOUND AND lim.active AND NOT pgslots._fits(lim.short) THEN
                        PERFORM set_config('synchronous_commit', 'off', true);   -- as in _admit
                        blocked_by := ARRAY[lim.name];
                        retry_after := pgslots._retry_after(lim.short, lim."limit", lim.leased_slots, slots,
                                                            lim.slot_decay_per_second,
                                                            lim.avg_slot_occupancy_seconds);
                        waiter := nextval('pgslots.waiter_tickets');
                        PERFORM pgslots._enqueue(waiter, ARRAY[lim.id], slots, queue_client, at,
                                                 cfg.waiter_ttl_seconds, new_lease_id, lease_seconds, holder,
                                                 session, priority, fairness_key);
                        PERFORM pgslots._count_refusal(ARRAY[lim.id], slots);
                    ELSE
                        -- Room appeared (or the limit changed) since the UPDATE looked: ask again at
                        -- once. Not via _admit: its row locks must never be taken under the queue lock.
                        retry_after := 0;
                        blocked_by := '{}';
                    END IF;
                END IF;
            END IF;
        END IF;
    END IF;
    IF granted IS NULL THEN
        SELECT a.granted, a.lease_id, a.fencing_token, a.expires_at, a.retry_after, a.missing, a.blocked_by,
               a.waiter, a.lease_limits
        INTO granted, lease_id, fencing_token, expires_at, retry_after, missing, blocked_by, waiter, lease_limits
        FROM pgslots._admit(names, slots, lease_seconds, holder, strict, ticket, queue_client, false,
                            new_lease_id, session, coalesce(priority, 0), fairness_key, NULL) AS a;
    END IF;
    -- The one place a caller's lease is written: one row per limit it counts on, in the grant's transaction.
    IF lease_limits IS NOT NULL THEN
        INSERT INTO pgslots.leases (id, limit_id, slots, parts, fencing_token, acquired_at, expires_at,
                                    host, pid, application_name, holder, session_id)
        SELECT lease_id, i, slots, cardinality(lease_limits), fencing_token,
               expires_at - make_interval(secs => lease_seconds), expires_at,   -- acquired: the grant's time
               pgslots._holder_host(holder), pgslots._holder_pid(holder), pgslots._application_name(), holder,
               session
        FROM unnest(lease_limits) AS i
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS written = ROW_COUNT;
        IF written < cardinality(lease_limits) THEN
            RAISE EXCEPTION 'Lease id % is already in use: new_lease_id must name a new lease.', new_lease_id
                USING ERRCODE = 'PS013',
                      HINT = 'Pass a fresh random UUID (version 4) as new_lease_id, or none.';
        END IF;
    END IF;
    IF session IS NOT NULL THEN
        -- How long the holder may go unheard before its leases are dead: it must give them up sooner.
        liveness_seconds := coalesce(cfg.liveness_seconds, (SELECT s.liveness_seconds FROM pgslots.settings s));
    END IF;
    IF prior_lock_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', prior_lock_timeout, true);
    END IF;
END
$$;
COMMENT ON FUNCTION pgslots.acquire(text[], integer, float8, jsonb, boolean, bigint, uuid, uuid, float8, uuid, integer, text) IS
'Non-blocking, all-or-nothing acquire of `slots` on every active limit in `names`. Granted: a lease '
'(lease_id, fencing_token, expires_at) to release or renew. Refused: retry_after seconds and '
'blocked_by. missing lists names with no limit (strict => error). With queue_client, a refused '
'caller is queued and gets a waiter ticket to pass back (with the same queue_client, from the same '
'login role; any other ticket queues afresh at the back); queued callers are served first-come. '
'new_lease_id names the lease up front (a fresh random UUID): the caller can release it after an '
'interrupted call, and a queued caller waiting on one limit may be granted it by a release (the '
'notification says so; asking again with the same ticket and new_lease_id returns it). '
'wait_seconds bounds each wait for a lock held by another session (lock_timeout): past it the '
'call fails with SQLSTATE 55P03 and changes nothing; NULL waits as the session''s lock_timeout says. '
'session (a UUID the caller keeps alive with keep_alive) binds the lease to it: once the session has '
'not been seen for liveness_seconds and its backend is gone, the lease is dead and its slots are '
'taken back by whoever needs them (liveness_seconds is returned). Without it, a lease lasts until '
'released or expired. A name with no limit that starts with a template''s prefix (tenant:acme for '
'tenant:*) uses that key''s own limit, created on first use with the template''s values. priority '
'(-100..100, higher first) and fairness_key (round-robin across keys within a priority, first-come '
'within a key) order the queue; a caller that does not queue never overtakes a waiter served before it.';

-- rate_limit and reserve: one decision (_admit, for rate slots); a reservation also leaves the row
-- that settle needs.
CREATE FUNCTION pgslots._rate(names text[], slots integer, strict boolean, ticket bigint, queue_client uuid,
                              wait_seconds float8, priority integer, fairness_key text, reserving boolean,
                              OUT granted boolean, OUT retry_after float8, OUT missing text[],
                              OUT blocked_by text[], OUT waiter bigint, OUT reservation_id uuid)
LANGUAGE plpgsql
AS $$
DECLARE
    prior_lock_timeout text;
    counted uuid[];
    cfg pgslots.settings;
    at timestamptz;
BEGIN
    IF wait_seconds IS NOT NULL THEN
        prior_lock_timeout := pgslots._bound_waits(wait_seconds);
    END IF;
    IF priority IS DISTINCT FROM 0 OR fairness_key IS NOT NULL THEN
        PERFORM pgslots._check_queue_args(priority, fairness_key);
    END IF;
    IF reserving THEN
        reservation_id := gen_random_uuid();
    END IF;
    SELECT a.granted, a.retry_after, a.missing, a.blocked_by, a.waiter, a.lease_limits
    INTO granted, retry_after, missing, blocked_by, waiter, counted
    FROM pgslots._admit(names, slots, NULL, NULL, strict, ticket, queue_client, true, NULL, NULL,
                        coalesce(priority, 0), fairness_key, reservation_id) AS a;
    -- A reservation that counted on no limit (its names have none, or none is active) has nothing
    -- to settle: nothing is stored, and reservation_id is NULL.
    IF reserving AND granted AND cardinality(counted) > 0 THEN
        SELECT * INTO cfg FROM pgslots.settings;
        at := pgslots._clock(cfg.clock_offset);
        INSERT INTO pgslots.reservations (id, limit_ids, slots, reserved_at, expires_at, owner, held, held_at, shard)
        VALUES (reservation_id, counted, slots, at, at + make_interval(secs => cfg.reservation_seconds), session_user,
                array_fill(slots::float8, ARRAY[cardinality(counted)]), at, pg_backend_pid() % 16);
        PERFORM pgslots._count_reservation(reservation_id, at, cfg);
    ELSE
        reservation_id := NULL;
    END IF;
    IF prior_lock_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', prior_lock_timeout, true);
    END IF;
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
    fairness_key text DEFAULT NULL,
    OUT granted boolean, OUT retry_after float8, OUT missing text[], OUT blocked_by text[],
    OUT waiter bigint)
LANGUAGE plpgsql   -- not sql: PL/pgSQL keeps its plan across calls
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    SELECT r.granted, r.retry_after, r.missing, r.blocked_by, r.waiter
    INTO granted, retry_after, missing, blocked_by, waiter
    FROM pgslots._rate(names, slots, strict, ticket, queue_client, wait_seconds, priority, fairness_key, false) r;
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
    fairness_key text DEFAULT NULL,
    OUT granted boolean, OUT retry_after float8, OUT missing text[], OUT blocked_by text[],
    OUT waiter bigint, OUT reservation_id uuid)
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
BEGIN
    SELECT r.granted, r.retry_after, r.missing, r.blocked_by, r.waiter, r.reservation_id
    INTO granted, retry_after, missing, blocked_by, waiter, reservation_id
    FROM pgslots._rate(names, slots, strict, ticket, queue_client, wait_seconds, priority, fairness_key, true) r;
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
    prior_lock_timeout text;
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
    IF wait_seconds IS NOT NULL THEN
        prior_lock_timeout := pgslots._bound_waits(wait_seconds);
    END IF;
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
    FOR lim IN SELECT l.id, l."limit", l.slot_decay_per_second, l.window_seconds, u.ord::integer AS ord
               FROM pgslots.limits l JOIN unnest(r.limit_ids) WITH ORDINALITY AS u(id, ord) ON u.id = l.id
               WHERE diff <> 0 ORDER BY l.id FOR UPDATE OF l LOOP
        IF lim.window_seconds > 0 THEN
            -- The cost counts when the grant was made: while that grant is in the window.
            PERFORM pgslots._window_purge(lim.id, lim.window_seconds, at);
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
            SELECT pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at) INTO used
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
    IF prior_lock_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', prior_lock_timeout, true);
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
