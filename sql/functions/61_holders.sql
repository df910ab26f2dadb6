-- Who holds what: every lease with its holder (list_leases), or the first holders of the limits a
-- view shows (list_holders). Both for pgslots_admin: their rows carry lease ids.

-- Who holds the named limits: at most `per_limit` leases of each, the oldest first, one row per
-- (lease, limit named). For pgslots_admin, as list_leases: rows carry lease ids.
CREATE FUNCTION pgslots.list_holders(names text[], per_limit integer DEFAULT 10)
RETURNS TABLE (name text, lease_id uuid, limit_names text[], slots integer, fencing_token bigint,
               acquired_at timestamptz, expires_at timestamptz, expired boolean,
               host text, pid integer, application_name text, holder jsonb, gone boolean)
LANGUAGE plpgsql VOLATILE   -- a dead session is known by probing its advisory lock
SET search_path = pg_catalog, pgslots, pg_temp
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF per_limit IS NULL OR per_limit < 1 OR per_limit > 1000 OR names IS NULL OR cardinality(names) > 10000 THEN
        RAISE EXCEPTION 'list_holders needs up to 10000 names and per_limit from 1 to 1000, got % names and %.',
            coalesce(cardinality(names)::text, 'NULL'), coalesce(per_limit::text, 'NULL')
            USING ERRCODE = 'PS011', HINT = 'Name the limits shown, and ask for a few holders of each, e.g. 10.';
    END IF;
    RETURN QUERY
    SELECT l.name, h.*
    FROM pgslots.limits l, pgslots.settings s,
         LATERAL (SELECT x.id, (SELECT array_agg(m.name ORDER BY m.name) FROM pgslots.leases y
                                JOIN pgslots.limits m ON m.id = y.limit_id WHERE y.id = x.id),
                         x.slots, x.fencing_token, x.acquired_at, x.expires_at, x.expires_at <= c.at,
                         x.host, x.pid, x.application_name, x.holder,
                         pgslots._lease_gone(x.expires_at, x.session_id, x.acquired_at, c.at, s.liveness_seconds)
                  FROM pgslots.leases x, LATERAL (SELECT pgslots._clock(s.clock_offset) AS at) c
                  WHERE x.limit_id = l.id
                  ORDER BY x.acquired_at, x.id
                  LIMIT per_limit) h
    WHERE l.name = ANY (names) AND NOT l.retiring
    ORDER BY l.name, h.acquired_at;
END
$$;
COMMENT ON FUNCTION pgslots.list_holders(text[], integer) IS
'Who holds the named limits: at most per_limit (1 to 1000) leases of each, oldest first, with holder '
'details, as list_leases shows them; gone: the holder is gone and its slots are reclaimable.';

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
