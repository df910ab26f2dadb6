-- Admin: creating, changing and deleting limits.

CREATE FUNCTION pgslots.create_limit(
    name text, "limit" integer, slot_decay_per_second float8 DEFAULT 0, active boolean DEFAULT true,
    active_slots integer DEFAULT 0)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz := pgslots._now();
    new_id uuid;
BEGIN
    PERFORM pgslots._check_name(name);
    IF "limit" IS NULL THEN
        RAISE EXCEPTION 'limit is required: the number of slots the limit has.' USING ERRCODE = 'PS002';
    END IF;
    PERFORM pgslots._check_limit_values("limit", slot_decay_per_second);
    IF active_slots IS NULL OR active_slots < 0 THEN
        RAISE EXCEPTION 'active_slots must be 0 or more, got %.', coalesce(active_slots::text, 'NULL')
            USING ERRCODE = 'PS002';
    END IF;
    INSERT INTO pgslots.limits AS l (name, "limit", slot_decay_per_second, active, unleased_slots,
                                     decayed_at, created, updated)
    VALUES (name, "limit", coalesce(slot_decay_per_second, 0), coalesce(active, true),
            active_slots, at, at, at)
    ON CONFLICT ON CONSTRAINT limits_name_key DO NOTHING
    RETURNING l.id INTO new_id;
    IF new_id IS NULL THEN
        PERFORM pgslots._limit_exists(name);
    END IF;
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION pgslots.create_limit(text, integer, float8, boolean, integer) IS
'Creates a limit of "limit" slots; returns its id. Names are unique, non-empty, at most 255 '
'characters, without / % & > <. A decay > 0 makes it usable for rate limits.';

CREATE FUNCTION pgslots.update_limit(
    name text, "limit" integer DEFAULT NULL, slot_decay_per_second float8 DEFAULT NULL,
    active boolean DEFAULT NULL, active_slots integer DEFAULT NULL, new_name text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    at timestamptz;
    lim record;
BEGIN
    PERFORM pgslots._check_limit_values("limit", slot_decay_per_second);
    IF new_name IS NOT NULL THEN
        PERFORM pgslots._check_name(new_name);
    END IF;
    IF active_slots IS NOT NULL AND active_slots < 0 THEN
        RAISE EXCEPTION 'active_slots must be 0 or more, got %.', active_slots USING ERRCODE = 'PS002';
    END IF;
    SELECT * INTO lim FROM pgslots.limits l WHERE l.name = update_limit.name FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pgslots._limit_not_found(name);
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
    -- Bring decay up to now at the old rate before changing the rate or the count: exact, no loss.
    UPDATE pgslots.limits l SET
        "limit" = coalesce(update_limit."limit", l."limit"),
        slot_decay_per_second = coalesce(update_limit.slot_decay_per_second, l.slot_decay_per_second),
        active = coalesce(update_limit.active, l.active),
        unleased_slots = CASE WHEN update_limit.active_slots IS NOT NULL
            THEN update_limit.active_slots - l.leased_slots
            ELSE pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at) END,
        decayed_at = at,
        name = coalesce(new_name, l.name),
        updated = at
    WHERE l.id = lim.id;
    PERFORM pgslots._wake(lim.id, at);
    RETURN lim.id;
END
$$;
COMMENT ON FUNCTION pgslots.update_limit(text, integer, float8, boolean, integer, text) IS
'Changes a limit; NULL arguments leave a field as it is. Lowering the limit below the slots held '
'pre-empts nobody. active_slots sets the occupied count (it cannot go below the leased slots). '
'Raising the limit or activating it wakes the waiters that now fit.';

CREATE FUNCTION pgslots.delete_limit(name text) RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    gone uuid;
BEGIN
    DELETE FROM pgslots.limits l WHERE l.name = delete_limit.name RETURNING l.id INTO gone;
    IF gone IS NULL THEN
        PERFORM pgslots._limit_not_found(name);
    END IF;
    DELETE FROM pgslots.leases x WHERE x.limit_id = gone;
    DELETE FROM pgslots.refusals r WHERE r.limit_id = gone;
    PERFORM pgslots._wake(gone, pgslots._now());   -- waiters find out it is gone
    DELETE FROM pgslots.waiters w WHERE w.limit_id = gone;
    RETURN gone;
END
$$;
COMMENT ON FUNCTION pgslots.delete_limit(text) IS
'Deletes a limit with its leases and queue; returns its id. Holders of its leases are not '
'interrupted; their release is a no-op.';

CREATE FUNCTION pgslots.lock_for_apply() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$ SELECT pg_advisory_xact_lock(7048297117402) $$;
COMMENT ON FUNCTION pgslots.lock_for_apply() IS
'Taken by declarative appliers for the rest of their transaction, so two of them never plan '
'against the same state.';
