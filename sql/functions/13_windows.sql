-- Sliding windows (the grant log of a window limit) and giving limits new values.

-- A window limit counts each grant for `span` seconds: its window_seconds plus its margin_seconds
-- (see _span), which every caller below passes.

-- Forgets the grants of a window limit (whose row lock the caller holds) that have left its span,
-- taking their slots off unleased_slots (for a window limit: the slots granted in the span).
-- A grant made exactly `span` seconds ago has left: spans are half-open.
CREATE FUNCTION pgslots._window_purge(target uuid, span float8, at timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    freed float8;
BEGIN
    WITH gone AS (
        DELETE FROM pgslots.window_grants g
        WHERE g.limit_id = target AND g.granted_at <= at - make_interval(secs => span)
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

-- Seconds until `shortfall` slots of a window limit have left its span: the oldest grants leave
-- first, each exactly `span` seconds after it was made. Exact; when the span holds fewer slots than
-- that (slots of waiters ahead count too), a whole span.
CREATE FUNCTION pgslots._window_wait(target uuid, shortfall float8, span float8, at timestamptz)
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
          WHERE x.limit_id = target AND x.granted_at > at - make_interval(secs => span)
          ORDER BY x.granted_at, x.id) g
    WHERE pgslots._fits(shortfall - g.freed)
    LIMIT 1;
    IF leaves IS NULL THEN
        RETURN span;
    END IF;
    RETURN greatest(0, span - pg_catalog.date_part('epoch', at - leaves)::float8);
END
$$;

-- The slots a window limit granted in its span up to `at` (for readers: purged or not).
CREATE FUNCTION pgslots._window_used(target uuid, span float8, at timestamptz) RETURNS float8
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(sum(g.slots), 0)::float8 FROM pgslots.window_grants g
    WHERE g.limit_id = target AND g.granted_at > at - make_interval(secs => span)
$$;

-- Gives limits (whose row locks the caller holds) new values; NULL leaves a value as it is. What
-- they hold carries over exactly: decay is brought up to now at the old rate; a limit that becomes
-- a window limit counts what its bucket still held as one grant made now; a window limit that
-- stops being one keeps the slots of its window, which then decay (or stay, without decay).
CREATE FUNCTION pgslots._set_values(ids uuid[], at timestamptz, "limit" integer, slot_decay_per_second float8,
                                    window_seconds float8, active boolean, shadow boolean,
                                    margin_seconds float8)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF window_seconds > 0 THEN
        INSERT INTO pgslots.window_grants (limit_id, granted_at, slots)
        SELECT l.id, at, d.held
        FROM pgslots.limits l,
             LATERAL (SELECT pgslots._unleased(l, at) AS held) d
        WHERE l.id = ANY (ids) AND l.window_seconds = 0 AND d.held > 1e-9;
    END IF;
    UPDATE pgslots.limits l SET
        unleased_slots = CASE
            WHEN l.window_seconds > 0 AND coalesce(_set_values.window_seconds, l.window_seconds) > 0 THEN l.unleased_slots
            WHEN l.window_seconds > 0 THEN pgslots._window_used(l.id, pgslots._span(l.window_seconds, l.margin_seconds), at)
            ELSE pgslots._unleased(l, at) END,
        decayed_at = at,
        "limit" = coalesce(_set_values."limit", l."limit"),
        slot_decay_per_second = coalesce(_set_values.slot_decay_per_second, l.slot_decay_per_second),
        window_seconds = coalesce(_set_values.window_seconds, l.window_seconds),
        active = coalesce(_set_values.active, l.active),
        shadow = coalesce(_set_values.shadow, l.shadow),
        margin_seconds = coalesce(_set_values.margin_seconds, l.margin_seconds),
        updated = at
    WHERE l.id = ANY (ids);
    IF window_seconds = 0 THEN
        DELETE FROM pgslots.window_grants g WHERE g.limit_id = ANY (ids);
    END IF;
END
$$;
