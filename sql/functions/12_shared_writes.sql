-- Writes every admission path shares: queue places, the lock-wait bound, refusal pressure, reclaims.

-- Queues a waiter on every limit it asked for (not only the full ones), or refreshes its place;
-- each place remembers whether its limit refused (`blocked`), for the refusal to count if the
-- waiter leaves without its slots (see _gave_up). With a named lease, it leaves what a release
-- needs to grant that lease directly. The ticket is always one this caller owns (see _own_ticket)
-- or a new one: a place is never taken over, and keeps the priority and fairness key it was queued with.
CREATE FUNCTION pgslots._enqueue(ticket bigint, ids uuid[], blocked uuid[], slots integer, queue_client uuid,
                                 at timestamptz, ttl_seconds float8, lease_id uuid,
                                 lease_seconds float8, holder jsonb, session uuid,
                                 priority integer, fairness_key text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pgslots.waiters AS w (id, limit_id, slots, client_id, enqueued_at, expires_at,
                                      parts, lease_id, lease_seconds, host, pid,
                                      application_name, holder, owner, session_id, priority, fairness_key,
                                      refused)
    SELECT ticket, i, _enqueue.slots, queue_client, at, at + make_interval(secs => ttl_seconds),
           cardinality(ids), _enqueue.lease_id, _enqueue.lease_seconds,
           pgslots._holder_host(_enqueue.holder), pgslots._holder_pid(_enqueue.holder),
           pgslots._application_name(), _enqueue.holder, session_user, session,
           coalesce(_enqueue.priority, 0), _enqueue.fairness_key, i = ANY (blocked)
    FROM unnest(ids) AS i
    ON CONFLICT (limit_id, id) DO UPDATE
    SET expires_at = excluded.expires_at, lease_id = excluded.lease_id,
        lease_seconds = excluded.lease_seconds, owner = excluded.owner, refused = w.refused OR excluded.refused
    WHERE w.client_id = excluded.client_id AND pgslots._by_caller(w.owner);
END
$$;

-- A queue place taken by the calling login role (those queued before places had owners count as
-- anyone's: their random client id is their proof).
CREATE FUNCTION pgslots._by_caller(owner name) RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT coalesce(owner, session_user) = session_user $$;

-- The ticket a caller passed back, if it is still queued and was issued to this client and login
-- role; NULL otherwise, and the caller is then a new arrival. So no caller can take over, move or
-- plant a place in the queue by passing a ticket number.
CREATE FUNCTION pgslots._own_ticket(ticket bigint, queue_client uuid) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT min(w.id) FROM pgslots.waiters w
    WHERE w.id = ticket AND w.client_id = queue_client AND pgslots._by_caller(w.owner)
$$;

-- The lock-wait bound of every call that takes wait_seconds, written once: _bound_waits at its
-- _bound_waits bounds each lock wait of the call's transaction by wait_seconds (lock_timeout), so a
-- call blocked behind another session's open transaction or advisory lock gives up in time,
-- changing nothing; _unbound_waits at its end puts back the caller's lock_timeout, which
-- _bound_waits returned. NULL: no bound, nothing changed (callers then skip _unbound_waits: each
-- call is a statement).
CREATE FUNCTION pgslots._bound_waits(wait_seconds float8) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    prior text;
BEGIN
    IF wait_seconds IS NULL THEN
        RETURN NULL;
    END IF;
    prior := pg_catalog.current_setting('lock_timeout');
    RETURN pgslots._set_lock_timeout(wait_seconds, prior);
END
$$;

CREATE FUNCTION pgslots._unbound_waits(prior text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF prior IS NOT NULL THEN
        PERFORM pgslots._reset_lock_timeout(prior);
    END IF;
END
$$;

-- wait_seconds is a finite number >= 0, or NULL: says so.
CREATE FUNCTION pgslots._bad_wait_seconds(wait_seconds float8) RETURNS text
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'wait_seconds must be a finite number >= 0 (or NULL: no bound), got %.', wait_seconds
        USING ERRCODE = 'PS012', HINT = 'Pass how long the call may wait for locks, e.g. 5.';
END
$$;

-- The two halves as expressions, which the planner inlines: release, the hot path's most frequent
-- call, bounds its waits with them in assignments, each of which costs less than a call of the
-- pair. _set_lock_timeout sets lock_timeout for wait_seconds (not NULL) for the rest of the
-- transaction and answers `keep`, the setting it replaces, which the caller read before (into a
-- variable: an expression passed as `keep` would be read after the change); it counts whole
-- milliseconds, and 0 would mean no bound at all.
CREATE FUNCTION pgslots._set_lock_timeout(wait_seconds float8, keep text) RETURNS text
LANGUAGE sql VOLATILE
AS $$
    SELECT CASE WHEN NOT (wait_seconds >= 0 AND wait_seconds < 'Infinity'::float8)
                THEN pgslots._bad_wait_seconds(wait_seconds)
                WHEN pg_catalog.set_config('lock_timeout',
                         least(2147483647, greatest(1, pg_catalog.ceil(wait_seconds * 1000)))::bigint::text || 'ms',
                         true) IS NOT NULL   -- it answers the new setting, never NULL
                THEN keep
           END
$$;

CREATE FUNCTION pgslots._reset_lock_timeout(prior text) RETURNS text
LANGUAGE sql VOLATILE
AS $$ SELECT pg_catalog.set_config('lock_timeout', prior, true) $$;

-- Refusal pressure, counted beside the limits so that counting needs no lock on their rows: the
-- slots denied, at every refusal; the refusal itself only when it ends the call (`final`: the
-- caller does not queue). A queued caller's refusal counts when it leaves without its slots.
CREATE FUNCTION pgslots._count_refusal(ids uuid[], slots integer, final boolean) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pgslots.refusals AS r (limit_id, denied_slots, refusals_total)
    SELECT i, slots, CASE WHEN final THEN 1 ELSE 0 END FROM unnest(ids) AS i
    ON CONFLICT (limit_id) DO UPDATE SET denied_slots = r.denied_slots + excluded.denied_slots,
                                         refusals_total = r.refusals_total + excluded.refusals_total;
END
$$;

-- Waiters that left the queue without their slots (gave up, timed out, died): each place whose
-- limit refused it counts one refusal there. `limit_ids` holds one entry per such place.
CREATE FUNCTION pgslots._gave_up(limit_ids uuid[]) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF cardinality(limit_ids) > 0 THEN
        INSERT INTO pgslots.refusals AS r (limit_id, denied_slots, refusals_total)
        SELECT i, 0, count(*) FROM unnest(limit_ids) AS i GROUP BY i
        ON CONFLICT (limit_id) DO UPDATE SET refusals_total = r.refusals_total + excluded.refusals_total;
    END IF;
END
$$;

-- Deletes the lease rows of one limit (whose row lock the caller holds) that expired or whose
-- session died; returns the slots.
CREATE FUNCTION pgslots._reclaim(target uuid, at timestamptz) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    freed bigint;
    taken bigint;
    liveness float8 := (SELECT s.liveness_seconds FROM pgslots.settings s);
BEGIN
    WITH gone AS (
        DELETE FROM pgslots.leases x
        WHERE x.limit_id = target AND pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, at, liveness)
        RETURNING x.slots
    )
    SELECT coalesce(sum(gone.slots), 0), count(*) INTO freed, taken FROM gone;
    IF taken > 0 THEN
        UPDATE pgslots.limits l SET leased_slots = greatest(0, l.leased_slots - freed),
                                    expired_leases_total = l.expired_leases_total + taken
        WHERE l.id = target;
    END IF;
    RETURN freed;
END
$$;

-- Deletes the waiters nobody heartbeats any more (of the limits `targets`, or of all when NULL):
-- they left without their slots, so the places whose limit refused them count as refusals.
CREATE FUNCTION pgslots._drop_expired_waiters(targets uuid[], at timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    quitters uuid[];
BEGIN
    WITH gone AS (
        DELETE FROM pgslots.waiters w
        WHERE (targets IS NULL OR w.limit_id = ANY (targets)) AND w.expires_at <= at
        RETURNING w.limit_id, w.refused)
    SELECT array_agg(g.limit_id) FILTER (WHERE g.refused) INTO quitters FROM gone g;
    PERFORM pgslots._gave_up(quitters);
END
$$;
