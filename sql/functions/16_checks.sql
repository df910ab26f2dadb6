-- Argument checks and the errors they raise (pgslots' own SQLSTATEs, class PS).

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
                                            window_seconds float8, margin_seconds float8)
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
    IF margin_seconds IS NOT NULL AND NOT (margin_seconds >= 0 AND margin_seconds <= 60) THEN
        RAISE EXCEPTION 'margin_seconds must be a number of seconds from 0 to 60, got %.', margin_seconds
            USING ERRCODE = 'PS002',
                  HINT = 'Use the most a request may take from its grant to the downstream (default 0.05), or 0 for exact.';
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

-- A new_lease_id that names an existing lease: refused, and the grant that wrote it rolled back.
CREATE FUNCTION pgslots._lease_id_in_use(lease_id uuid) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'Lease id % is already in use: new_lease_id must name a new lease.', lease_id
        USING ERRCODE = 'PS013', HINT = 'Pass a fresh random UUID (version 4) as new_lease_id, or none.';
END
$$;

-- The caller's queue arguments and session, checked before anything is locked (by acquire_each;
-- acquire checks them on its own, with fewer statements).
CREATE FUNCTION pgslots._check_caller(priority integer, fairness_key text, session uuid) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF priority IS DISTINCT FROM 0 OR fairness_key IS NOT NULL THEN
        PERFORM pgslots._check_queue_args(priority, fairness_key);
    END IF;
    -- A session binds only leases of the role that keeps it alive.
    IF EXISTS (SELECT 1 FROM pgslots.sessions s WHERE s.id = session AND s.owner <> session_user) THEN
        PERFORM pgslots._not_your_session(session);
    END IF;
END
$$;

-- Why a locked limit can never admit this request: a template's own name (it has no slots of its
-- own), more slots than the limit, or concurrency on a window limit.
CREATE FUNCTION pgslots._not_admissible(name text, is_template boolean, "limit" integer, window_seconds float8,
                                        slots integer) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF is_template THEN
        RAISE EXCEPTION '% is a template: acquire one of its keys instead, e.g. %.',
            quote_literal(name), quote_literal(left(name, -1) || 'example')
            USING ERRCODE = 'PS016', HINT = 'Each key that starts with the template''s prefix gets its own limit on first use.';
    END IF;
    IF slots > "limit" THEN
        RAISE EXCEPTION 'Unable to acquire concurrency slots on %: slots requested is greater than the limit (% > %)',
            pgslots._list_literal(ARRAY[name]), slots, "limit"
            USING ERRCODE = 'PS006', HINT = 'Ask for fewer slots or raise the limit; this request can never succeed.';
    END IF;
    RAISE EXCEPTION '% is a window limit (at most % slots in any % s): its slots are never released, so concurrency() cannot hold them. Use rate_limit() or reserve() on it.',
        quote_literal(name), "limit", window_seconds
        USING ERRCODE = 'PS018',
              HINT = 'Use rate_limit() (or reserve()) on a window limit; concurrency() needs a limit without a window.';
END
$$;

CREATE FUNCTION pgslots._missing_limits(missing text[]) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'Concurrency limits % must be created before acquiring slots', pgslots._list_literal(missing)
        USING ERRCODE = 'PS008', HINT = 'Create the limits first (create_limit), or acquire without strict.';
END
$$;

CREATE FUNCTION pgslots._no_decay(names text[]) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'Only concurrency limits with slot decay can be used for rate limiting. The following limits do not have a decay configured: %',
        (SELECT string_agg(quote_literal(n), ', ') FROM unnest(names) AS n)
        USING ERRCODE = 'PS009',
              HINT = 'Give the limits a slot_decay_per_second or a window_seconds above 0 (update_limit).';
END
$$;
