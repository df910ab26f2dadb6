-- Reads: the status view and what operators and clients list.

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

CREATE VIEW pgslots.status AS
SELECT l.id,
       l.name,
       l."limit",
       l.active,
       l.slot_decay_per_second,
       l.leased_slots + d.unleased AS active_slots,
       l.leased_slots,
       d.unleased AS unleased_slots,
       coalesce((SELECT r.denied_slots FROM pgslots.refusals r WHERE r.limit_id = l.id), 0) AS denied_slots,
       l.avg_slot_occupancy_seconds,
       (SELECT count(*) FROM pgslots.leases x WHERE x.limit_id = l.id)::integer AS leases,
       (SELECT count(*) FROM pgslots.leases x
        WHERE x.limit_id = l.id AND x.expires_at <= c.at)::integer AS expired_leases,
       -- Held by nobody: their holders are gone, and the next caller that needs them takes them.
       CASE WHEN l.leased_slots > 0 THEN pgslots.reclaimable_slots(l.id) ELSE 0 END AS reclaimable_slots,
       (SELECT count(*) FROM pgslots.waiters w
        WHERE w.limit_id = l.id AND w.expires_at > c.at)::integer AS waiters,
       (SELECT date_part('epoch', c.at - min(w.enqueued_at)) FROM pgslots.waiters w
        WHERE w.limit_id = l.id AND w.expires_at > c.at)::float8 AS oldest_waiter_seconds,
       l.created,
       l.updated,
       (SELECT t.name FROM pgslots.limits t WHERE t.id = l.template_id) AS template,
       l.is_template,
       CASE WHEN l.is_template THEN (SELECT count(*) FROM pgslots.limits i WHERE i.template_id = l.id)::integer
       END AS instances,
       l.window_seconds,
       l.shadow,
       t.shadow_refusals,
       t.grants_total,
       t.refusals_total,
       t.wait_seconds_total,
       t.expired_leases_total,
       (SELECT array_agg(DISTINCT w.priority ORDER BY w.priority DESC) FROM pgslots.waiters w
        WHERE w.limit_id = l.id AND w.expires_at > c.at)::integer[] AS waiter_priorities,
       CASE WHEN l.is_template THEN coalesce(l.max_keys, (SELECT s.max_keys_per_template FROM pgslots.settings s)) END
           AS max_keys,
       CASE WHEN pgslots._paused(l.paused_until, c.at) THEN l.paused_until END AS paused_until,
       CASE WHEN pgslots._paused(l.paused_until, c.at) THEN l.pause_reason END AS pause_reason,
       l.margin_seconds
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
'(active_slots), leases, the leased slots whose holders are gone (reclaimable_slots: expired, or '
'their session dead; held by nobody, taken back by the next caller that needs them), queued waiters and the age of the oldest, refusal pressure (denied_slots), '
'and for a shadow limit the requests it would have refused (shadow_refusals). Counters since the '
'limit was created: grants_total, refusals_total (requests), wait_seconds_total (queued waiters'' '
'waits before their grant), expired_leases_total (leases taken back: expired or of a dead session), '
'shadow_refusals; a template''s are the totals over its keys, removed ones included. '
'paused_until and pause_reason: while the limit is paused (see pause). margin_seconds: how long '
'after a grant a request may reach a downstream that enforces the same rate (decay and window '
'limits hold grants back by that much; a window limit''s active_slots counts its window plus it). '
'waiter_priorities: the distinct priorities of the waiters, highest first. Keys of templates (instances) name their template; '
'templates count their instances. A key of a deleted template still held by someone is listed with '
'no template until it is idle.';

CREATE FUNCTION pgslots.get_limits(names text[] DEFAULT NULL, with_instances boolean DEFAULT true)
RETURNS SETOF pgslots.status
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off  -- a read of a few rows per limit; compiling it would cost more than running it
AS $$
    SELECT * FROM pgslots.status s
    WHERE (names IS NULL OR s.name = ANY (names))
      AND (with_instances OR s.id IN (SELECT l.id FROM pgslots.limits l WHERE l.template_id IS NULL))
    ORDER BY s.name
$$;
COMMENT ON FUNCTION pgslots.get_limits(text[], boolean) IS
'The status rows of the named limits (all limits when names is NULL), by name; with_instances => '
'false leaves out the keys of templates.';

CREATE FUNCTION pgslots.get_instances(template text, busiest integer DEFAULT NULL)
RETURNS SETOF pgslots.status
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off
AS $$
BEGIN
    IF busiest < 1 THEN
        RAISE EXCEPTION 'busiest must be 1 or more (or NULL: every key), got %.', busiest
            USING ERRCODE = 'PS011', HINT = 'Ask for the N busiest keys, e.g. 10.';
    END IF;
    RETURN QUERY
    SELECT * FROM pgslots.status s
    WHERE s.id IN (SELECT i.id FROM pgslots.limits i JOIN pgslots.limits t ON t.id = i.template_id
                   WHERE t.name = get_instances.template)
    ORDER BY CASE WHEN busiest IS NOT NULL THEN s.active_slots END DESC NULLS LAST,
             CASE WHEN busiest IS NOT NULL THEN s.waiters END DESC NULLS LAST, s.name
    LIMIT busiest;
END
$$;
COMMENT ON FUNCTION pgslots.get_instances(text, integer) IS
'The status rows of the keys (instances) of one template, by name; with busiest => N, only the N '
'with the most slots in use (then the most waiters).';

CREATE FUNCTION pgslots.list_leases(name text DEFAULT NULL)
RETURNS TABLE (lease_id uuid, limit_names text[], slots integer, fencing_token bigint,
               acquired_at timestamptz, expires_at timestamptz, expired boolean,
               host text, pid integer, application_name text, holder jsonb, gone boolean)
LANGUAGE sql VOLATILE   -- a dead session is known by probing its advisory lock
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off
AS $$
    SELECT x.id, array_agg(l.name ORDER BY l.name), min(x.slots), min(x.fencing_token),
           min(x.acquired_at), min(x.expires_at), min(x.expires_at) <= pgslots._now(),
           min(x.host), min(x.pid), min(x.application_name), (array_agg(x.holder))[1],
           bool_or(pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, c.at, s.liveness_seconds))
    FROM pgslots.leases x JOIN pgslots.limits l ON l.id = x.limit_id,
         pgslots.settings s, LATERAL (SELECT pgslots._clock(s.clock_offset) AS at) c
    WHERE list_leases.name IS NULL
       OR x.id IN (SELECT y.id FROM pgslots.leases y JOIN pgslots.limits m ON m.id = y.limit_id
                   WHERE m.name = list_leases.name)
    GROUP BY x.id
    ORDER BY min(x.acquired_at), x.id
$$;
COMMENT ON FUNCTION pgslots.list_leases(text) IS
'Who holds what: one row per lease (of one limit, or all), oldest first, with holder details; '
'gone: its holder is gone (expired, or its session dead), so its slots are reclaimable.';

CREATE FUNCTION pgslots.schema_version() RETURNS integer
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgslots, pg_temp
AS $$ SELECT coalesce(max(m.version), 0) FROM pgslots.migrations m $$;
COMMENT ON FUNCTION pgslots.schema_version() IS
'The number of the newest migration applied to this database.';
