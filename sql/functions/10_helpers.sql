-- The clock, argument checks, and the small pieces every slot decision shares.
--
-- The pieces a decision is made of (decay, the grant test, the retry hint, the holder columns) are
-- LANGUAGE sql functions without a SET clause, their names schema-qualified: the planner inlines
-- them into the statements that call them, so sharing them costs nothing on the hot path. Pieces
-- that write (a lease, a queue place, a refusal) are PL/pgSQL, whose plans stay cached.

---------------------------------------------------------------------------------------------------
-- Clock
---------------------------------------------------------------------------------------------------

-- The pgslots clock: the database clock, moved by settings.clock_offset (tests only).
CREATE FUNCTION pgslots._clock(clock_offset interval) RETURNS timestamptz
LANGUAGE sql VOLATILE
AS $$ SELECT pg_catalog.clock_timestamp() + clock_offset $$;

CREATE FUNCTION pgslots._now() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN pgslots._clock((SELECT s.clock_offset FROM pgslots.settings s));
END
$$;

---------------------------------------------------------------------------------------------------
-- The pieces of a decision
---------------------------------------------------------------------------------------------------

-- Unleased slots left at `at`, decaying continuously at `rate` since `since`.
CREATE FUNCTION pgslots._decayed(amount float8, rate float8, since timestamptz, at timestamptz)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN rate > 0
        THEN greatest(0::float8,
             amount - rate * greatest(0::float8, pg_catalog.date_part('epoch', at - since)::float8))
        ELSE amount END
$$;

-- How many slots are missing for a request of `slots` on a limit of `capacity` holding `leased`
-- and `unleased` slots, with `queued` slots of waiters ahead of it. Zero or less: it fits.
CREATE FUNCTION pgslots._shortfall(capacity integer, leased integer, unleased float8, queued bigint,
                                   slots integer)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT leased + unleased + queued + slots - capacity::float8 $$;

-- The grant test. The tolerance absorbs the rounding of continuous decay.
CREATE FUNCTION pgslots._fits(shortfall float8) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT shortfall <= 1e-9 $$;

-- Seconds until a refused request may fit. Exact for a decaying limit whose leases leave room (the
-- slots of waiters ahead decay too); otherwise estimated from the average time a slot is held,
-- between 0.1 s and 30 s.
CREATE FUNCTION pgslots._retry_after(shortfall float8, capacity integer, leased integer, slots integer,
                                     rate float8, avg_slot_occupancy_seconds float8)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN rate > 0 AND leased + slots <= capacity
        THEN shortfall / rate
        ELSE least(30::float8, greatest(0.1::float8,
                   avg_slot_occupancy_seconds * shortfall / greatest(capacity, 1)))
    END
$$;

-- The average time a slot is held, after one more lease of `held_seconds` ended: a moving average
-- with weight 1/(2*limit), the base of the retry hint.
CREATE FUNCTION pgslots._occupancy_after(average float8, held_seconds float8, capacity integer)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT greatest(0.1::float8, average + (held_seconds - average) / (2.0 * greatest(capacity, 1))) $$;

-- Holder columns of a lease: where the holder said it runs, else what the connection shows.
CREATE FUNCTION pgslots._holder_host(holder jsonb) RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT coalesce(holder ->> 'host', pg_catalog.host(pg_catalog.inet_client_addr()), 'local') $$;

CREATE FUNCTION pgslots._holder_pid(holder jsonb) RETURNS integer
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN holder ->> 'pid' ~ '^[0-9]{1,9}$' THEN (holder ->> 'pid')::integer
                ELSE pg_catalog.pg_backend_pid() END
$$;

CREATE FUNCTION pgslots._application_name() RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT nullif(pg_catalog.current_setting('application_name'), '') $$;

-- The queue lock of a limit (an advisory lock, class 1885827953): taken shared by an acquire that
-- queues without the limit's row lock, exclusively by every release and wake-up before it reads the
-- queue, so none of them can miss a waiter being queued. See acquire.
CREATE FUNCTION pgslots._lock_queue(target uuid) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT pg_catalog.pg_advisory_xact_lock(1885827953, pg_catalog.hashtext(target::text)) $$;

CREATE FUNCTION pgslots._lock_queue_shared(target uuid) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT pg_catalog.pg_advisory_xact_lock_shared(1885827953, pg_catalog.hashtext(target::text)) $$;

-- Liveness. A lease taken for a session (a client process that calls keep_alive) is dead once the
-- session has not been seen for liveness_seconds and the connection it last called keep_alive from
-- is gone: the process died, or was cut off for longer than it could hold on (its client gives the
-- leases up before then). A session without a connection of its own (kept alive through a pooler)
-- is judged by time alone. A connection still there (a paused process) keeps its leases until they
-- expire.
--
-- The connection is known by an advisory lock, not by its backend PID: keep_alive takes the
-- session's lock, shared, for the life of its connection, and a connection that ends lets it go.
-- A PID can be reused by another connection after the holder died; a lock held by nobody cannot.
CREATE FUNCTION pgslots._session_lock(session uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE
AS $$ SELECT ('x' || pg_catalog.left(pg_catalog.replace(session::text, '-', ''), 16))::bit(64)::bigint $$;

-- True while a connection holds the session's lock. Probing takes the lock exclusively when it is
-- free, until the end of the caller's transaction: a keep_alive meanwhile cannot take it, but that
-- keep_alive marks the session seen, which keeps it alive just the same.
CREATE FUNCTION pgslots._connected(session uuid) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$ SELECT NOT pg_catalog.pg_try_advisory_xact_lock(pgslots._session_lock(session)) $$;

CREATE FUNCTION pgslots._session_dead(session uuid, at timestamptz, liveness_seconds float8) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT EXISTS (SELECT 1 FROM pgslots.sessions s
                   WHERE s.id = session AND s.seen_at <= at - make_interval(secs => liveness_seconds)
                     AND (s.backend_pid IS NULL OR NOT pgslots._connected(s.id)))
$$;

-- A lease row whose slots may be taken back: expired, or its session dead (and the lease older than
-- liveness_seconds: a session silent for a while, e.g. idle between two leases, does not doom a new one).
CREATE FUNCTION pgslots._lease_gone(expires_at timestamptz, session uuid, acquired_at timestamptz,
                                    at timestamptz, liveness_seconds float8) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT expires_at <= at
        OR (session IS NOT NULL AND acquired_at <= at - make_interval(secs => liveness_seconds)
            AND pgslots._session_dead(session, at, liveness_seconds))
$$;

-- Notifications go to each waiting client's own channel, so a release wakes only the process it serves.
CREATE FUNCTION pgslots._channel(client_id uuid) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT 'pgslots:' || client_id::text $$;

---------------------------------------------------------------------------------------------------
-- Writes every path shares
---------------------------------------------------------------------------------------------------

-- Queues a waiter on every limit it asked for (not only the full ones), or refreshes its place.
-- With a named lease, it leaves what a release needs to grant that lease directly. The ticket is
-- always one this caller owns (see _own_ticket) or a new one: a place is never taken over, and a
-- place keeps the priority and fairness key it was queued with.
CREATE FUNCTION pgslots._enqueue(ticket bigint, ids uuid[], slots integer, queue_client uuid,
                                 at timestamptz, ttl_seconds float8, lease_id uuid,
                                 lease_seconds float8, holder jsonb, session uuid,
                                 priority integer, fairness_key text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pgslots.waiters AS w (id, limit_id, slots, client_id, enqueued_at, expires_at,
                                      parts, lease_id, lease_seconds, host, pid,
                                      application_name, holder, owner, session_id, priority, fairness_key)
    SELECT ticket, i, _enqueue.slots, queue_client, at, at + make_interval(secs => ttl_seconds),
           cardinality(ids), _enqueue.lease_id, _enqueue.lease_seconds,
           pgslots._holder_host(_enqueue.holder), pgslots._holder_pid(_enqueue.holder),
           pgslots._application_name(), _enqueue.holder, session_user, session,
           coalesce(_enqueue.priority, 0), _enqueue.fairness_key
    FROM unnest(ids) AS i
    ON CONFLICT (limit_id, id) DO UPDATE
    SET expires_at = excluded.expires_at, lease_id = excluded.lease_id,
        lease_seconds = excluded.lease_seconds, owner = excluded.owner
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

-- Bounds every lock wait of the calling function's transaction by wait_seconds (lock_timeout), so
-- a call blocked behind another session's open transaction or advisory lock gives up in time,
-- changing nothing. Returns the lock_timeout to put back before the function returns.
CREATE FUNCTION pgslots._bound_waits(wait_seconds float8) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    prior text := pg_catalog.current_setting('lock_timeout');
BEGIN
    IF NOT (wait_seconds >= 0 AND wait_seconds < 'Infinity'::float8) THEN
        RAISE EXCEPTION 'wait_seconds must be a finite number >= 0 (or NULL: no bound), got %.', wait_seconds
            USING ERRCODE = 'PS012', HINT = 'Pass how long the call may wait for locks, e.g. 5.';
    END IF;
    -- lock_timeout counts in whole milliseconds, and 0 would mean no bound at all.
    PERFORM pg_catalog.set_config('lock_timeout',
        least(2147483647, greatest(1, ceil(wait_seconds * 1000)))::bigint::text || 'ms', true);
    RETURN prior;
END
$$;

-- Refusal pressure, counted beside the limits so that counting needs no lock on their rows.
CREATE FUNCTION pgslots._count_refusal(ids uuid[], slots integer) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO pgslots.refusals AS r (limit_id, denied_slots, refusals_total)
    SELECT i, slots, 1 FROM unnest(ids) AS i
    ON CONFLICT (limit_id) DO UPDATE SET denied_slots = r.denied_slots + excluded.denied_slots,
                                         refusals_total = r.refusals_total + 1;
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

---------------------------------------------------------------------------------------------------
-- Sliding windows and limit values
---------------------------------------------------------------------------------------------------

-- Forgets the grants of a window limit (whose row lock the caller holds) that have left its window,
-- taking their slots off unleased_slots (for a window limit: the slots granted in the window).
-- A grant made exactly `window` seconds ago has left: spans are half-open.
CREATE FUNCTION pgslots._window_purge(target uuid, window_seconds float8, at timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    freed float8;
BEGIN
    WITH gone AS (
        DELETE FROM pgslots.window_grants g
        WHERE g.limit_id = target AND g.granted_at <= at - make_interval(secs => window_seconds)
        RETURNING g.slots
    )
    SELECT sum(gone.slots) INTO freed FROM gone;
    IF freed IS NOT NULL THEN
        -- Sums drift by rounding: an empty window is exactly 0.
        UPDATE pgslots.limits l
        SET unleased_slots = CASE WHEN EXISTS (SELECT 1 FROM pgslots.window_grants g WHERE g.limit_id = target)
                                  THEN greatest(0, l.unleased_slots - freed) ELSE 0 END
        WHERE l.id = target;
    END IF;
END
$$;

-- Gives one grant of a window limit's log (whose row lock the caller holds) its settled cost. A
-- grant settled to nothing leaves the log. Grants of less than one slot are folded into the newest
-- of them, so their slots leave the window later, never sooner: the log holds at most one grant of
-- less than a slot, and so no more grants than the slots in the window, plus one.
CREATE FUNCTION pgslots._window_settle(target uuid, grant_id bigint, granted_at timestamptz, slots float8) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    newest record;
    folded float8;
BEGIN
    IF slots <= 0 THEN
        DELETE FROM pgslots.window_grants g
        WHERE g.limit_id = target AND g.granted_at = _window_settle.granted_at AND g.id = grant_id;
        RETURN;
    END IF;
    UPDATE pgslots.window_grants g SET slots = _window_settle.slots
    WHERE g.limit_id = target AND g.granted_at = _window_settle.granted_at AND g.id = grant_id;
    IF slots < 1 THEN
        SELECT g.granted_at, g.id INTO newest FROM pgslots.window_grants g
        WHERE g.limit_id = target AND g.slots < 1
        ORDER BY g.granted_at DESC, g.id DESC LIMIT 1;
        WITH f AS (
            DELETE FROM pgslots.window_grants g
            WHERE g.limit_id = target AND g.slots < 1 AND (g.granted_at, g.id) <> (newest.granted_at, newest.id)
            RETURNING g.slots)
        SELECT sum(f.slots) INTO folded FROM f;
        IF folded IS NOT NULL THEN
            UPDATE pgslots.window_grants g SET slots = g.slots + folded
            WHERE g.limit_id = target AND g.granted_at = newest.granted_at AND g.id = newest.id;
        END IF;
    END IF;
END
$$;

-- Seconds until `shortfall` slots of a window limit have left its window: the oldest grants leave
-- first, each exactly `window` seconds after it was made. Exact; when the window holds fewer slots
-- than that (slots of waiters ahead count too), a whole window.
CREATE FUNCTION pgslots._window_wait(target uuid, shortfall float8, window_seconds float8, at timestamptz)
RETURNS float8
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    leaves timestamptz;
BEGIN
    -- A running sum over the log in index order, stopped at the first grant that frees enough (the
    -- LIMIT makes the planner walk the index instead of sorting the whole window).
    SELECT g.granted_at INTO leaves
    FROM (SELECT x.granted_at, sum(x.slots) OVER (ORDER BY x.granted_at, x.id ROWS UNBOUNDED PRECEDING) AS freed
          FROM pgslots.window_grants x
          WHERE x.limit_id = target AND x.granted_at > at - make_interval(secs => window_seconds)
          ORDER BY x.granted_at, x.id) g
    WHERE pgslots._fits(shortfall - g.freed)
    LIMIT 1;
    IF leaves IS NULL THEN
        RETURN window_seconds;
    END IF;
    RETURN greatest(0, window_seconds - pg_catalog.date_part('epoch', at - leaves)::float8);
END
$$;

-- The slots a window limit granted in its window up to `at` (for readers: purged or not).
CREATE FUNCTION pgslots._window_used(target uuid, window_seconds float8, at timestamptz) RETURNS float8
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(sum(g.slots), 0)::float8 FROM pgslots.window_grants g
    WHERE g.limit_id = target AND g.granted_at > at - make_interval(secs => window_seconds)
$$;

-- Gives limits (whose row locks the caller holds) new values; NULL leaves a value as it is. What
-- they hold carries over exactly: decay is brought up to now at the old rate; a limit that becomes
-- a window limit counts what its bucket still held as one grant made now; a window limit that
-- stops being one keeps the slots of its window, which then decay (or stay, without decay).
CREATE FUNCTION pgslots._set_values(ids uuid[], at timestamptz, "limit" integer, slot_decay_per_second float8,
                                    window_seconds float8, active boolean, shadow boolean)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF window_seconds > 0 THEN
        INSERT INTO pgslots.window_grants (limit_id, granted_at, slots)
        SELECT l.id, at, d.held
        FROM pgslots.limits l,
             LATERAL (SELECT pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at) AS held) d
        WHERE l.id = ANY (ids) AND l.window_seconds = 0 AND d.held > 1e-9;
    END IF;
    UPDATE pgslots.limits l SET
        unleased_slots = CASE
            WHEN l.window_seconds > 0 AND coalesce(_set_values.window_seconds, l.window_seconds) > 0 THEN l.unleased_slots
            WHEN l.window_seconds > 0 THEN pgslots._window_used(l.id, l.window_seconds, at)
            ELSE pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at) END,
        decayed_at = at,
        "limit" = coalesce(_set_values."limit", l."limit"),
        slot_decay_per_second = coalesce(_set_values.slot_decay_per_second, l.slot_decay_per_second),
        window_seconds = coalesce(_set_values.window_seconds, l.window_seconds),
        active = coalesce(_set_values.active, l.active),
        shadow = coalesce(_set_values.shadow, l.shadow),
        updated = at
    WHERE l.id = ANY (ids);
    IF window_seconds = 0 THEN
        DELETE FROM pgslots.window_grants g WHERE g.limit_id = ANY (ids);
    END IF;
END
$$;

---------------------------------------------------------------------------------------------------
-- The order of a queue: priorities, aging, round-robin across fairness keys
---------------------------------------------------------------------------------------------------

-- The live waiters of one limit in the order they are served, `place` 1 first: higher priority level
-- first (a waiter's priority plus one level per priority_aging_seconds it has waited); within a
-- level, round-robin across fairness keys (a key's first waiter is in round 1, its second in round
-- 2...; within a round, the key served least recently first, then the key with the oldest waiter);
-- within a key, by ticket. Waiters without a key form one group. A caller not queued on this limit
-- yet (the ticket is not queued here) is placed where it would join now, as id `ticket` or, without
-- one, as the largest id, with 0 slots; pass priority NULL to leave it out.
-- When neither the caller nor any waiter of the limit uses a priority or a key, that order is the
-- ticket order (aging lifts older waiters, which are ahead already), taken without the sort.
CREATE FUNCTION pgslots._queue(target uuid, at timestamptz, aging float8, ticket bigint,
                               priority integer, fairness_key text)
RETURNS TABLE (id bigint, slots integer, place bigint)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF coalesce(priority, 0) = 0 AND fairness_key IS NULL AND pgslots._plain_queue(target) THEN
        RETURN QUERY
        SELECT q.id, q.slots, pg_catalog.row_number() OVER (ORDER BY q.id)
        FROM (SELECT w.id, w.slots FROM pgslots.waiters w
              WHERE w.limit_id = target AND (w.expires_at > at OR w.id = ticket)
              UNION ALL
              SELECT coalesce(ticket, 9223372036854775807), 0
              WHERE priority IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = target AND w.id = ticket)) q;
        RETURN;
    END IF;
    -- One window pass (a key's running minimum id in id order is its first waiter's), one sort.
    RETURN QUERY
    SELECT r.id, r.slots,
           pg_catalog.row_number() OVER (ORDER BY r.level DESC, r.round, r.served_at, r.first, r.id)
    FROM (SELECT q.id, q.slots, q.level,
                 -- A key goes by when it was last served; a key not served while it waited (a new
                 -- key, or one whose history was pruned) by when its first waiter arrived. So a new
                 -- key per request earns no earlier place than first come, first served.
                 coalesce(s.served_at, min(q.enqueued_at) OVER (PARTITION BY q.k)) AS served_at,
                 pg_catalog.row_number() OVER w AS round, min(q.id) OVER w AS first
          FROM (SELECT w.id, w.slots, coalesce(w.fairness_key, '') AS k, w.enqueued_at,
                       w.priority + CASE WHEN aging > 0
                           THEN floor(greatest(0, pg_catalog.date_part('epoch', at - w.enqueued_at)) / aging)
                           ELSE 0 END AS level
                FROM pgslots.waiters w
                WHERE w.limit_id = target AND (w.expires_at > at OR w.id = ticket)
                UNION ALL
                SELECT coalesce(ticket, 9223372036854775807), 0, coalesce(fairness_key, ''), at, priority
                WHERE priority IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = target AND w.id = ticket)) q
          LEFT JOIN pgslots.served_keys s ON s.limit_id = target AND s.fairness_key = q.k
          WINDOW w AS (PARTITION BY q.level, q.k ORDER BY q.id)) r;
END
$$;

-- True when no waiter of the limit uses a priority or a fairness key: its queue is in ticket order.
-- (One probe of the partial index waiters_ordered.)
-- PL/pgSQL, not SQL: a SQL function that is not inlined is planned again on every call.
CREATE FUNCTION pgslots._plain_queue(target uuid) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN NOT EXISTS (SELECT 1 FROM pgslots.waiters w
                       WHERE w.limit_id = target AND (w.priority <> 0 OR w.fairness_key IS NOT NULL));
END
$$;

-- The slots of the live waiters of one limit that are served before the caller (queued as `ticket`,
-- or arriving now with `priority` and `fairness_key`): a request fits only after them.
CREATE FUNCTION pgslots._ahead(target uuid, at timestamptz, aging float8, ticket bigint,
                               priority integer, fairness_key text)
RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    plain_sum bigint;
BEGIN
    IF coalesce(priority, 0) = 0 AND fairness_key IS NULL THEN
        -- A plain queue (see _plain_queue, asked here in the same statement): the ticket order.
        SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pgslots.waiters w
                                     WHERE w.limit_id = target AND (w.priority <> 0 OR w.fairness_key IS NOT NULL))
                    THEN (SELECT coalesce(sum(w.slots), 0) FROM pgslots.waiters w
                          WHERE w.limit_id = target AND w.expires_at > at AND (ticket IS NULL OR w.id < ticket))
               END
        INTO plain_sum;
        IF plain_sum IS NOT NULL THEN
            RETURN plain_sum;
        END IF;
    END IF;
    RETURN (WITH o AS (SELECT * FROM pgslots._queue(target, at, aging, ticket, coalesce(priority, 0),
                                                    fairness_key))
            SELECT coalesce(sum(o.slots), 0) FROM o
            WHERE o.place < (SELECT m.place FROM o m WHERE m.id = coalesce(ticket, 9223372036854775807)));
END
$$;

-- Remembers that `fairness_key` was served on these limits now, when others wait there and keys or
-- priorities are in play (the caller's or a waiter's): the next round of their round-robin then
-- starts with another key. Plain queues skip the write. The history of a limit is kept to about
-- 1024 keys: past that, each new key removes the rows of a few keys served longest ago that wait
-- no more (such a key, queued again, goes by its first waiter's arrival, see _queue).
CREATE FUNCTION pgslots._served(ids uuid[], fairness_key text, at timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    grown uuid[];
BEGIN
    WITH written AS (
        INSERT INTO pgslots.served_keys AS s (limit_id, fairness_key, served_at)
        SELECT i, coalesce(_served.fairness_key, ''), at FROM unnest(ids) AS i
        WHERE EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = i)
          AND (_served.fairness_key IS NOT NULL OR NOT pgslots._plain_queue(i))
        ON CONFLICT ON CONSTRAINT served_keys_pkey DO UPDATE SET served_at = excluded.served_at
        RETURNING s.limit_id, (s.xmax = 0) AS inserted)
    SELECT array_agg(w.limit_id) INTO grown FROM written w WHERE w.inserted;
    IF grown IS NOT NULL THEN
        DELETE FROM pgslots.served_keys s
        WHERE (s.limit_id, s.fairness_key) IN (
            SELECT x.limit_id, x.fairness_key
            FROM unnest(grown) AS g(id)
            CROSS JOIN LATERAL (
                SELECT k.limit_id, k.fairness_key FROM pgslots.served_keys k
                WHERE k.limit_id = g.id
                  AND (SELECT count(*) FROM (SELECT 1 FROM pgslots.served_keys c WHERE c.limit_id = g.id LIMIT 1025) n) > 1024
                  AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w
                                  WHERE w.limit_id = k.limit_id AND coalesce(w.fairness_key, '') = k.fairness_key)
                ORDER BY k.served_at LIMIT 4) x);
    END IF;
END
$$;

---------------------------------------------------------------------------------------------------
-- Templates and their instances
---------------------------------------------------------------------------------------------------

-- The template whose prefix is the longest that `name` starts with (names ending in `*` are never
-- keys, and a key is longer than the prefix); NULL when none.
CREATE FUNCTION pgslots._template_for(name text) RETURNS uuid
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (SELECT t.id FROM pgslots.limits t
            WHERE t.is_template AND pg_catalog.right(_template_for.name, 1) <> '*'
              AND pg_catalog.char_length(_template_for.name) >= pg_catalog.char_length(t.name)
              AND pg_catalog.starts_with(_template_for.name, pg_catalog.left(t.name, -1))
            ORDER BY pg_catalog.char_length(t.name) DESC
            LIMIT 1);
END
$$;

-- Creates the instances of the names that have no limit row and match a template, with the
-- template's values; returns how many it created. Race-free: two callers creating one name get one
-- row (the second waits for the first's insert, then finds it). Names are inserted in name order,
-- the one order every creator uses, so two callers creating the same names never deadlock.
-- A template at its number of live keys (max_keys, else settings.max_keys_per_template) first
-- drops a few idle ones; a new key that still finds no room is refused with PS016.
CREATE FUNCTION pgslots._create_instances(names text[], at timestamptz) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    created integer;
    tpl record;
BEGIN
    FOR tpl IN SELECT n.template, min(n.name) AS example,
                    coalesce(min(l.max_keys), (SELECT s.max_keys_per_template FROM pgslots.settings s)) AS most,
                    min(l.name) AS template_name
             FROM (SELECT u.name, pgslots._template_for(u.name) AS template
                   FROM unnest(names) AS u(name)
                   WHERE NOT EXISTS (SELECT 1 FROM pgslots.limits x WHERE x.name = u.name)) n
             JOIN pgslots.limits l ON l.id = n.template
             GROUP BY n.template LOOP
        IF pgslots._keys_of(tpl.template, tpl.most) >= tpl.most THEN
            PERFORM pgslots._drop_idle(tpl.template, at, 8);
            IF pgslots._keys_of(tpl.template, tpl.most) >= tpl.most THEN
                RAISE EXCEPTION 'Template % has % live keys, its most: key % cannot be created now.',
                    quote_literal(tpl.template_name), tpl.most, quote_literal(left(tpl.example, 80))
                    USING ERRCODE = 'PS016',
                          HINT = 'Try again once keys are idle, or raise the template''s max_keys (update_limit) or settings.max_keys_per_template.';
            END IF;
        END IF;
    END LOOP;
    INSERT INTO pgslots.limits AS l (name, "limit", slot_decay_per_second, window_seconds, shadow, active,
                                     decayed_at, created, updated, template_id)
    SELECT n.name, t."limit", t.slot_decay_per_second, t.window_seconds, t.shadow, t.active, at, at, at, t.id
    FROM (SELECT u.name, pgslots._template_for(u.name) AS template
          FROM unnest(names) AS u(name)
          WHERE NOT EXISTS (SELECT 1 FROM pgslots.limits x WHERE x.name = u.name)) n
    JOIN pgslots.limits t ON t.id = n.template
    ORDER BY n.name
    ON CONFLICT (name) DO NOTHING;
    GET DIAGNOSTICS created = ROW_COUNT;
    RETURN created;
END
$$;

-- The live keys of a template, counted up to `most` (an index-only walk of at most that many entries).
CREATE FUNCTION pgslots._keys_of(template uuid, most integer) RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT count(*) FROM (SELECT 1 FROM pgslots.limits l WHERE l.template_id = template LIMIT most) k
$$;

-- An instance nobody uses (retiring ones included: they keep their deleted template's id): no
-- lease, no waiter, and no rate slot left after decay or in its window; a retiring instance's rate
-- slots (a debt, say) go with it, as its template is gone.
CREATE FUNCTION pgslots._idle(l pgslots.limits, at timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN l.template_id IS NOT NULL AND l.leased_slots = 0
       AND (l.retiring
            OR CASE WHEN l.window_seconds > 0 THEN pgslots._window_used(l.id, l.window_seconds, at) <= 1e-9
                    ELSE pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at) <= 1e-9 END)
       AND NOT EXISTS (SELECT 1 FROM pgslots.leases x WHERE x.limit_id = l.id)
       AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id);
END
$$;

-- Deletes up to `most` idle instances of one template (NULL: of every template, and retiring ones),
-- skipping rows another transaction has locked (someone is using them): it never waits. Returns how
-- many it deleted.
CREATE FUNCTION pgslots._drop_idle(template uuid, at timestamptz, most integer) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    gone uuid[];
    start uuid;
BEGIN
    IF template IS NULL OR most IS NULL THEN
        gone := ARRAY(SELECT l.id FROM pgslots.limits l
                      WHERE l.template_id IS NOT NULL AND (template IS NULL OR l.template_id = template)
                        AND pgslots._idle(l, at)
                      LIMIT most
                      FOR UPDATE SKIP LOCKED);
    ELSE
        -- A few keys from a random point of the template's keys (wrapping around), never all of
        -- them: a template with many busy keys costs a new key as little as one with none.
        start := gen_random_uuid();
        gone := ARRAY(SELECT c.id FROM pgslots.limits c
                      WHERE c.id IN ((SELECT l.id FROM pgslots.limits l
                                      WHERE l.template_id = template AND l.id >= start ORDER BY l.id LIMIT 8 * most)
                                     UNION ALL
                                     (SELECT l.id FROM pgslots.limits l
                                      WHERE l.template_id = template AND l.id < start ORDER BY l.id LIMIT 8 * most))
                        AND pgslots._idle(c, at)
                      LIMIT most
                      FOR UPDATE SKIP LOCKED);
    END IF;
    IF cardinality(gone) > 0 THEN
        -- Their counters stay in their template's totals (a retiring key's template is gone: the
        -- foreign key then finds no row, and the counters go with the template).
        INSERT INTO pgslots.retired_counters AS c (template_id, grants_total, refusals_total, wait_seconds_total,
                                                   expired_leases_total, shadow_refusals)
        SELECT l.template_id, sum(l.grants_total),
               coalesce(sum((SELECT r.refusals_total FROM pgslots.refusals r WHERE r.limit_id = l.id)), 0),
               sum(l.wait_seconds_total), sum(l.expired_leases_total), sum(l.shadow_refusals)
        FROM pgslots.limits l
        WHERE l.id = ANY (gone) AND NOT l.retiring AND EXISTS (SELECT 1 FROM pgslots.limits t WHERE t.id = l.template_id)
        GROUP BY l.template_id
        ORDER BY l.template_id
        ON CONFLICT (template_id) DO UPDATE
        SET grants_total = c.grants_total + excluded.grants_total,
            refusals_total = c.refusals_total + excluded.refusals_total,
            wait_seconds_total = c.wait_seconds_total + excluded.wait_seconds_total,
            expired_leases_total = c.expired_leases_total + excluded.expired_leases_total,
            shadow_refusals = c.shadow_refusals + excluded.shadow_refusals;
        DELETE FROM pgslots.limits l WHERE l.id = ANY (gone) AND pgslots._idle(l, at);
        DELETE FROM pgslots.refusals r WHERE r.limit_id = ANY (gone);
        DELETE FROM pgslots.served_keys s WHERE s.limit_id = ANY (gone);
    END IF;
    RETURN cardinality(gone);
END
$$;

---------------------------------------------------------------------------------------------------
-- Argument checks (they raise pgslots' own errors)
---------------------------------------------------------------------------------------------------

CREATE FUNCTION pgslots._list_literal(names text[]) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT '[' || coalesce(pg_catalog.string_agg(
        '''' || pg_catalog.replace(n, '''', '\''') || '''', ', ' ORDER BY ord), '') || ']'
    FROM pg_catalog.unnest(names) WITH ORDINALITY AS u(n, ord)
$$;

-- True when a text holds a character that moves or hides what a terminal or a line-based reader
-- shows: C0 and C1 controls, DEL, line and paragraph separators, bidirectional overrides.
CREATE FUNCTION pgslots._unprintable(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT t ~ '[\x01-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]' $$;

-- True when a text is made of spaces alone (of any width, zero included): it would show as nothing.
CREATE FUNCTION pgslots._blank(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT t !~ '[^ \u00a0\u1680\u2000-\u200d\u202f\u205f\u3000]' $$;

-- True when a name breaks the naming rule; _check_name says how.
CREATE FUNCTION pgslots._bad_name(name text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT name IS NULL OR name = '' OR name ~ '[/%&><]' OR pg_catalog.char_length(name) > 255
        OR pgslots._unprintable(name) OR pgslots._blank(name)
$$;


CREATE FUNCTION pgslots._check_name(name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
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
    IF pgslots._unprintable(name) THEN
        RAISE EXCEPTION 'Limit name % contains a control character (a newline, a tab, an escape or the like): names must be printable.',
            quote_literal(pg_catalog.regexp_replace(left(name, 80), '[^[:print:]]', '?', 'g'))
            USING ERRCODE = 'PS001', HINT = 'Choose a name of printable characters, e.g. ''tenant:acme''.';
    END IF;
    IF pgslots._blank(name) THEN
        RAISE EXCEPTION 'A limit name must not be blank: it is made of spaces only.'
            USING ERRCODE = 'PS001', HINT = 'Give the limit a name, e.g. ''api''.';
    END IF;
    IF char_length(name) > 255 THEN
        RAISE EXCEPTION 'Limit name ''%...'' is % characters long: names are at most 255 characters.',
            left(name, 40), char_length(name)
            USING ERRCODE = 'PS001', HINT = 'Choose a shorter name.';
    END IF;
END
$$;

-- Checks every name; returns them in the caller's order without repeats (a name given twice is one limit).
CREATE FUNCTION pgslots._check_names(names text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
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
    RETURN ARRAY(SELECT u.n FROM unnest(names) WITH ORDINALITY AS u(n, ord)
                 GROUP BY u.n ORDER BY min(u.ord));
END
$$;

CREATE FUNCTION pgslots._check_limit_values("limit" integer, slot_decay_per_second float8,
                                            window_seconds float8)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF "limit" IS NOT NULL AND "limit" < 0 THEN
        RAISE EXCEPTION 'limit must be 0 or more, got %.', "limit"
            USING ERRCODE = 'PS002', HINT = 'Pass a whole number of slots >= 0.';
    END IF;
    -- Below 1e-9 (one slot in 30 years), decay arithmetic would underflow.
    IF slot_decay_per_second IS NOT NULL AND NOT (
            slot_decay_per_second = 0
            OR (slot_decay_per_second >= 1e-9 AND slot_decay_per_second < 'Infinity'::float8)) THEN
        RAISE EXCEPTION 'slot_decay_per_second must be 0 (no decay) or a finite number from 1e-9 up, got %.',
            slot_decay_per_second
            USING ERRCODE = 'PS002', HINT = 'Use 0 for no decay, or the number of slots freed per second.';
    END IF;
    IF window_seconds IS NOT NULL AND NOT (window_seconds >= 0 AND window_seconds <= 1e8) THEN
        RAISE EXCEPTION 'window_seconds must be 0 (no window) or a number of seconds up to 100000000, got %.',
            window_seconds
            USING ERRCODE = 'PS002', HINT = 'Use e.g. 3600 for "at most limit slots in any hour".';
    END IF;
    PERFORM pgslots._check_one_kind(slot_decay_per_second, window_seconds);
END
$$;

-- A limit counts rate slots by decay or by window, never both.
CREATE FUNCTION pgslots._check_one_kind(slot_decay_per_second float8, window_seconds float8) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF slot_decay_per_second > 0 AND window_seconds > 0 THEN
        RAISE EXCEPTION 'A limit has either slot decay (%/s) or a window (% s), not both: to switch, set the other to 0 in the same call.',
            slot_decay_per_second, window_seconds
            USING ERRCODE = 'PS002',
                  HINT = 'Set the other to 0 in the same call: a token bucket refills continuously, a window counts grants in any span of its length.';
    END IF;
END
$$;

CREATE FUNCTION pgslots._check_slots(slots integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF slots IS NULL OR slots <= 0 THEN
        RAISE EXCEPTION 'slots must be 1 or more, got %.', coalesce(slots::text, 'NULL')
            USING ERRCODE = 'PS005', HINT = 'Ask for at least one slot.';
    END IF;
END
$$;

-- True when a lease duration is within the bounds of the settings; _check_lease_seconds says how not.
CREATE FUNCTION pgslots._lease_seconds_ok(lease_seconds float8, cfg pgslots.settings) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT lease_seconds >= cfg.min_lease_seconds AND lease_seconds <= cfg.max_lease_seconds $$;

CREATE FUNCTION pgslots._check_lease_seconds(lease_seconds float8, cfg pgslots.settings) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF lease_seconds IS NULL OR NOT pgslots._lease_seconds_ok(lease_seconds, cfg) THEN
        RAISE EXCEPTION 'lease_seconds must be between % and % seconds, got %.',
            cfg.min_lease_seconds, cfg.max_lease_seconds, coalesce(lease_seconds::text, 'NULL')
            USING ERRCODE = 'PS007',
                  HINT = 'Choose a lease duration within the bounds in pgslots.settings.';
    END IF;
END
$$;

CREATE FUNCTION pgslots._limit_not_found(name text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'Global concurrency limit % not found.', quote_literal(coalesce(name, 'NULL'))
        USING ERRCODE = 'PS004', HINT = 'Check the name against the limits in pgslots.status.';
END
$$;

CREATE FUNCTION pgslots._limit_exists(name text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'Global concurrency limit % already exists.', quote_literal(name)
        USING ERRCODE = 'PS003', HINT = 'Pick another name, or change the existing limit with update_limit.';
END
$$;

-- Priorities are -100..settings.max_priority; a fairness key is NULL (no key) or a text of 1 to 255
-- printable characters.
CREATE FUNCTION pgslots._check_queue_args(priority integer, fairness_key text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    highest integer;
BEGIN
    IF priority IS NULL OR priority < -100 OR priority > 100 THEN
        RAISE EXCEPTION 'priority must be a whole number from -100 to 100 (higher is served first), got %.',
            coalesce(priority::text, 'NULL')
            USING ERRCODE = 'PS015', HINT = 'Use 0 for normal work, e.g. 5 for urgent and -10 for batch work.';
    END IF;
    IF priority > 0 THEN
        highest := (SELECT s.max_priority FROM pgslots.settings s);
        IF priority > highest THEN
            RAISE EXCEPTION 'priority % is above the highest this database allows (max_priority %).', priority, highest
                USING ERRCODE = 'PS015',
                      HINT = 'Use a priority from -100 to max_priority; an operator can raise pgslots.settings.max_priority.';
        END IF;
    END IF;
    IF fairness_key = '' OR pg_catalog.char_length(fairness_key) > 255 OR pgslots._unprintable(fairness_key) THEN
        RAISE EXCEPTION 'fairness_key must be NULL (no key) or a text of 1 to 255 characters, all printable, got % characters.',
            pg_catalog.char_length(fairness_key)
            USING ERRCODE = 'PS015', HINT = 'Use a short identifier such as a tenant or user id.';
    END IF;
END
$$;

-- A template name is its prefix followed by one `*`; the prefix may not be empty or end in `*`.
CREATE FUNCTION pgslots._check_template_name(name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF name = '*' THEN
        RAISE EXCEPTION 'A template needs a prefix before its *: a bare * would match every name.'
            USING ERRCODE = 'PS016', HINT = 'Name the template after the keys it limits, e.g. ''tenant:*''.';
    END IF;
    IF name LIKE '%**' THEN
        RAISE EXCEPTION 'Template % ends in more than one *: its prefix % would itself be a template''s name, so which template a key belongs to would be ambiguous.',
            quote_literal(left(name, 80)), quote_literal(left(name, -1))
            USING ERRCODE = 'PS016', HINT = 'End the template''s name in a single *, e.g. ''tenant:*''.';
    END IF;
END
$$;

-- A session id that another login role keeps alive: it cannot bind this caller's leases.
CREATE FUNCTION pgslots._not_your_session(session uuid) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'Session % belongs to another role.', session USING ERRCODE = 'PS014',
        HINT = 'Use a new random UUID for your session, and keep it alive with keep_alive.';
END
$$;

-- Acquiring a template's own name: it has no slots of its own.
CREATE FUNCTION pgslots._template_not_acquirable(name text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '% is a template: acquire one of its keys instead, e.g. %.',
        quote_literal(name), quote_literal(left(name, -1) || 'example')
        USING ERRCODE = 'PS016', HINT = 'Each key that starts with the template''s prefix gets its own limit on first use.';
END
$$;
