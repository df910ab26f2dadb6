-- The order of a queue: priorities, aging, round-robin across fairness keys; the channels that wake
-- its waiters.

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
    target uuid;
BEGIN
    WITH written AS (
        INSERT INTO pgslots.served_keys AS s (limit_id, fairness_key, served_at)
        SELECT i, coalesce(_served.fairness_key, ''), at FROM unnest(ids) AS i
        WHERE EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = i)
          AND (_served.fairness_key IS NOT NULL OR NOT pgslots._plain_queue(i))
        ON CONFLICT ON CONSTRAINT served_keys_pkey DO UPDATE SET served_at = excluded.served_at
        RETURNING s.limit_id, (s.xmax = 0) AS inserted)
    SELECT array_agg(w.limit_id) INTO grown FROM written w WHERE w.inserted;
    FOREACH target IN ARRAY coalesce(grown, '{}') LOOP
        CONTINUE WHEN (SELECT count(*) FROM (SELECT 1 FROM pgslots.served_keys c
                                             WHERE c.limit_id = target LIMIT 1025) n) <= 1024;
        DELETE FROM pgslots.served_keys s
        WHERE s.limit_id = target
          AND s.fairness_key IN (SELECT k.fairness_key FROM pgslots.served_keys k
                                 WHERE k.limit_id = target
                                   AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w
                                                   WHERE w.limit_id = k.limit_id
                                                     AND coalesce(w.fairness_key, '') = k.fairness_key)
                                 ORDER BY k.served_at LIMIT 4);
    END LOOP;
END
$$;

-- Notifications go to each waiting client's own channel, so a release wakes only the process it serves.
CREATE FUNCTION pgslots._channel(client_id uuid) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT 'pgslots:' || client_id::text $$;
