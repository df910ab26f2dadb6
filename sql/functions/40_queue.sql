-- The queue: who is woken or handed slots when some are freed, and the upkeep of waiting clients.
--
-- Waiters of a limit are served in the order of _queue: priority (with aging), then round-robin
-- across fairness keys, then ticket order. Wake-ups go to each waiting client's own channel,
-- "pgslots:<queue_client>" (its session). Payload, one JSON object:
--   {"wake": [12, 13]}                   tickets 12 and 13: look again, the freed slots may fit you
--   {"grant": {"ticket": 13, "lease_id": "<uuid>", "fencing_token": 77,
--              "expires_epoch": 1700000000.5, "term_seconds": 6}}
--                                        ticket 13: the lease you named is granted; it expires at
--                                        expires_epoch (term_seconds from now)
-- Anyone may NOTIFY any channel: a client believes a grant only when it names the lease the client
-- itself chose (a random UUID nobody else has seen), and otherwise just asks again.

-- The queued waiters of one limit that the slots free now can serve, head first. Slots of expired
-- leases count as free: the waiter's own acquire will reclaim them.
CREATE FUNCTION pgslots._wakeable(target uuid, at timestamptz) RETURNS bigint[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    lim record;
    taken bigint := 0;
    w record;
    woken bigint[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgslots.waiters x WHERE x.limit_id = target) THEN
        RETURN woken;
    END IF;
    SELECT l."limit", l.active AND NOT l.retiring AS active,   -- retiring: its name is missing now
           l.shadow, l.paused_until,
           l.leased_slots - (SELECT coalesce(sum(x.slots), 0) FROM pgslots.leases x, pgslots.settings s
                             WHERE x.limit_id = target
                               AND pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, at, s.liveness_seconds))
               AS live_leased,
           pgslots._unleased_seen(l, at) AS unleased
    INTO lim FROM pgslots.limits l WHERE l.id = target;
    IF pgslots._paused(lim.paused_until, at) THEN
        RETURN woken;   -- closed: nobody can be served before it opens
    END IF;
    FOR w IN SELECT q.id, q.slots
             FROM pgslots._queue(target, at, (SELECT s.priority_aging_seconds FROM pgslots.settings s),
                                 NULL, NULL, NULL) q
             ORDER BY q.place LOOP
        -- Deleted or disabled: every waiter must look again.
        EXIT WHEN lim.active AND NOT lim.shadow AND NOT pgslots._fits(
            pgslots._shortfall(lim."limit", lim.live_leased::integer, lim.unleased, taken, w.slots));
        taken := taken + w.slots;
        woken := woken || w.id;
        EXIT WHEN cardinality(woken) >= 400;   -- a NOTIFY payload holds about 8000 bytes
    END LOOP;
    RETURN woken;
END
$$;

-- Notifies the waiters of one limit that the slots free now can serve, each client on its channel.
CREATE FUNCTION pgslots._wake(target uuid, at timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    woken bigint[];
    c record;
BEGIN
    PERFORM pgslots._lock_queue(target);
    woken := pgslots._wakeable(target, at);
    IF cardinality(woken) > 0 THEN
        FOR c IN SELECT w.client_id, json_build_object('wake', json_agg(w.id ORDER BY w.id))::text AS note
                 FROM pgslots.waiters w WHERE w.limit_id = target AND w.id = ANY (woken)
                 GROUP BY w.client_id LOOP
            PERFORM pg_notify(pgslots._channel(c.client_id), c.note);
        END LOOP;
    END IF;
END
$$;

-- Grants the freed slots of one limit (whose row lock and queue lock the caller holds) to the head
-- of its queue: each waiter in queue order (_queue) that named its lease, waits on this limit alone and
-- fits. Writes the leases, removes the waiters, notifies them. A waiter it cannot serve this way
-- (queued on several limits, or for a rate limit) stops it; if the free slots fit that one, it and
-- those behind it that fit are notified to ask again. Returns how many waiters it served.
-- A handed lease first runs for at most 2 x waiter_ttl_seconds: if its waiter died after its last
-- heartbeat, the slots come back that soon; the waiter's client renews it to full length.
CREATE FUNCTION pgslots._hand_off(target uuid, at timestamptz) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    lim record;
    ttl float8 := (SELECT s.waiter_ttl_seconds FROM pgslots.settings s);
    aging float8 := (SELECT s.priority_aging_seconds FROM pgslots.settings s);
    keyed boolean;
    queued refcursor;
    w record;
    given integer := 0;
    granted integer := 0;
    waited float8 := 0;
    served integer := 0;
    token bigint;
    run_for float8;
    expiry timestamptz;
    wake_rest boolean := false;
BEGIN
    IF pgslots._holds_gone_leases(target, at, (SELECT s.liveness_seconds FROM pgslots.settings s)) THEN
        PERFORM pgslots._reclaim(target, at);
    END IF;
    SELECT l."limit", l.active AND NOT l.retiring AS active, l.leased_slots, l.shadow, l.paused_until,
           pgslots._unleased_seen(l, at) AS unleased
    INTO lim FROM pgslots.limits l WHERE l.id = target;
    IF FOUND AND pgslots._paused(lim.paused_until, at) THEN
        RETURN 0;   -- closed: nothing is handed over, nobody woken, before it opens
    END IF;
    IF NOT FOUND OR NOT lim.active OR lim.shadow THEN
        -- Deleted, disabled or in shadow mode: every waiter must look again.
        PERFORM pgslots._wake(target, at);
        RETURN 0;
    END IF;
    -- In queue order: ticket order for a plain queue, else the order of _queue.
    keyed := EXISTS (SELECT 1 FROM pgslots.waiters x      -- NOT _plain_queue(target), without the call
                     WHERE x.limit_id = target AND (x.priority <> 0 OR x.fairness_key IS NOT NULL));
    IF keyed THEN
        OPEN queued FOR
            SELECT x.id, x.slots, x.parts, x.lease_id, x.lease_seconds, x.host, x.pid,
                   x.application_name, x.holder, x.client_id, x.session_id, x.fairness_key, x.enqueued_at
            FROM pgslots._queue(target, at, aging, NULL, NULL, NULL) q
            JOIN pgslots.waiters x ON x.limit_id = target AND x.id = q.id
            ORDER BY q.place;
    ELSE
        OPEN queued FOR
            SELECT x.id, x.slots, x.parts, x.lease_id, x.lease_seconds, x.host, x.pid,
                   x.application_name, x.holder, x.client_id, x.session_id, x.fairness_key, x.enqueued_at
            FROM pgslots.waiters x
            WHERE x.limit_id = target AND x.expires_at > at
            ORDER BY x.id;
    END IF;
    LOOP
        FETCH queued INTO w;
        EXIT WHEN NOT FOUND;
        -- Nobody behind a waiter that does not fit may overtake it.
        EXIT WHEN NOT pgslots._fits(pgslots._shortfall(lim."limit", lim.leased_slots, lim.unleased, given, w.slots));
        IF w.lease_id IS NULL OR w.parts <> 1 THEN
            wake_rest := true;
            EXIT;
        END IF;
        token := nextval('pgslots.fencing_tokens');
        run_for := least(w.lease_seconds, 2 * ttl);
        expiry := at + make_interval(secs => run_for);
        -- A lease id already in use (the caller named it twice) is not granted again: no two leases
        -- share an id.
        INSERT INTO pgslots.leases (id, limit_id, part, slots, parts, fencing_token, acquired_at, expires_at,
                                    host, pid, application_name, holder, session_id)
        VALUES (w.lease_id, target, 1, w.slots, 1, token, at, expiry, w.host, w.pid, w.application_name, w.holder,
                w.session_id)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            given := given + w.slots;
            granted := granted + 1;
            waited := waited + date_part('epoch', at - w.enqueued_at);
            PERFORM pg_notify(pgslots._channel(w.client_id),
                              json_build_object('grant', json_build_object(
                                  'ticket', w.id, 'lease_id', w.lease_id, 'fencing_token', token,
                                  'expires_epoch', extract(epoch FROM expiry), 'term_seconds', run_for))::text);
        END IF;
        DELETE FROM pgslots.waiters x WHERE x.id = w.id;
        IF keyed THEN
            PERFORM pgslots._served(ARRAY[target], w.fairness_key, at);
        END IF;
        served := served + 1;
    END LOOP;
    CLOSE queued;
    IF given > 0 THEN
        UPDATE pgslots.limits l
        SET leased_slots = l.leased_slots + given, grants_total = l.grants_total + granted,
            wait_seconds_total = l.wait_seconds_total + waited
        WHERE l.id = target;
    END IF;
    IF wake_rest THEN
        PERFORM pgslots._wake(target, at);
    END IF;
    RETURN served;
END
$$;

CREATE FUNCTION pgslots.heartbeat(queue_client uuid, tickets bigint[] DEFAULT NULL) RETURNS bigint[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    mine bigint[];
BEGIN
    -- Given the tickets it waits on, only those keep their place: a request abandoned in the middle
    -- of its call (its ticket never known to the client) leaves the queue when its time is up. Only
    -- the caller's own places (its client id, its login role) are touched, and rows another session
    -- has locked (it is removing them) are skipped: a heartbeat never waits.
    UPDATE pgslots.waiters w
    SET expires_at = at + make_interval(secs => s.waiter_ttl_seconds)
    FROM pgslots.settings s
    WHERE (w.limit_id, w.id) IN (SELECT v.limit_id, v.id FROM pgslots.waiters v
                                 WHERE v.client_id = queue_client AND pgslots._by_caller(v.owner)
                                   AND (tickets IS NULL OR v.id = ANY (tickets))
                                 FOR UPDATE SKIP LOCKED);
    -- One walk of the queue per limit, not per waiter.
    SELECT array_agg(DISTINCT t ORDER BY t) INTO mine
    FROM (SELECT q.t FROM (SELECT DISTINCT w.limit_id FROM pgslots.waiters w
                           WHERE w.client_id = queue_client AND pgslots._by_caller(w.owner)) l,
                          unnest(pgslots._wakeable(l.limit_id, at)) AS q(t)
          WHERE (tickets IS NULL OR q.t = ANY (tickets))
            AND EXISTS (SELECT 1 FROM pgslots.waiters v
                        WHERE v.id = q.t AND v.client_id = queue_client AND pgslots._by_caller(v.owner))
          UNION ALL
          -- Tickets no longer queued: handed their lease, or dropped. Asking again tells which.
          SELECT g.t FROM unnest(tickets) AS g(t)
          WHERE NOT EXISTS (SELECT 1 FROM pgslots.waiters v WHERE v.id = g.t)) u(t);
    RETURN coalesce(mine, '{}');
END
$$;
COMMENT ON FUNCTION pgslots.heartbeat(uuid, bigint[]) IS
'Keeps the queued waiters of one client (queued by the calling login role) in their place for '
'another waiter_ttl_seconds, and returns the tickets that should ask again now: those among them '
'that free slots could serve, and those of `tickets` (the ones the client waits on) that are no '
'longer queued, e.g. because a release handed them their lease. A backstop for lost '
'notifications; it never waits for a lock. A client that stops calling it leaves the queue by itself.';

CREATE FUNCTION pgslots.leave_queue(ticket bigint, queue_client uuid, wait_seconds float8 DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz;
    left_limit record;
    was_queued boolean := false;
    prior text := pgslots._bound_waits(wait_seconds);
BEGIN
    -- Lock the ticket's limits first, as a release does: a release that is handing this ticket its
    -- lease right now finishes first, so the caller's release of that lease, next, finds it.
    PERFORM 1 FROM pgslots.limits l
    WHERE l.id IN (SELECT w.limit_id FROM pgslots.waiters w
                   WHERE w.id = leave_queue.ticket AND w.client_id = leave_queue.queue_client
                     AND pgslots._by_caller(w.owner))
    ORDER BY l.id FOR UPDATE;
    at := pgslots._now();
    FOR left_limit IN DELETE FROM pgslots.waiters w
                      WHERE w.id = leave_queue.ticket AND w.client_id = leave_queue.queue_client
                        AND pgslots._by_caller(w.owner)
                      RETURNING w.limit_id, w.refused LOOP
        was_queued := true;
        PERFORM pgslots._wake(left_limit.limit_id, at);   -- those behind may fit now
        IF left_limit.refused THEN
            PERFORM pgslots._gave_up(ARRAY[left_limit.limit_id]);   -- it leaves without its slots
        END IF;
    END LOOP;
    IF prior IS NOT NULL THEN
        PERFORM pgslots._unbound_waits(prior);
    END IF;
    RETURN was_queued;
END
$$;
COMMENT ON FUNCTION pgslots.leave_queue(bigint, uuid, float8) IS
'Takes a waiter ticket out of the queue (the caller gave up waiting); true when it was queued. '
'Only the client and login role the ticket was issued to can remove it; for anyone else it '
'changes nothing. Idempotent. wait_seconds bounds each lock wait as in acquire.';
