-- The full admission decision, behind acquire, rate_limit and reserve: _admit and its steps.
--
-- _admit checks the request, creates the instances of template keys it names (before any row lock),
-- locks the named limits in id order, then decides (_decide: who refuses, and how long to wait),
-- taking back expired leases and deciding again once if that may help. A grant counts the slots
-- (_grant); a refusal writes pressure and a queue place (_refuse). A refused caller that passes
-- queue_client is queued: waiters of a limit are served in the order of _queue (priority, then
-- round-robin across fairness keys, then first-come), and a request never overtakes the slots of
-- the waiters served before it. A shadow limit never refuses: a request it would have refused adds
-- to its shadow_refusals.

-- A granted lease's identity: its id (the caller's, or new), a new fencing token, its expiry.
CREATE FUNCTION pgslots._lease_for(ids uuid[], new_lease_id uuid, lease_seconds float8, at timestamptz)
RETURNS pgslots.decision
LANGUAGE sql VOLATILE
AS $$
    SELECT ROW(true, coalesce(new_lease_id, pg_catalog.gen_random_uuid()), pg_catalog.nextval('pgslots.fencing_tokens'),
               at + pg_catalog.make_interval(secs => lease_seconds), NULL, '{}', NULL, NULL, ids)::pgslots.decision
$$;

-- Which of the locked limits `ids` refuse `slots` now (paused, or full after the waiters ahead of
-- this caller); the shadow limits that would have; and how long until all of them may fit.
CREATE FUNCTION pgslots._decide(ids uuid[], slots integer, at timestamptz, aging float8, ticket bigint,
                                priority integer, fairness_key text,
                                OUT blocked uuid[], OUT shadowed uuid[], OUT retry_after float8)
LANGUAGE plpgsql
AS $$
DECLARE
    lim record;
BEGIN
    blocked := '{}';
    shadowed := '{}';
    retry_after := 0;
    FOR lim IN SELECT l.id, l."limit", l.leased_slots, l.slot_decay_per_second, l.avg_slot_occupancy_seconds,
                      l.window_seconds, l.margin_seconds, l.shadow, l.paused_until,
                      pgslots._short(l, at, pgslots._ahead(l.id, at, aging, ticket, priority, fairness_key), slots)
                          AS short
               FROM pgslots.limits l WHERE l.id = ANY (ids) LOOP
        IF pgslots._paused(lim.paused_until, at) THEN   -- closed until then, whatever fits
            blocked := blocked || lim.id;
            retry_after := greatest(retry_after, date_part('epoch', lim.paused_until - at));
            CONTINUE;
        END IF;
        CONTINUE WHEN pgslots._fits(lim.short);
        IF lim.shadow THEN
            shadowed := shadowed || lim.id;
            CONTINUE;
        END IF;
        blocked := blocked || lim.id;
        retry_after := greatest(retry_after, CASE WHEN lim.window_seconds > 0
            THEN pgslots._window_wait(lim.id, lim.short, pgslots._span(lim.window_seconds, lim.margin_seconds), at)
            ELSE pgslots._retry_after(lim.short, lim."limit", lim.leased_slots, slots,
                                      lim.slot_decay_per_second, lim.avg_slot_occupancy_seconds) END);
    END LOOP;
END
$$;

-- A grant on the locked limits `ids`: counts it (leased slots, or rate slots and a window's log),
-- takes the caller's queue place away, and keeps the queue's round-robin history.
CREATE FUNCTION pgslots._grant(ids uuid[], windowed uuid[], shadowed uuid[], slots integer, ticket bigint,
                               for_rate_limit boolean, reservation uuid, fairness_key text, at timestamptz)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    waited float8;
BEGIN
    IF ticket IS NOT NULL THEN   -- a queued waiter: how long it waited counts
        waited := (SELECT date_part('epoch', at - min(w.enqueued_at)) FROM pgslots.waiters w WHERE w.id = ticket);
        DELETE FROM pgslots.waiters w WHERE w.id = ticket;
    END IF;
    IF for_rate_limit THEN
        UPDATE pgslots.limits l
        SET unleased_slots = pgslots._unleased(l, at) + slots, decayed_at = at, grants_total = l.grants_total + 1,
            wait_seconds_total = l.wait_seconds_total + coalesce(waited, 0)
        WHERE l.id = ANY (ids);
        INSERT INTO pgslots.window_grants (limit_id, granted_at, slots, reservation_id)
        SELECT w, at, slots, reservation FROM unnest(windowed) AS w;
    ELSE
        UPDATE pgslots.limits l
        SET leased_slots = l.leased_slots + slots, grants_total = l.grants_total + 1,
            wait_seconds_total = l.wait_seconds_total + coalesce(waited, 0)
        WHERE l.id = ANY (ids);
    END IF;
    IF cardinality(shadowed) > 0 THEN
        UPDATE pgslots.limits l SET shadow_refusals = l.shadow_refusals + 1 WHERE l.id = ANY (shadowed);
    END IF;
    PERFORM pgslots._served(ids, fairness_key, at);
END
$$;

-- The one refusal step of every admission path. A refusal writes only pressure and a queue place;
-- losing those in a crash costs nothing, so its commit need not wait for the WAL flush while it
-- holds a limit's lock. A caller that queues (queue_client) keeps its ticket or gets a new one, on
-- every limit it asked for (`ids`). Returns the ticket.
CREATE FUNCTION pgslots._refuse(blocked uuid[], ids uuid[], slots integer, ticket bigint, queue_client uuid,
                                at timestamptz, cfg pgslots.settings, new_lease_id uuid, lease_seconds float8,
                                holder jsonb, session uuid, priority integer, fairness_key text)
RETURNS bigint
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pgslots._count_refusal(blocked, slots, queue_client IS NULL);
    IF queue_client IS NOT NULL THEN
        ticket := coalesce(ticket, nextval('pgslots.waiter_tickets'));
        PERFORM pgslots._enqueue(ticket, ids, blocked, slots, queue_client, at, cfg.waiter_ttl_seconds,
                                 new_lease_id, lease_seconds, holder, session, priority, fairness_key);
    END IF;
    RETURN ticket;
END
$$;

-- A queued waiter asking again may have been granted its named lease by a release meanwhile (its
-- notification lost or not read yet; its ticket left the queue then): that lease is the answer,
-- renewed to full length. The lease id, known to its holder alone, is the proof. NULL otherwise.
CREATE FUNCTION pgslots._handed_lease(new_lease_id uuid, ids uuid[], ticket bigint, lease_seconds float8,
                                      at timestamptz)
RETURNS pgslots.decision
LANGUAGE plpgsql
AS $$
DECLARE
    d pgslots.decision;
BEGIN
    UPDATE pgslots.leases x SET expires_at = at + make_interval(secs => lease_seconds)
    WHERE x.id = new_lease_id AND x.limit_id = ANY (ids)
    RETURNING x.fencing_token, x.expires_at INTO d.fencing_token, d.expires_at;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF ticket IS NOT NULL THEN
        DELETE FROM pgslots.waiters w WHERE w.id = ticket;
    END IF;
    d.granted := true;
    d.lease_id := new_lease_id;
    d.missing := '{}';
    d.waiter := ticket;
    RETURN d;
END
$$;

CREATE FUNCTION pgslots._admit(
    names text[], slots integer, lease_seconds float8, holder jsonb, strict boolean,
    ticket bigint, queue_client uuid, for_rate_limit boolean, new_lease_id uuid, session uuid,
    priority integer, fairness_key text, reservation uuid)
RETURNS pgslots.decision
LANGUAGE plpgsql
AS $$
-- A grant returns the limits it counts on in lease_limits: acquire writes a lease row for each,
-- reserve remembers them. A rate-limit grant on a window limit logs the grant (with `reservation`).
DECLARE
    d pgslots.decision;
    wanted text[] := names;
    cfg pgslots.settings;
    at timestamptz;
    lim record;
    ids uuid[] := '{}';
    found_names text[] := '{}';
    no_decay text[] := '{}';
    windowed uuid[] := '{}';
    verdict record;
    handed pgslots.decision;
    created integer := 0;
BEGIN
    SELECT * INTO cfg FROM pgslots.settings;
    IF NOT for_rate_limit THEN
        PERFORM pgslots._check_lease_seconds(lease_seconds, cfg);
    END IF;
    -- A ticket counts only for the client and role it was issued to; any other is a new arrival.
    IF ticket IS NOT NULL THEN
        d.waiter := pgslots._own_ticket(ticket, queue_client);
    END IF;
    IF names IS NULL OR slots IS NULL OR slots <= 0
       OR EXISTS (SELECT 1 FROM unnest(names) AS n WHERE pgslots._bad_name(n)) THEN
        wanted := pgslots._check_names(names);   -- raises the precise error
        PERFORM pgslots._check_slots(slots);
    END IF;
    IF cardinality(wanted) > 1 THEN
        wanted := pgslots._check_names(wanted);  -- drops repeats
    END IF;
    -- Keys of templates get their instances, before any row lock is taken (see _create_instances).
    IF (SELECT count(*) FROM pgslots.limits l WHERE l.name = ANY (wanted) AND NOT l.retiring) < cardinality(wanted) THEN
        created := pgslots._create_instances(wanted, pgslots._clock(cfg.clock_offset));
    END IF;
    -- Lock the named limits in id order, the one order every locker uses, and look at each once.
    FOR lim IN SELECT l.id, l.name, l.active, l."limit", l.slot_decay_per_second, l.is_template, l.window_seconds
               FROM pgslots.limits l WHERE l.name = ANY (wanted) AND NOT l.retiring
               ORDER BY l.id FOR UPDATE LOOP
        IF lim.is_template OR (lim.active AND (slots > lim."limit" OR (lim.window_seconds > 0 AND NOT for_rate_limit))) THEN
            PERFORM pgslots._not_admissible(lim.name, lim.is_template, lim."limit", lim.window_seconds, slots);
        END IF;
        found_names := found_names || lim.name;
        CONTINUE WHEN NOT lim.active;
        IF lim.window_seconds > 0 THEN
            windowed := windowed || lim.id;
        ELSIF for_rate_limit AND lim.slot_decay_per_second <= 0 THEN
            no_decay := no_decay || lim.name;
        END IF;
        ids := ids || lim.id;
    END LOOP;
    at := pgslots._clock(cfg.clock_offset);
    IF ticket IS NOT NULL AND new_lease_id IS NOT NULL AND NOT for_rate_limit THEN
        handed := pgslots._handed_lease(new_lease_id, ids, d.waiter, lease_seconds, at);
        IF handed.granted THEN
            RETURN handed;
        END IF;
    END IF;
    d.granted := false;
    d.missing := '{}';
    IF cardinality(found_names) < cardinality(wanted) THEN
        d.missing := ARRAY(SELECT n FROM unnest(wanted) AS n WHERE n <> ALL (found_names));
        -- An idle instance deleted (by sweep) between its lookup and its lock: ask again at once,
        -- and it is created afresh. Not here: no instance is created under row locks.
        d.blocked_by := ARRAY(SELECT n FROM unnest(d.missing) AS n WHERE pgslots._template_for(n) IS NOT NULL);
        IF cardinality(d.blocked_by) > 0 THEN
            d.missing := '{}';
            d.retry_after := 0;
            RETURN d;
        END IF;
        d.blocked_by := NULL;
        IF strict THEN
            PERFORM pgslots._missing_limits(d.missing);
        END IF;
    END IF;
    IF cardinality(no_decay) > 0 THEN
        PERFORM pgslots._no_decay(no_decay);
    END IF;
    IF cardinality(ids) = 0 THEN
        d.granted := true;   -- nothing active to enforce
        RETURN d;
    END IF;
    -- Grants that have left their window no longer count.
    PERFORM pgslots._window_purge(l.id, pgslots._span(l.window_seconds, l.margin_seconds), at)
    FROM pgslots.limits l WHERE l.id = ANY (windowed);
    -- Decide; on a refusal, take back expired leases of the limits that refused and decide again.
    FOR attempt IN 1..2 LOOP
        SELECT * INTO verdict
        FROM pgslots._decide(ids, slots, at, cfg.priority_aging_seconds, d.waiter, priority, fairness_key);
        EXIT WHEN cardinality(verdict.blocked) = 0 OR attempt = 2;
        EXIT WHEN (SELECT sum(pgslots._reclaim(b, at)) FROM unnest(verdict.blocked) AS b) = 0;
    END LOOP;
    IF cardinality(verdict.blocked) = 0 THEN
        PERFORM pgslots._grant(ids, windowed, verdict.shadowed, slots, d.waiter, for_rate_limit, reservation,
                               fairness_key, at);
        IF created > 0 THEN
            PERFORM pgslots._after_new_keys(ids, at, cfg);
        END IF;
        IF for_rate_limit THEN
            d.granted := true;
            d.lease_limits := ids;
            RETURN d;
        END IF;
        RETURN (SELECT ROW(true, g.lease_id, g.fencing_token, g.expires_at, NULL, d.missing, NULL, d.waiter, ids)::pgslots.decision
                FROM pgslots._lease_for(ids, new_lease_id, lease_seconds, at) g);
    END IF;
    d.retry_after := verdict.retry_after;
    d.blocked_by := ARRAY(SELECT l.name FROM pgslots.limits l WHERE l.id = ANY (verdict.blocked) ORDER BY l.name);
    d.waiter := pgslots._refuse(verdict.blocked, ids, slots, d.waiter, queue_client, at, cfg, new_lease_id,
                                lease_seconds, holder, session, priority, fairness_key);
    IF queue_client IS NOT NULL THEN
        PERFORM pgslots._drop_expired_waiters(verdict.blocked, at);
    END IF;
    RETURN d;
END
$$;
