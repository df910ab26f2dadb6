-- Pause: closing a limit until a time, as an upstream's 429 with Retry-After asks.
--
-- A paused limit grants nothing before paused_until: admission refuses (retry_after = the time
-- left), releases hand nothing over and wake nobody on it. Queued waiters keep their places; once
-- the pause is over, the first heartbeat of their clients finds the slots they fit and tells them
-- to ask again, in queue order.

-- (_paused, the test every decision makes, is with the pieces of a decision in 10_decision.sql.)

CREATE FUNCTION pgslots.pause(name text, seconds float8, reason text DEFAULT NULL) RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    cfg pgslots.settings;
    at timestamptz;
    target record;
    until timestamptz;
BEGIN
    SELECT * INTO cfg FROM pgslots.settings;
    IF seconds IS NULL OR NOT (seconds > 0 AND seconds <= cfg.max_pause_seconds) THEN
        RAISE EXCEPTION 'seconds must be more than 0 and at most % (max_pause_seconds), got %.',
            cfg.max_pause_seconds, coalesce(seconds::text, 'NULL')
            USING ERRCODE = 'PS011',
                  HINT = 'Pause for the time the upstream asked (its Retry-After); an operator can raise settings.max_pause_seconds.';
    END IF;
    IF char_length(reason) > 200 OR pgslots._unprintable(reason) THEN
        RAISE EXCEPTION 'reason must be at most 200 printable characters, got % characters.', char_length(reason)
            USING ERRCODE = 'PS011', HINT = 'Say briefly why, e.g. ''429 from the API''.';
    END IF;
    PERFORM pgslots._check_name(name);
    at := pgslots._clock(cfg.clock_offset);
    -- A key of a template gets its limit first (as on first use): the pause lives on its row.
    IF NOT EXISTS (SELECT 1 FROM pgslots.limits l WHERE l.name = pause.name AND NOT l.retiring) THEN
        PERFORM pgslots._create_instances(ARRAY[name], at);
    END IF;
    SELECT l.id, l.is_template INTO target FROM pgslots.limits l
    WHERE l.name = pause.name AND NOT l.retiring FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pgslots._limit_not_found(name);
    END IF;
    IF target.is_template THEN
        RAISE EXCEPTION '% is a template: pause one of its keys (e.g. %), or each limit the upstream refuses.',
            quote_literal(name), quote_literal(left(name, -1) || 'example')
            USING ERRCODE = 'PS016', HINT = 'Pause the key whose upstream answered 429.';
    END IF;
    -- A later pause extends; one that would end sooner changes nothing but the reason.
    UPDATE pgslots.limits l
    SET paused_until = greatest(CASE WHEN pgslots._paused(l.paused_until, at) THEN l.paused_until END,
                                at + make_interval(secs => seconds)),
        pause_reason = coalesce(pause.reason, CASE WHEN pgslots._paused(l.paused_until, at) THEN l.pause_reason END)
    WHERE l.id = target.id
    RETURNING l.paused_until INTO until;
    RETURN until;
END
$$;
COMMENT ON FUNCTION pgslots.pause(text, float8, text) IS
'Closes a limit (or one key of a template) until now + seconds (at most settings.max_pause_seconds, '
'300 by default): nothing is granted on it before then, refused callers get retry_after = the time '
'left, queued waiters keep their places and are told to ask again when it opens. A later pause '
'extends the time; an earlier end never shortens it. reason (up to 200 printable characters) is '
'shown to operators. Returns when the limit opens.';

CREATE FUNCTION pgslots.resume(name text) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
AS $$
DECLARE
    target uuid;
    at timestamptz := pgslots._now();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgslots.limits l WHERE l.name = resume.name AND NOT l.retiring) THEN
        PERFORM pgslots._limit_not_found(name);
    END IF;
    UPDATE pgslots.limits l SET paused_until = NULL, pause_reason = NULL
    WHERE l.name = resume.name AND NOT l.retiring AND pgslots._paused(l.paused_until, at)
    RETURNING l.id INTO target;
    IF target IS NULL THEN
        RETURN false;
    END IF;
    PERFORM pgslots._wake(target, at);   -- those queued may fit now
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgslots.resume(text) IS
'Admin: opens a paused limit now and wakes its queued waiters; false when it was not paused.';
