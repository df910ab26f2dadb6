-- Admission: acquire, a pipeline of three stages; the first that decides answers.
--
--   1. _fast_grant     one limit with room for us after those queued: one UPDATE decides and
--                      counts under the row lock, like a bare semaphore (_fast_new_key: the same,
--                      for a template's key used for the first time, after creating it); rate
--                      limits and reservations on one decay limit take this stage too (22_rates.sql)
--   2. _queue_refusal  one full limit, a caller that queues: queued without the limit's row lock
--   3. _admit          everything else (several limits, errors, a queued caller asking again,
--                      leases to take back), in 21_admit.sql
--
-- Every stage answers a pgslots.decision (granted NULL: not decided here). A granted lease is
-- written by acquire, in the grant's transaction. Every decision is made under the row lock of
-- the limits involved, with the database clock. Rows of pgslots.limits are always locked in id
-- order, by every function that locks more than one, so multi-limit acquires and releases never
-- deadlock.

-- Stage 1. Should the UPDATE wait for the row lock, it checks the count the other transaction
-- committed. Shadow, window and paused limits, templates and retiring keys are left to _admit. With
-- `rate` (rate_limit and reserve on a decay limit), the slots are counted as rate slots, as _grant
-- counts them. Returns the limit's id when it granted, NULL otherwise.
-- Two statements: the first, for a limit nobody waits on (the common case), probes the queue once;
-- the second, taken only when the first did not grant, counts the waiters ahead. PostgreSQL sets up
-- every subquery of a statement each time it runs it, used or not: the first statement alone saves
-- an uncontended acquire about 14 microseconds (measured on PostgreSQL 15). acquire runs the first
-- statement itself (rate off), then calls this with queued_only for the second: the call of a
-- PL/pgSQL function costs an uncontended acquire + release cycle about 5% of the server's
-- instructions, more than the statement (measured in the server alone on PostgreSQL 15).
CREATE FUNCTION pgslots._fast_grant(wanted text, slots integer, priority integer, fairness_key text,
                                    aging float8, at timestamptz, rate boolean, queued_only boolean DEFAULT false)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    target uuid;
    others_wait boolean;
BEGIN
    IF NOT queued_only THEN
        UPDATE pgslots.limits l
        SET leased_slots = l.leased_slots + CASE WHEN rate THEN 0 ELSE slots END,
            unleased_slots = CASE WHEN rate THEN pgslots._unleased(l, at) + slots ELSE l.unleased_slots END,
            decayed_at = CASE WHEN rate THEN at ELSE l.decayed_at END,
            grants_total = l.grants_total + 1
        WHERE l.name = wanted AND pgslots._fast_open(l, at, slots) AND (NOT rate OR l.slot_decay_per_second > 0)
          AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id)
        RETURNING l.id INTO target;
        IF FOUND THEN
            RETURN target;
        END IF;
    END IF;
    UPDATE pgslots.limits l
    SET leased_slots = l.leased_slots + CASE WHEN rate THEN 0 ELSE slots END,
        unleased_slots = CASE WHEN rate THEN pgslots._unleased(l, at) + slots ELSE l.unleased_slots END,
        decayed_at = CASE WHEN rate THEN at ELSE l.decayed_at END,
        grants_total = l.grants_total + 1
    -- A full limit refuses before anyone counts the queue (cheaper quals run first).
    WHERE l.name = wanted AND pgslots._fast_open(l, at, slots) AND (NOT rate OR l.slot_decay_per_second > 0)
      AND pgslots._fits(pgslots._short(l, at,
              -- _ahead, with the plain queue's case written out: no function call on the hot path.
              CASE WHEN priority = 0 AND fairness_key IS NULL
                        AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id
                                          AND (w.priority <> 0 OR w.fairness_key IS NOT NULL))
                   THEN (SELECT coalesce(sum(w.slots), 0) FROM pgslots.waiters w
                         WHERE w.limit_id = l.id AND w.expires_at > at)
                   ELSE pgslots._ahead(l.id, at, aging, NULL, priority, fairness_key)
              END,
              slots))
    RETURNING l.id, EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id)
    INTO target, others_wait;
    IF others_wait AND (fairness_key IS NOT NULL OR NOT pgslots._plain_queue(target)) THEN
        PERFORM pgslots._served(ARRAY[target], fairness_key, at);
    END IF;
    RETURN target;
END
$$;

-- Stage 1 for a key's first use (a name with no limit that a template matches): creates it, as
-- _admit would, and grants with stage 1's UPDATE. NULL when the name has a limit, matches no
-- template, or the new key cannot grant (then _admit decides).
CREATE FUNCTION pgslots._fast_new_key(wanted text, slots integer, priority integer, fairness_key text,
                                      cfg pgslots.settings, at timestamptz, rate boolean)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    target uuid;
BEGIN
    IF EXISTS (SELECT 1 FROM pgslots.limits l WHERE l.name = wanted) THEN
        RETURN NULL;   -- the name has a limit (a full one, most often): one probe, not the templates' search
    END IF;
    IF pgslots._bad_name(wanted)   -- _admit says what is wrong with it
       OR pgslots._create_instances(ARRAY[wanted], at) = 0 THEN   -- it has a limit, or no template
        RETURN NULL;
    END IF;
    target := pgslots._fast_grant(wanted, slots, priority, fairness_key, cfg.priority_aging_seconds, at, rate);
    IF target IS NOT NULL THEN
        PERFORM pgslots._after_new_keys(ARRAY[target], at, cfg);
    END IF;
    RETURN target;
END
$$;

-- Stage 2. A refused caller that queues on one limit is queued under the limit's queue lock held
-- shared (see _lock_queue), not its row lock, so refusals neither wait for grants and releases nor
-- hold them up. Undecided (NULL) when the limit needs _admit: missing, disabled, a shadow or window
-- limit, smaller than the request, or holding leases to take back (leases_checked: the caller
-- holds the limit's row and has looked already, see acquire_each). Should room appear meanwhile,
-- the caller is told to ask again at once: _admit's row locks are never taken under the queue lock.
CREATE FUNCTION pgslots._queue_refusal(wanted text, slots integer, queue_client uuid, new_lease_id uuid,
                                       lease_seconds float8, holder jsonb, session uuid, priority integer,
                                       fairness_key text, cfg pgslots.settings, at timestamptz,
                                       leases_checked boolean DEFAULT false)
RETURNS pgslots.decision
LANGUAGE plpgsql
AS $$
DECLARE
    d pgslots.decision;
    target record;
    now_ record;
BEGIN
    SELECT l.id, l.name INTO target FROM pgslots.limits l
    WHERE l.name = wanted AND NOT l.is_template AND NOT l.retiring AND l.active AND slots <= l."limit"
      AND NOT l.shadow AND l.window_seconds = 0 AND NOT pgslots._paused(l.paused_until, at)
      AND (leases_checked OR NOT pgslots._holds_gone_leases(l.id, at, cfg.liveness_seconds));
    IF NOT FOUND THEN
        RETURN d;
    END IF;
    d.granted := false;
    d.missing := '{}';
    d.retry_after := 0;   -- room appeared (or the limit changed) since stage 1 looked: ask again
    d.blocked_by := '{}';
    PERFORM pgslots._lock_queue_shared(target.id);
    SELECT l.active, l."limit", l.leased_slots, l.slot_decay_per_second, l.avg_slot_occupancy_seconds,
           pgslots._short(l, at,
               -- Full without the queue: refused whatever is queued, no need to count it.
               CASE WHEN pgslots._fits(pgslots._short(l, at, 0, slots))
                    THEN pgslots._ahead(l.id, at, cfg.priority_aging_seconds, NULL, priority, fairness_key)
                    ELSE 0 END,
               slots) AS short
    INTO now_ FROM pgslots.limits l WHERE l.id = target.id;
    IF FOUND AND now_.active AND NOT pgslots._fits(now_.short) THEN
        d.blocked_by := ARRAY[target.name];
        d.retry_after := pgslots._retry_after(now_.short, now_."limit", now_.leased_slots, slots,
                                              now_.slot_decay_per_second, now_.avg_slot_occupancy_seconds);
        d.waiter := pgslots._refuse(ARRAY[target.id], ARRAY[target.id], slots, NULL, queue_client, at, cfg,
                                    new_lease_id, lease_seconds, holder, session, priority, fairness_key);
    END IF;
    RETURN d;
END
$$;

-- A granted decision's lease, one row per limit it counts on (acquire writes stage 1's lease of one
-- limit itself, with the same columns). A new_lease_id that names an existing lease is refused.
CREATE FUNCTION pgslots._write_lease(d pgslots.decision, slots integer, lease_seconds float8, holder jsonb, session uuid)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    written integer;
BEGIN
    INSERT INTO pgslots.leases (id, limit_id, part, slots, parts, fencing_token, acquired_at, expires_at,
                                host, pid, application_name, holder, session_id)
    SELECT d.lease_id, u.i, u.n, slots, cardinality(d.lease_limits), d.fencing_token,
           d.expires_at - make_interval(secs => lease_seconds), d.expires_at,   -- acquired: the grant's time
           pgslots._holder_host(holder), pgslots._holder_pid(holder), pgslots._application_name(), holder, session
    FROM unnest(d.lease_limits) WITH ORDINALITY AS u(i, n)
    ON CONFLICT DO NOTHING;   -- the id of an existing lease: refused below
    GET DIAGNOSTICS written = ROW_COUNT;
    IF written < cardinality(d.lease_limits) THEN
        PERFORM pgslots._lease_id_in_use(d.lease_id);
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
    fairness_key text DEFAULT NULL)
RETURNS pgslots.acquired   -- not OUT parameters: see migration 0020
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of 30_slots.sql
SET jit = off
AS $$
DECLARE
    a pgslots.acquired;   -- the answer
    prior text;
    cfg pgslots.settings;
    at timestamptz;
    target uuid;
    d pgslots.decision;
BEGIN
    -- Each call, statement and subquery costs an acquire microseconds: those for what was not asked are skipped.
    prior := CASE WHEN wait_seconds IS NOT NULL THEN pgslots._bound_waits(wait_seconds) END;
    IF priority IS DISTINCT FROM 0 OR fairness_key IS NOT NULL THEN
        PERFORM pgslots._check_queue_args(priority, fairness_key);
    END IF;
    IF session IS NULL THEN
        SELECT * INTO cfg FROM pgslots.settings;
    ELSE   -- a session binds only leases of the role that keeps it alive
        SELECT * INTO cfg FROM pgslots.settings
        WHERE NOT EXISTS (SELECT 1 FROM pgslots.sessions s WHERE s.id = session AND s.owner <> session_user);
        IF NOT FOUND THEN
            PERFORM pgslots._not_your_session(session);
        END IF;
    END IF;
    at := pgslots._clock(cfg.clock_offset);
    IF ticket IS NULL AND cardinality(names) = 1 AND slots > 0 AND pgslots._lease_seconds_ok(lease_seconds, cfg) THEN
        UPDATE pgslots.limits l   -- stage 1's first statement, written out (see _fast_grant): nobody waits
        SET leased_slots = l.leased_slots + slots, grants_total = l.grants_total + 1
        WHERE l.name = names[1] AND pgslots._fast_open(l, at, slots)
          AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id) RETURNING l.id INTO target;
        target := coalesce(target, pgslots._fast_grant(names[1], slots, priority, fairness_key, cfg.priority_aging_seconds,
                                                       at, false, true),
                           pgslots._fast_new_key(names[1], slots, priority, fairness_key, cfg, at, false));
        d := CASE WHEN target IS NULL AND queue_client IS NOT NULL   -- stage 2
                  THEN pgslots._queue_refusal(names[1], slots, queue_client, new_lease_id, lease_seconds, holder,
                                              session, priority, fairness_key, cfg, at) END;
    END IF;
    IF target IS NOT NULL THEN   -- stage 1's lease, written and answered in one statement (see _write_lease)
        INSERT INTO pgslots.leases AS x (id, limit_id, part, slots, parts, fencing_token, acquired_at, expires_at,
                                         host, pid, application_name, holder, session_id)
        VALUES (coalesce(new_lease_id, gen_random_uuid()), target, 1, slots, 1, nextval('pgslots.fencing_tokens'), at,
                at + make_interval(secs => lease_seconds),
                pgslots._holder_host(holder), pgslots._holder_pid(holder), pgslots._application_name(), holder, session)
        ON CONFLICT DO NOTHING   -- the id of an existing lease: refused
        RETURNING x.id, x.fencing_token, x.expires_at INTO a.lease_id, a.fencing_token, a.expires_at;
        IF NOT FOUND THEN
            PERFORM pgslots._lease_id_in_use(new_lease_id);
        END IF;
        a.granted := true;
        a.missing := '{}';
    ELSE
        d := CASE WHEN d.granted IS NULL   -- stage 3
                  THEN pgslots._admit(names, slots, lease_seconds, holder, strict, ticket, queue_client, false,
                                      new_lease_id, session, coalesce(priority, 0), fairness_key, NULL) ELSE d END;
        PERFORM pgslots._write_lease(d, slots, lease_seconds, holder, session) WHERE d.lease_limits IS NOT NULL;
        a := (d.granted, d.lease_id, d.fencing_token, d.expires_at, d.retry_after, d.missing, d.blocked_by, d.waiter,
              NULL)::pgslots.acquired;
    END IF;
    a.liveness_seconds := CASE WHEN session IS NOT NULL THEN cfg.liveness_seconds END;   -- then unheard, it is dead
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    RETURN a;
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
