-- Templates and their keys: which template a name belongs to, creating keys, dropping idle ones.

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
-- One plan for every call: a custom plan per call costs more than the statements themselves.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    made_for uuid[];
    new_keys text[];
    their_templates uuid[];
    tpl record;
BEGIN
    SELECT array_agg(n.name ORDER BY n.name), array_agg(n.template ORDER BY n.name)
    INTO new_keys, their_templates
    FROM (SELECT u.name, pgslots._template_for(u.name) AS template
          FROM unnest(names) AS u(name)
          WHERE NOT EXISTS (SELECT 1 FROM pgslots.limits x WHERE x.name = u.name)) n
    WHERE n.template IS NOT NULL;
    IF new_keys IS NULL THEN
        RETURN 0;
    END IF;
    FOR tpl IN SELECT k.template, min(k.name) AS example, min(t.name) AS template_name,
                      coalesce(min(t.max_keys), (SELECT s.max_keys_per_template FROM pgslots.settings s)) AS most
               FROM unnest(new_keys, their_templates) AS k(name, template)
               JOIN pgslots.limits t ON t.id = k.template
               GROUP BY k.template LOOP
        IF pgslots._keys_of(tpl.template) >= tpl.most THEN
            PERFORM pgslots._drop_idle(tpl.template, at, 8);
            IF pgslots._keys_of(tpl.template) >= tpl.most THEN
                RAISE EXCEPTION 'Template % has % live keys, its most: key % cannot be created now.',
                    quote_literal(tpl.template_name), tpl.most, quote_literal(left(tpl.example, 80))
                    USING ERRCODE = 'PS016',
                          HINT = 'Try again once keys are idle, or raise the template''s max_keys (update_limit) or settings.max_keys_per_template.';
            END IF;
        END IF;
    END LOOP;
    WITH made AS (
        INSERT INTO pgslots.limits AS l (name, "limit", slot_decay_per_second, window_seconds, margin_seconds, shadow,
                                         active, decayed_at, created, updated, template_id)
        SELECT k.name, t."limit", t.slot_decay_per_second, t.window_seconds, t.margin_seconds, t.shadow, t.active,
               at, at, at, t.id
        FROM unnest(new_keys, their_templates) AS k(name, template)
        JOIN pgslots.limits t ON t.id = k.template
        ORDER BY k.name
        ON CONFLICT (name) DO NOTHING
        RETURNING l.template_id)
    SELECT array_agg(m.template_id ORDER BY m.template_id) INTO made_for FROM made m;
    PERFORM pgslots._count_keys(m.template, count(*))
    FROM unnest(made_for) AS m(template) GROUP BY m.template ORDER BY m.template;
    RETURN coalesce(cardinality(made_for), 0);
END
$$;

-- After new keys of the limits `ids` were granted: past half its max_keys, each new key of a
-- template takes a few idle ones away (below that, its keys cost nothing to keep: sweep takes them).
CREATE FUNCTION pgslots._after_new_keys(ids uuid[], at timestamptz, cfg pgslots.settings) RETURNS void
LANGUAGE plpgsql
-- One plan for every call: a custom plan per call costs more than the statements themselves.
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    PERFORM pgslots._drop_idle(t.template_id, at, 4)
    FROM (SELECT DISTINCT l.template_id FROM pgslots.limits l
          WHERE l.id = ANY (ids) AND l.template_id IS NOT NULL) t
    WHERE 2 * pgslots._keys_of(t.template_id)
          > (SELECT coalesce(m.max_keys, cfg.max_keys_per_template) FROM pgslots.limits m WHERE m.id = t.template_id);
END
$$;

-- The keys of a template: the sum of its shards of pgslots.template_keys (migration 0015), kept by
-- every function that gives a key a template or takes it away (_count_keys). PL/pgSQL, not SQL: a
-- SQL function that is not inlined is planned again on every call.
CREATE FUNCTION pgslots._keys_of(template uuid) RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (SELECT coalesce(sum(c.keys), 0) FROM pgslots.template_keys c WHERE c.template_id = template);
END
$$;

-- Counts `delta` more keys (fewer, when negative) for a template, in this backend's shard; nothing
-- for a template that is gone (the keys of a deleted one retire uncounted).
CREATE FUNCTION pgslots._count_keys(template uuid, delta bigint) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF delta = 0 OR template IS NULL OR NOT EXISTS (SELECT 1 FROM pgslots.limits t WHERE t.id = template) THEN
        RETURN;
    END IF;
    INSERT INTO pgslots.template_keys AS c (template_id, shard, keys)
    VALUES (template, pg_catalog.pg_backend_pid() % 16, delta)
    ON CONFLICT (template_id, shard) DO UPDATE SET keys = c.keys + excluded.keys;
END
$$;

-- An instance nobody uses (retiring ones included: they keep their deleted template's id): no
-- lease, no waiter, and no rate slot left after decay or in its window; a retiring instance's rate
-- slots (a debt, say) go with it, as its template is gone. PL/pgSQL: with its subqueries a SQL
-- function would not be inlined, and would be planned again on every call.
CREATE FUNCTION pgslots._idle(l pgslots.limits, at timestamptz) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN l.template_id IS NOT NULL AND l.leased_slots = 0 AND NOT pgslots._paused(l.paused_until, at)
       AND CASE WHEN l.retiring THEN true
                WHEN l.window_seconds > 0
                    THEN pgslots._window_used(l.id, pgslots._span(l.window_seconds, l.margin_seconds), at) <= 1e-9
                ELSE pgslots._unleased(l, at) <= 1e-9 END
       AND NOT EXISTS (SELECT 1 FROM pgslots.leases x WHERE x.limit_id = l.id)
       AND NOT EXISTS (SELECT 1 FROM pgslots.waiters w WHERE w.limit_id = l.id);
END
$$;

-- Deletes up to `most` idle instances of one template (NULL: of every template, and retiring ones),
-- skipping rows another transaction has locked (someone is using them): it never waits. Returns how
-- many it deleted.
CREATE FUNCTION pgslots._drop_idle(template uuid, at timestamptz, most integer) RETURNS integer
LANGUAGE plpgsql
-- One plan for every call: a custom plan per call costs more than the statements themselves.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    gone uuid[];
    dropped_from uuid[];
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
        -- them: a template with many busy keys costs a new key as little as one with none. The
        -- first `most` idle keys among them go.
        start := gen_random_uuid();
        gone := ARRAY(SELECT c.id
                      FROM ((SELECT l.* FROM pgslots.limits l
                             WHERE l.template_id = template AND l.id >= start ORDER BY l.id LIMIT 2 * most)
                            UNION ALL
                            (SELECT l.* FROM pgslots.limits l
                             WHERE l.template_id = template AND l.id < start ORDER BY l.id LIMIT 2 * most)) c
                      -- Busy keys fail the first, cheap tests (no function call); _idle looks further.
                      WHERE c.leased_slots = 0
                        AND (c.retiring OR c.window_seconds > 0 OR pgslots._unleased(c, at) <= 1e-9)
                        AND pgslots._idle(c, at)
                      LIMIT most);
        gone := ARRAY(SELECT l.id FROM pgslots.limits l WHERE l.id = ANY (gone) FOR UPDATE SKIP LOCKED);
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
        WITH d AS (DELETE FROM pgslots.limits l WHERE l.id = ANY (gone) AND pgslots._idle(l, at) RETURNING l.template_id)
        SELECT array_agg(d.template_id ORDER BY d.template_id) INTO dropped_from FROM d;
        PERFORM pgslots._count_keys(d.template, -count(*))
        FROM unnest(dropped_from) AS d(template) GROUP BY d.template ORDER BY d.template;
        DELETE FROM pgslots.refusals r WHERE r.limit_id = ANY (gone);
        DELETE FROM pgslots.served_keys s WHERE s.limit_id = ANY (gone);
    END IF;
    RETURN cardinality(gone);
END
$$;

-- Makes the given instances (ids) follow one template: they take its values now (decay brought up
-- to now at their old rate) and their waiters that now fit are woken. Locks them in id order.
CREATE FUNCTION pgslots._follow_template(template uuid, at timestamptz, ids uuid[]) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    t record;
BEGIN
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    SELECT l."limit", l.slot_decay_per_second, l.window_seconds, l.active, l.shadow, l.margin_seconds INTO t
    FROM pgslots.limits l WHERE l.id = template;
    PERFORM 1 FROM pgslots.limits l WHERE l.id = ANY (ids) ORDER BY l.id FOR UPDATE;
    PERFORM pgslots._count_keys(o.template_id, -o.n)
    FROM (SELECT l.template_id, count(*) AS n FROM pgslots.limits l
          WHERE l.id = ANY (ids) AND l.template_id IS DISTINCT FROM _follow_template.template
          GROUP BY l.template_id ORDER BY l.template_id) o;
    PERFORM pgslots._count_keys(template, count(*))
    FROM pgslots.limits l WHERE l.id = ANY (ids) AND l.template_id IS DISTINCT FROM _follow_template.template;
    UPDATE pgslots.limits l SET template_id = _follow_template.template, retiring = false WHERE l.id = ANY (ids);
    PERFORM pgslots._set_values(ids, at, t."limit", t.slot_decay_per_second, t.window_seconds, t.active, t.shadow,
                                t.margin_seconds);
    PERFORM pgslots._wake(w.limit_id, at)
    FROM (SELECT DISTINCT x.limit_id FROM pgslots.waiters x WHERE x.limit_id = ANY (ids)) w;
END
$$;

-- max_keys: NULL (unchanged, or the setting), 0 (the setting) or a number of keys, for templates only.
CREATE FUNCTION pgslots._check_max_keys(max_keys integer, template boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF max_keys < 0 THEN
        RAISE EXCEPTION 'max_keys must be 1 or more (0: the default of settings.max_keys_per_template), got %.', max_keys
            USING ERRCODE = 'PS002', HINT = 'Pass how many live keys the template may have, e.g. 10000.';
    END IF;
    IF max_keys > 0 AND NOT template THEN
        RAISE EXCEPTION 'max_keys is for templates (names ending in *): a plain limit has no keys.'
            USING ERRCODE = 'PS002', HINT = 'Leave max_keys out, or set it on the template, e.g. ''tenant:*''.';
    END IF;
END
$$;
