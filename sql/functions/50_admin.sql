-- Admin: creating, changing and deleting limits.

CREATE FUNCTION pgslots.create_limit(
    name text, "limit" integer, slot_decay_per_second float8 DEFAULT 0, active boolean DEFAULT true,
    active_slots integer DEFAULT 0, window_seconds float8 DEFAULT 0, shadow boolean DEFAULT false,
    max_keys integer DEFAULT NULL, margin_seconds float8 DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    new_id uuid;
    left_template uuid;
    template boolean := right(name, 1) = '*';
BEGIN
    PERFORM pgslots._check_name(name);
    IF "limit" IS NULL THEN
        RAISE EXCEPTION 'limit is required: the number of slots the limit has.' USING ERRCODE = 'PS002';
    END IF;
    PERFORM pgslots._check_limit_values("limit", slot_decay_per_second, window_seconds, margin_seconds);
    IF active_slots IS NULL OR active_slots < 0 THEN
        RAISE EXCEPTION 'active_slots must be 0 or more, got %.', coalesce(active_slots::text, 'NULL')
            USING ERRCODE = 'PS002';
    END IF;
    PERFORM pgslots._check_max_keys(max_keys, template);
    IF template THEN
        PERFORM pgslots._check_template_name(name);
        IF active_slots > 0 THEN
            RAISE EXCEPTION 'A template holds no slots itself, so active_slots must be 0, got %.', active_slots
                USING ERRCODE = 'PS002', HINT = 'Set active slots on one of its keys once it is in use.';
        END IF;
    ELSE
        -- The key of a template in use (or of a deleted one) becomes an override: a limit of its
        -- own with these values, keeping its holders and its queue.
        UPDATE pgslots.limits l SET template_id = NULL, retiring = false
        FROM (SELECT k.id, k.template_id FROM pgslots.limits k
              WHERE k.name = create_limit.name AND k.template_id IS NOT NULL) was   -- retiring ones too
        WHERE l.id = was.id
        RETURNING l.id, was.template_id INTO new_id, left_template;
        IF new_id IS NOT NULL THEN
            PERFORM pgslots._count_keys(left_template, -1);
            PERFORM pgslots._set_values(ARRAY[new_id], at, "limit", coalesce(slot_decay_per_second, 0),
                                        coalesce(window_seconds, 0), coalesce(active, true), coalesce(shadow, false),
                                        coalesce(margin_seconds, 0.05));
            PERFORM pgslots._add_slots(new_id, active_slots, at);
            PERFORM pgslots._wake(new_id, at);
            RETURN new_id;
        END IF;
    END IF;
    INSERT INTO pgslots.limits AS l (name, "limit", slot_decay_per_second, window_seconds, margin_seconds, shadow,
                                     active, decayed_at, created, updated, is_template, max_keys)
    VALUES (name, "limit", coalesce(slot_decay_per_second, 0), coalesce(window_seconds, 0), coalesce(margin_seconds, 0.05),
            coalesce(shadow, false), coalesce(active, true), at, at, at, template, nullif(max_keys, 0))
    ON CONFLICT ON CONSTRAINT limits_name_key DO NOTHING
    RETURNING l.id INTO new_id;
    IF new_id IS NULL THEN
        PERFORM pgslots._limit_exists(name);
    END IF;
    PERFORM pgslots._add_slots(new_id, active_slots, at);
    IF template THEN
        -- Keys in use that this template now matches best (they belonged to a template with a
        -- shorter prefix, or to a deleted one) follow it from now on.
        PERFORM pgslots._follow_template(new_id, at,
            ARRAY(SELECT i.id FROM pgslots.limits i
                  WHERE i.template_id IS NOT NULL   -- retiring ones too
                    AND starts_with(i.name, left(create_limit.name, -1))
                    AND pgslots._template_for(i.name) = new_id));
    END IF;
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION pgslots.create_limit(text, integer, float8, boolean, integer, float8, boolean, integer, float8) IS
'Creates a limit of "limit" slots; returns its id. Names are unique, non-empty, at most 255 '
'characters, without / % & > <. A decay > 0 makes it usable for rate limits (a token bucket); '
'window_seconds > 0 instead makes it a window limit: at most "limit" slots granted in any span of '
'that many seconds (rate_limit and reserve only). shadow => true grants every request but counts '
'those it would have refused (shadow_refusals in status). A name ending in * '
'(tenant:*) creates a template: every name that starts with its prefix (tenant:acme) gets a limit '
'of its own with these values on first use; the longest matching prefix wins. A plain limit named '
'like a key (tenant:acme) is an override: it wins over every template. max_keys (templates only) '
'caps its live keys (NULL or 0: settings.max_keys_per_template); a new key beyond it is refused. '
'margin_seconds (0 to 60, default 0.05) holds the grants of a decay or window limit back by the '
'delay a request may take to reach a downstream that enforces the same rate: a window counts each '
'grant that much longer, a bucket''s burst is smaller by rate x margin; 0 is exact.';

-- Adds `slots` occupied slots to a limit (whose row the caller has locked or created): rate slots
-- that decay, or for a window limit one grant made now.
CREATE FUNCTION pgslots._add_slots(target uuid, slots float8, at timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF slots > 0 THEN
        UPDATE pgslots.limits l SET unleased_slots = l.unleased_slots + slots WHERE l.id = target;
        INSERT INTO pgslots.window_grants (limit_id, granted_at, slots)
        SELECT l.id, at, slots FROM pgslots.limits l WHERE l.id = target AND l.window_seconds > 0;
    END IF;
END
$$;

CREATE FUNCTION pgslots.update_limit(
    name text, "limit" integer DEFAULT NULL, slot_decay_per_second float8 DEFAULT NULL,
    active boolean DEFAULT NULL, active_slots integer DEFAULT NULL, new_name text DEFAULT NULL,
    window_seconds float8 DEFAULT NULL, shadow boolean DEFAULT NULL, max_keys integer DEFAULT NULL,
    margin_seconds float8 DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz;
    lim record;
BEGIN
    PERFORM pgslots._check_limit_values("limit", slot_decay_per_second, window_seconds, margin_seconds);
    IF new_name IS NOT NULL THEN
        PERFORM pgslots._check_name(new_name);
    END IF;
    IF active_slots IS NOT NULL AND active_slots < 0 THEN
        RAISE EXCEPTION 'active_slots must be 0 or more, got %.', active_slots USING ERRCODE = 'PS002';
    END IF;
    SELECT * INTO lim FROM pgslots.limits l
    WHERE l.name = update_limit.name AND NOT l.retiring FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pgslots._limit_not_found(name);
    END IF;
    IF new_name IS NOT NULL AND new_name <> name
       AND (lim.is_template OR lim.template_id IS NOT NULL OR right(new_name, 1) = '*') THEN
        RAISE EXCEPTION 'Cannot rename % to %: templates and their keys keep their names, and a limit cannot become a template by renaming.',
            quote_literal(name), quote_literal(new_name)
            USING ERRCODE = 'PS016', HINT = 'Create the new limit or template, then delete the old one.';
    END IF;
    PERFORM pgslots._check_one_kind(coalesce(slot_decay_per_second, lim.slot_decay_per_second),
                                    coalesce(window_seconds, lim.window_seconds));
    IF lim.template_id IS NOT NULL AND ("limit" IS NOT NULL OR slot_decay_per_second IS NOT NULL
                                        OR active IS NOT NULL OR window_seconds IS NOT NULL
                                        OR shadow IS NOT NULL OR margin_seconds IS NOT NULL) THEN
        RAISE EXCEPTION '% is a key of template %: it follows the template.', quote_literal(name),
            quote_literal((SELECT t.name FROM pgslots.limits t WHERE t.id = lim.template_id))
            USING ERRCODE = 'PS016',
                  HINT = 'Change the template, or give this key a limit of its own with create_limit (an override).';
    END IF;
    IF max_keys IS NOT NULL THEN
        PERFORM pgslots._check_max_keys(max_keys, lim.is_template);
        UPDATE pgslots.limits l SET max_keys = nullif(update_limit.max_keys, 0) WHERE l.id = lim.id;
    END IF;
    IF lim.is_template AND active_slots IS NOT NULL THEN
        RAISE EXCEPTION 'A template holds no slots itself: set active slots on one of its keys.'
            USING ERRCODE = 'PS002';
    END IF;
    IF active_slots IS NOT NULL AND active_slots < lim.leased_slots THEN
        RAISE EXCEPTION 'Cannot set active slots of % to %: % slots are held by leases.',
            quote_literal(name), active_slots, lim.leased_slots
            USING ERRCODE = 'PS002', HINT = 'Release those leases first (they are listed by list_leases).';
    END IF;
    IF new_name IS NOT NULL AND new_name <> name
       AND EXISTS (SELECT 1 FROM pgslots.limits l WHERE l.name = new_name) THEN
        PERFORM pgslots._limit_exists(new_name);
    END IF;
    at := pgslots._now();
    -- What the limit holds carries over exactly (see _set_values).
    PERFORM pgslots._set_values(ARRAY[lim.id], at, "limit", slot_decay_per_second, window_seconds, active, shadow,
                                margin_seconds);
    IF active_slots IS NOT NULL THEN
        DELETE FROM pgslots.window_grants g WHERE g.limit_id = lim.id;
        UPDATE pgslots.limits l SET unleased_slots = 0 WHERE l.id = lim.id;
        PERFORM pgslots._add_slots(lim.id, active_slots - lim.leased_slots, at);
    END IF;
    IF new_name IS NOT NULL THEN
        UPDATE pgslots.limits l SET name = new_name WHERE l.id = lim.id;
    END IF;
    IF lim.is_template THEN
        -- Every key of the template follows at once.
        PERFORM pgslots._follow_template(lim.id, at,
            ARRAY(SELECT i.id FROM pgslots.limits i WHERE i.template_id = lim.id));
    ELSE
        PERFORM pgslots._wake(lim.id, at);
    END IF;
    RETURN lim.id;
END
$$;
COMMENT ON FUNCTION pgslots.update_limit(text, integer, float8, boolean, integer, text, float8, boolean, integer, float8) IS
'Changes a limit; NULL arguments leave a field as it is. A limit has decay or a window, not both: '
'to switch, set the other to 0 in the same call (what it holds carries over). Lowering the limit '
'below the slots held '
'pre-empts nobody. active_slots sets the occupied count (it cannot go below the leased slots). '
'Raising the limit or activating it wakes the waiters that now fit. Changing a template changes '
'every key of it at once; a key itself follows its template (only its active_slots can be set). '
'max_keys (templates only; 0: back to settings.max_keys_per_template) caps its live keys. '
'margin_seconds: see create_limit.';

CREATE FUNCTION pgslots.delete_limit(name text) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    gone uuid;
    was_template boolean;
    its_template uuid;
    at timestamptz := pgslots._now();
    keys uuid[];
BEGIN
    DELETE FROM pgslots.limits l WHERE l.name = delete_limit.name AND NOT l.retiring
    RETURNING l.id, l.is_template, l.template_id INTO gone, was_template, its_template;
    IF gone IS NULL THEN
        PERFORM pgslots._limit_not_found(name);
    END IF;
    PERFORM pgslots._count_keys(its_template, -1);   -- a key of a template: one fewer
    IF was_template THEN
        -- Its keys: those another template matches follow that one; the others' names are missing
        -- again, and each is deleted once idle (now, or by a later sweep); until then its holders
        -- release as usual.
        keys := ARRAY(SELECT i.id FROM pgslots.limits i WHERE i.template_id = gone ORDER BY i.id FOR UPDATE);
        PERFORM pgslots._follow_template(n.template, at, array_agg(n.id))
        FROM (SELECT i.id, pgslots._template_for(i.name) AS template
              FROM pgslots.limits i WHERE i.id = ANY (keys)) n
        WHERE n.template IS NOT NULL
        GROUP BY n.template;
        UPDATE pgslots.limits i SET retiring = true
        WHERE i.id = ANY (keys) AND i.template_id = gone;
        PERFORM pgslots._wake(w.limit_id, at)
        FROM (SELECT DISTINCT x.limit_id FROM pgslots.waiters x
              JOIN pgslots.limits i ON i.id = x.limit_id
              WHERE i.id = ANY (keys) AND i.retiring) w;
        DELETE FROM pgslots.waiters x USING pgslots.limits i
        WHERE x.limit_id = i.id AND i.id = ANY (keys) AND i.retiring;
        PERFORM pgslots._drop_idle(gone, at, NULL);   -- its own idle keys, not every template's
        RETURN gone;
    END IF;
    DELETE FROM pgslots.leases x WHERE x.limit_id = gone;
    DELETE FROM pgslots.refusals r WHERE r.limit_id = gone;
    DELETE FROM pgslots.served_keys k WHERE k.limit_id = gone;
    PERFORM pgslots._wake(gone, at);   -- waiters find out it is gone
    DELETE FROM pgslots.waiters w WHERE w.limit_id = gone;
    RETURN gone;
END
$$;
COMMENT ON FUNCTION pgslots.delete_limit(text) IS
'Deletes a limit with its leases and queue; returns its id. Holders of its leases are not '
'interrupted; their release is a no-op. Deleting a template makes its keys'' names missing again '
'(or matched by another template); its keys nobody holds are deleted at once, rate slots and debts '
'included, the others once nobody holds them.';

CREATE FUNCTION pgslots.clear_debt(name text) RETURNS float8
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    target record;
    ids uuid[];
    cleared float8;
BEGIN
    SELECT l.id, l.is_template INTO target FROM pgslots.limits l
    WHERE l.name = clear_debt.name AND NOT l.retiring;
    IF NOT FOUND THEN
        PERFORM pgslots._limit_not_found(name);
    END IF;
    ids := ARRAY(SELECT l.id FROM pgslots.limits l
                 WHERE l.id = target.id OR (target.is_template AND l.template_id = target.id)
                 ORDER BY l.id FOR UPDATE);
    SELECT coalesce(sum(CASE WHEN l.window_seconds > 0 THEN pgslots._window_used(l.id, pgslots._span(l.window_seconds, l.margin_seconds), at)
                             ELSE pgslots._unleased(l, at) END), 0)
    INTO cleared FROM pgslots.limits l WHERE l.id = ANY (ids);
    DELETE FROM pgslots.window_grants g WHERE g.limit_id = ANY (ids);
    UPDATE pgslots.limits l SET unleased_slots = 0, decayed_at = at WHERE l.id = ANY (ids);
    PERFORM pgslots._wake(i, at) FROM unnest(ids) AS i;
    RETURN cleared;
END
$$;
COMMENT ON FUNCTION pgslots.clear_debt(text) IS
'Empties the rate slots of a limit (its token bucket, or its window''s grants), debts included, so '
'that it admits again at once; for a template, of every key. Leased slots stay. Returns the slots '
'removed. For an operator after a caller settled a cost far above its estimate.';

CREATE FUNCTION pgslots.lock_for_apply() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$ SELECT pg_advisory_xact_lock(7048297117402) $$;
COMMENT ON FUNCTION pgslots.lock_for_apply() IS
'Taken by declarative appliers for the rest of their transaction, so two of them never plan '
'against the same state.';
