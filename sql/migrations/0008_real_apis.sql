-- 0008_real_apis: rate limits for real APIs: reservations settled later, sliding windows, shadow
-- mode.
--
-- Why:
--  * A reservation takes an estimate of rate slots now and is settled with the actual cost later
--    (tokens of an LLM call, points of a GraphQL query): the difference is refunded, or owed as a
--    debt that must decay (or leave the window) before anyone is granted again. A reservation row
--    remembers the cost as last settled, so settling twice with the same value changes nothing.
--    Rows live for settings.reservation_seconds, then go (removed a few at a time by reserve, and
--    by sweep).
--  * A window limit (window_seconds > 0) grants at most `limit` slots in any span of that many
--    seconds. Each grant still inside the window is a row of window_grants (one row per grant,
--    whatever its size), removed once it has left the window by the next decision on that limit,
--    so the log holds at most the grants of one window. For a window limit, unleased_slots is the
--    sum of its log: the slots granted in the current window (it never decays).
--  * A shadow limit grants every request but counts as if it enforced: shadow_refusals counts the
--    requests it would have refused.

ALTER TABLE pgslots.limits
    ADD COLUMN window_seconds float8 NOT NULL DEFAULT 0,
    ADD COLUMN shadow boolean NOT NULL DEFAULT false,
    ADD COLUMN shadow_refusals bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT limits_window_rule CHECK (window_seconds >= 0 AND window_seconds < 'Infinity'::float8),
    ADD CONSTRAINT limits_one_kind_rule CHECK (window_seconds = 0 OR slot_decay_per_second = 0);
COMMENT ON COLUMN pgslots.limits.window_seconds IS
    'Above 0: at most "limit" slots are granted in any span of this many seconds (a sliding window).';
COMMENT ON COLUMN pgslots.limits.shadow IS
    'Grants every request, but counts as if enforced; shadow_refusals counts the requests it would have refused.';

ALTER TABLE pgslots.settings
    ADD COLUMN reservation_seconds float8 NOT NULL DEFAULT 3600,
    ADD CONSTRAINT settings_reservation_seconds CHECK (
        reservation_seconds > 0 AND reservation_seconds < 'Infinity'::float8);
COMMENT ON COLUMN pgslots.settings.reservation_seconds IS
    'How long after it was made a reservation can be settled.';

CREATE TABLE pgslots.window_grants (
    limit_id uuid NOT NULL REFERENCES pgslots.limits (id) ON DELETE CASCADE,
    granted_at timestamptz NOT NULL,
    id bigint GENERATED ALWAYS AS IDENTITY,
    slots float8 NOT NULL CHECK (slots >= 0 AND slots < 'Infinity'::float8),
    reservation_id uuid,
    PRIMARY KEY (limit_id, granted_at, id)
);
CREATE INDEX window_grants_reservations ON pgslots.window_grants (reservation_id)
    WHERE reservation_id IS NOT NULL;
COMMENT ON TABLE pgslots.window_grants IS
    'The grants of each window limit that are still inside its window, oldest first.';

CREATE TABLE pgslots.reservations (
    id uuid PRIMARY KEY,
    limit_ids uuid[] NOT NULL,
    slots float8 NOT NULL CHECK (slots >= 0 AND slots < 'Infinity'::float8),
    reserved_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    owner name NOT NULL
);
CREATE INDEX reservations_expiry ON pgslots.reservations (expires_at);
COMMENT ON TABLE pgslots.reservations IS
    'Reservations that can still be settled: slots is the cost as last settled (the estimate until then).';
