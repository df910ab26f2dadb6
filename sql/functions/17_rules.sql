-- The rules every row of pgslots.limits keeps, checked when a row is inserted or one of its
-- settings is updated: never on the UPDATEs of acquire, release and renew, which change counters
-- only and keep them in range themselves. (As CHECK constraints, PostgreSQL rebuilt all nine rules
-- for every statement writing the table: see migration 0017.) create_limit and update_limit check
-- their arguments first and say what is wrong; this trigger is the last guard, for a row written
-- any other way.
CREATE FUNCTION pgslots._limit_rules() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    broken text;
BEGIN
    broken := CASE
        WHEN NOT (NEW.name <> '' AND NEW.name !~ '[/%&><]' AND char_length(NEW.name) <= 255)
            THEN 'a name has 1 to 255 characters, none of / % & > <'
        WHEN NOT (NEW."limit" >= 0) THEN 'limit is 0 or more'
        WHEN NOT (NEW.slot_decay_per_second >= 0 AND NEW.slot_decay_per_second < 'Infinity'::float8)
            THEN 'slot_decay_per_second is 0 or more, and finite'
        WHEN NOT (NEW.window_seconds >= 0 AND NEW.window_seconds < 'Infinity'::float8)
            THEN 'window_seconds is 0 or more, and finite'
        WHEN NOT (NEW.window_seconds = 0 OR NEW.slot_decay_per_second = 0)
            THEN 'a limit has slot decay or a window, not both'
        WHEN NOT (NEW.margin_seconds >= 0 AND NEW.margin_seconds <= 60) THEN 'margin_seconds is from 0 to 60'
        WHEN NEW.max_keys < 1 THEN 'max_keys is 1 or more'
        WHEN NEW.is_template AND NEW.template_id IS NOT NULL THEN 'a template is not the key of another template'
        WHEN NOT (NEW.leased_slots >= 0 AND NEW.unleased_slots >= 0 AND NEW.unleased_slots < 'Infinity'::float8)
            THEN 'leased_slots and unleased_slots are 0 or more, and finite'
    END;
    IF broken IS NOT NULL THEN
        RAISE EXCEPTION 'Limit % breaks a rule of pgslots.limits: %; nothing was changed.',
            quote_literal(regexp_replace(left(NEW.name, 80), '[^[:print:]]', '?', 'g')), broken
            USING ERRCODE = 'check_violation',
                  HINT = 'Change limits with pgslots.create_limit and pgslots.update_limit, which check their arguments.';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER limits_rules
AFTER INSERT OR UPDATE OF name, "limit", slot_decay_per_second, window_seconds, margin_seconds, max_keys,
                          is_template, template_id
ON pgslots.limits FOR EACH ROW EXECUTE FUNCTION pgslots._limit_rules();
