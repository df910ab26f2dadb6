-- Reads: the status view (a template's gauges summed over its keys), and the limits, keys and
-- overview read from it. Who holds what is in 61_holders.sql.

-- The slots of one limit's leases whose holder is gone (expired, or its session dead): counted in
-- leased_slots until someone needs them and takes them back, but held by nobody. Public, so that it
-- runs as the schema owner (the view's readers may not read sessions); it only reads.
CREATE FUNCTION pgslots.reclaimable_slots(limit_id uuid) RETURNS integer
LANGUAGE sql VOLATILE   -- a dead session is known by probing its advisory lock
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
    SELECT coalesce(sum(x.slots), 0)::integer FROM pgslots.leases x, pgslots.settings s
    WHERE x.limit_id = reclaimable_slots.limit_id
      AND pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, pgslots._clock(s.clock_offset), s.liveness_seconds)
$$;
COMMENT ON FUNCTION pgslots.reclaimable_slots(uuid) IS
'The slots of a limit''s leases whose holders are gone (expired, or their session dead): counted as '
'leased until the next caller that needs them takes them back, but held by nobody. The status view '
'shows it as reclaimable_slots.';

-- A template's gauges: its keys', summed (rate slots decayed, or in their windows). Public, so that
-- it runs as the schema owner for the status view's readers; it only reads. PL/pgSQL: its plans
-- stay cached, and the view calls it for template rows only.
CREATE FUNCTION pgslots.template_gauges(template_id uuid) RETURNS pgslots.key_gauges
LANGUAGE plpgsql VOLATILE   -- a dead session is known by probing its advisory lock
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    cfg pgslots.settings;
    at timestamptz;
    g pgslots.key_gauges;
BEGIN
    SELECT * INTO cfg FROM pgslots.settings;
    at := pgslots._clock(cfg.clock_offset);
    SELECT count(*), coalesce(sum(k.leased_slots), 0),
           coalesce(sum(pgslots._unleased(k, at)) FILTER (WHERE k.window_seconds = 0), 0),
           count(*) FILTER (WHERE pgslots._paused(k.paused_until, at))
    INTO g.instances, g.leased, g.unleased, g.paused_keys
    FROM pgslots.limits k WHERE k.template_id = template_gauges.template_id;
    g.unleased := g.unleased + coalesce((
        SELECT sum(x.slots) FROM pgslots.window_grants x JOIN pgslots.limits k ON k.id = x.limit_id
        WHERE k.template_id = template_gauges.template_id AND k.window_seconds > 0
          AND x.granted_at > at - make_interval(secs => pgslots._span(k.window_seconds, k.margin_seconds))), 0);
    SELECT count(*), count(*) FILTER (WHERE x.expires_at <= at),
           coalesce(sum(x.slots) FILTER (WHERE pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, at,
                                                                   cfg.liveness_seconds)), 0)
    INTO g.leases, g.expired_leases, g.reclaimable
    FROM pgslots.leases x JOIN pgslots.limits k ON k.id = x.limit_id
    WHERE k.template_id = template_gauges.template_id;
    SELECT count(*), date_part('epoch', at - min(w.enqueued_at)), array_agg(DISTINCT w.priority ORDER BY w.priority DESC)
    INTO g.waiters, g.oldest_waiter_seconds, g.waiter_priorities
    FROM pgslots.waiters w JOIN pgslots.limits k ON k.id = w.limit_id
    WHERE k.template_id = template_gauges.template_id AND w.expires_at > at;
    g.denied_slots := coalesce((SELECT sum(r.denied_slots) FROM pgslots.refusals r JOIN pgslots.limits k ON k.id = r.limit_id
                                WHERE k.template_id = template_gauges.template_id), 0);
    RETURN g;
END
$$;
COMMENT ON FUNCTION pgslots.template_gauges(uuid) IS
'A template''s gauges, its keys'' summed: keys, leased and rate slots (decayed, or in their windows), '
'reclaimable slots, leases and expired ones, waiters, the oldest wait, waiter priorities, denied '
'slots and paused keys. The status view shows them on the template''s row.';

-- One row per limit. A template's gauges are its keys', summed (rolled up here, as its counters
-- are below), so no reader sums keys itself; each key has its own row too.
CREATE VIEW pgslots.status AS
SELECT l.id,
       l.name,
       l."limit",
       l.active,
       l.slot_decay_per_second,
       g.leased + g.unleased AS active_slots,
       g.leased AS leased_slots,
       g.unleased AS unleased_slots,
       CASE WHEN l.is_template THEN (kt.k).denied_slots
            ELSE coalesce((SELECT r.denied_slots FROM pgslots.refusals r WHERE r.limit_id = l.id), 0) END AS denied_slots,
       l.avg_slot_occupancy_seconds,
       CASE WHEN l.is_template THEN (kt.k).leases
            ELSE (SELECT count(*) FROM pgslots.leases x WHERE x.limit_id = l.id)::integer END AS leases,
       CASE WHEN l.is_template THEN (kt.k).expired_leases
            ELSE (SELECT count(*) FROM pgslots.leases x WHERE x.limit_id = l.id AND x.expires_at <= c.at)::integer
       END AS expired_leases,
       -- Held by nobody: their holders are gone, and the next caller that needs them takes them.
       g.reclaimable AS reclaimable_slots,
       CASE WHEN l.is_template THEN (kt.k).waiters
            ELSE (SELECT count(*) FROM pgslots.waiters w WHERE w.limit_id = l.id AND w.expires_at > c.at)::integer
       END AS waiters,
       CASE WHEN l.is_template THEN (kt.k).oldest_waiter_seconds
            ELSE (SELECT date_part('epoch', c.at - min(w.enqueued_at)) FROM pgslots.waiters w
                  WHERE w.limit_id = l.id AND w.expires_at > c.at)::float8 END AS oldest_waiter_seconds,
       l.created,
       l.updated,
       (SELECT t.name FROM pgslots.limits t WHERE t.id = l.template_id) AS template,
       l.is_template,
       CASE WHEN l.is_template THEN (kt.k).instances END AS instances,
       l.window_seconds,
       l.shadow,
       t.shadow_refusals,
       t.grants_total,
       t.refusals_total,
       t.wait_seconds_total,
       t.expired_leases_total,
       CASE WHEN l.is_template THEN (kt.k).waiter_priorities
            ELSE (SELECT array_agg(DISTINCT w.priority ORDER BY w.priority DESC) FROM pgslots.waiters w
                  WHERE w.limit_id = l.id AND w.expires_at > c.at)::integer[] END AS waiter_priorities,
       CASE WHEN l.is_template THEN coalesce(l.max_keys, (SELECT s.max_keys_per_template FROM pgslots.settings s)) END
           AS max_keys,
       CASE WHEN pgslots._paused(l.paused_until, c.at) THEN l.paused_until END AS paused_until,
       CASE WHEN pgslots._paused(l.paused_until, c.at) THEN l.pause_reason END AS pause_reason,
       l.margin_seconds,
       CASE WHEN l.is_template THEN (kt.k).paused_keys END AS paused_keys,
       g.leased + g.unleased - g.reclaimable AS held_slots
FROM pgslots.limits l,
     -- One row (LIMIT 1): the planner cannot know that settings holds one, and a guess of hundreds
     -- multiplies the view's estimated cost past jit_above_cost on a fresh database.
     LATERAL (SELECT pgslots._clock(s.clock_offset) AS at FROM pgslots.settings s LIMIT 1) c,
     LATERAL (SELECT CASE WHEN l.window_seconds > 0
                          THEN (SELECT coalesce(sum(g.slots), 0)::float8 FROM pgslots.window_grants g
                                WHERE g.limit_id = l.id
                                  AND g.granted_at > c.at - make_interval(secs => pgslots._span(l.window_seconds, l.margin_seconds)))
                          ELSE pgslots._unleased(l, c.at)
                     END AS unleased) d,
     -- A template's gauges, its keys' summed (OFFSET 0: computed once per row, not once per column).
     LATERAL (SELECT CASE WHEN l.is_template THEN pgslots.template_gauges(l.id) END AS k OFFSET 0) kt,
     -- The gauges every reader shows: the limit's own, or its keys' summed.
     LATERAL (SELECT CASE WHEN l.is_template THEN (kt.k).leased ELSE l.leased_slots END AS leased,
                     CASE WHEN l.is_template THEN (kt.k).unleased ELSE d.unleased END AS unleased,
                     CASE WHEN l.is_template THEN (kt.k).reclaimable
                          WHEN l.leased_slots > 0 THEN pgslots.reclaimable_slots(l.id) ELSE 0 END AS reclaimable) g,
     -- Counters: a limit's own; a template's are the totals of its keys, those removed as idle included.
     LATERAL (SELECT sum(x.grants_total)::bigint AS grants_total, sum(x.refusals_total)::bigint AS refusals_total,
                     sum(x.wait_seconds_total)::float8 AS wait_seconds_total,
                     sum(x.expired_leases_total)::bigint AS expired_leases_total,
                     sum(x.shadow_refusals)::bigint AS shadow_refusals
              FROM (SELECT l.grants_total, coalesce((SELECT r.refusals_total FROM pgslots.refusals r
                                                     WHERE r.limit_id = l.id), 0) AS refusals_total,
                           l.wait_seconds_total, l.expired_leases_total, l.shadow_refusals
                    UNION ALL
                    SELECT i.grants_total, coalesce((SELECT r.refusals_total FROM pgslots.refusals r
                                                     WHERE r.limit_id = i.id), 0),
                           i.wait_seconds_total, i.expired_leases_total, i.shadow_refusals
                    FROM pgslots.limits i WHERE l.is_template AND i.template_id = l.id
                    UNION ALL
                    SELECT c.grants_total, c.refusals_total, c.wait_seconds_total, c.expired_leases_total,
                           c.shadow_refusals
                    FROM pgslots.retired_counters c WHERE l.is_template AND c.template_id = l.id) x) t;
COMMENT ON VIEW pgslots.status IS
'One row per limit: occupied slots after decay, or granted in the window of a window limit '
'(active_slots), held_slots (active_slots less reclaimable_slots: in use by living holders), leases, the leased slots whose holders are gone (reclaimable_slots: expired, or '
'their session dead; held by nobody, taken back by the next caller that needs them), queued waiters and the age of the oldest, refusal pressure (denied_slots), '
'and for a shadow limit the requests it would have refused (shadow_refusals). Counters since the '
'limit was created: grants_total, refusals_total (requests), wait_seconds_total (queued waiters'' '
'waits before their grant), expired_leases_total (leases taken back: expired or of a dead session), '
'shadow_refusals; a template''s are the totals over its keys, removed ones included. '
'paused_until and pause_reason: while the limit is paused (see pause). margin_seconds: how long '
'after a grant a request may reach a downstream that enforces the same rate (decay and window '
'limits hold grants back by that much; a window limit''s active_slots counts its window plus it). '
'waiter_priorities: the distinct priorities of the waiters, highest first. Keys of templates (instances) name their template; '
'templates count their instances, and their gauges (slots, leases, reclaimable slots, waiters, the '
'oldest wait, denied slots, waiter priorities, paused_keys) are their keys'' summed. A key of a deleted template still held by someone is listed with '
'no template until it is idle.';

-- PL/pgSQL, not SQL: a SQL function with SET clauses is planned again on every call, and planning
-- the status view costs more than running it for a few limits. RETURN QUERY keeps one generic
-- plan per session (a custom plan per call would be planned again every time).
CREATE FUNCTION pgslots.get_limits(names text[] DEFAULT NULL, with_instances boolean DEFAULT true)
RETURNS SETOF pgslots.status
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off  -- a read of a few rows per limit; compiling it would cost more than running it
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF names IS NOT NULL THEN
        RETURN QUERY
        SELECT * FROM pgslots.status s
        WHERE s.name = ANY (names)
          AND (with_instances OR s.id IN (SELECT l.id FROM pgslots.limits l WHERE l.template_id IS NULL))
        ORDER BY s.name;
    ELSE
        RETURN QUERY
        SELECT * FROM pgslots.status s
        WHERE with_instances OR s.id IN (SELECT l.id FROM pgslots.limits l WHERE l.template_id IS NULL)
        ORDER BY s.name;
    END IF;
END
$$;
COMMENT ON FUNCTION pgslots.get_limits(text[], boolean) IS
'The status rows of the named limits (all limits when names is NULL), by name; with_instances => '
'false leaves out the keys of templates.';

CREATE FUNCTION pgslots.get_instances(template text, busiest integer DEFAULT NULL)
RETURNS SETOF pgslots.status
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    at timestamptz := pgslots._now();   -- one moment for every key compared
BEGIN
    IF busiest < 1 THEN
        RAISE EXCEPTION 'busiest must be 1 or more (or NULL: every key), got %.', busiest
            USING ERRCODE = 'PS011', HINT = 'Ask for the N busiest keys, e.g. 10.';
    END IF;
    IF busiest IS NULL THEN
        RETURN QUERY
        SELECT * FROM pgslots.status s
        WHERE s.id IN (SELECT i.id FROM pgslots.limits i JOIN pgslots.limits t ON t.id = i.template_id
                       WHERE t.name = get_instances.template)
        ORDER BY s.name;
        RETURN;
    END IF;
    -- The N keys with the most slots in use, picked from the limits' own columns (a window key's
    -- slots as its last decision left them), then read in full: a template with 100,000 keys costs
    -- one pass over its keys, not 100,000 status rows.
    RETURN QUERY
    SELECT * FROM pgslots.status s
    WHERE s.id IN (SELECT i.id FROM pgslots.limits i JOIN pgslots.limits t ON t.id = i.template_id
                   WHERE t.name = get_instances.template
                   ORDER BY i.leased_slots + pgslots._unleased(i, at) DESC, i.name
                   LIMIT busiest)
    ORDER BY s.active_slots DESC, s.waiters DESC, s.name;
END
$$;
COMMENT ON FUNCTION pgslots.get_instances(text, integer) IS
'The status rows of the keys (instances) of one template, by name; with busiest => N, only the N '
'with the most slots in use (most first).';

-- Everything a view of the limits shows, in one call: every limit and template (or those named; a
-- template's gauges summed over its keys), then each of those templates' `busiest` keys (their
-- `template` names it).
CREATE FUNCTION pgslots.get_overview(names text[] DEFAULT NULL, busiest integer DEFAULT 5)
RETURNS SETOF pgslots.status
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF busiest IS NULL OR busiest < 0 OR busiest > 1000 THEN
        RAISE EXCEPTION 'busiest must be from 0 to 1000 (keys shown per template), got %.', coalesce(busiest::text, 'NULL')
            USING ERRCODE = 'PS011', HINT = 'Ask for a few, e.g. 5.';
    END IF;
    RETURN QUERY SELECT * FROM pgslots.get_limits(names, names IS NOT NULL);
    IF busiest > 0 THEN
        RETURN QUERY
        SELECT k.* FROM pgslots.limits t, LATERAL pgslots.get_instances(t.name, busiest) k
        WHERE t.is_template AND (names IS NULL OR t.name = ANY (names)) ORDER BY t.name;
    END IF;
END
$$;
COMMENT ON FUNCTION pgslots.get_overview(text[], integer) IS
'Every limit and template, or the named ones (a template''s gauges are its keys'' summed), then each '
'of those templates'' `busiest` keys (0 to 1000; their template column names it): what a view of '
'the limits shows, in one call.';

CREATE FUNCTION pgslots.schema_version() RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$ SELECT coalesce(max(m.version), 0) FROM pgslots.migrations m $$;
COMMENT ON FUNCTION pgslots.schema_version() IS
'The number of the newest migration applied to this database.';
