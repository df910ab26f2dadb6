-- The clock, and the small pieces every slot decision is made of.
--
-- The pieces a decision is made of (decay, the grant test, the retry hint, the holder columns) are
-- LANGUAGE sql functions without a SET clause, their names schema-qualified: the planner inlines
-- them into the statements that call them, so sharing them costs nothing on the hot path. Pieces
-- that write (a lease, a queue place, a refusal) are PL/pgSQL, whose plans stay cached.

-- The pgslots clock: the database clock, moved by settings.clock_offset (tests only).
CREATE FUNCTION pgslots._clock(clock_offset interval) RETURNS timestamptz
LANGUAGE sql VOLATILE
AS $$ SELECT pg_catalog.clock_timestamp() + clock_offset $$;

CREATE FUNCTION pgslots._now() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN pgslots._clock((SELECT s.clock_offset FROM pgslots.settings s));
END
$$;

-- Unleased slots left at `at`, decaying continuously at `rate` since `since`.
CREATE FUNCTION pgslots._decayed(amount float8, rate float8, since timestamptz, at timestamptz)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN rate > 0
        THEN greatest(0::float8,
             amount - rate * greatest(0::float8, pg_catalog.date_part('epoch', at - since)::float8))
        ELSE amount END
$$;

-- How many slots are missing for a request of `slots` on a limit of `capacity` holding `leased`
-- and `unleased` slots, with `queued` slots of waiters ahead of it. Zero or less: it fits.
CREATE FUNCTION pgslots._shortfall(capacity integer, leased integer, unleased float8, queued bigint,
                                   slots integer)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT leased + unleased + queued + slots - capacity::float8 $$;

-- How many more rate slots a settle may charge a limit whose rate slots are `used`: a debt stops
-- where they reach twice the limit, so no one settle closes a limit for long.
CREATE FUNCTION pgslots._debt_room(capacity integer, used float8) RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT greatest(0::float8, 2.0 * capacity - used) $$;

-- The same two for a limit's row, the forms the admission stages use: the rate slots a bucket still
-- holds at `at` (decayed), and the shortfall of a request on it. Whole-row arguments cost nothing:
-- inlined, (l).column is the column itself.
CREATE FUNCTION pgslots._unleased(l pgslots.limits, at timestamptz) RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT pgslots._decayed(l.unleased_slots, l.slot_decay_per_second, l.decayed_at, at) $$;

-- The rate slots a decision sees in a bucket: as if its slots began to decay margin_seconds after
-- they were counted (migration 0014). Decayed to now, plus rate x margin, never below empty (a
-- bucket that emptied margin_seconds ago or earlier decides exactly); a bucket written empty
-- (created, cleared, refunded) holds nothing to hold back. This is the conformance test of a
-- token bucket whose tolerance is smaller by the margin (GCRA's jitter bound): a downstream bucket
-- of the same rate and size accepts every grant that reaches it up to margin_seconds late. Writes
-- keep the bucket itself (_unleased); only decisions see it held back.
CREATE FUNCTION pgslots._unleased_seen(l pgslots.limits, at timestamptz) RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN l.slot_decay_per_second > 0 AND l.unleased_slots > 0
        THEN greatest(0::float8, l.unleased_slots - l.slot_decay_per_second
             * (greatest(0::float8, pg_catalog.date_part('epoch', at - l.decayed_at)::float8) - l.margin_seconds))
        ELSE l.unleased_slots END
$$;

CREATE FUNCTION pgslots._short(l pgslots.limits, at timestamptz, queued bigint, slots integer) RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT pgslots._shortfall(l."limit", l.leased_slots, pgslots._unleased_seen(l, at), queued, slots) $$;

-- How long a window limit counts a grant: its window, and its margin (migration 0014).
CREATE FUNCTION pgslots._span(window_seconds float8, margin_seconds float8) RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT window_seconds + margin_seconds $$;

-- True while a limit is paused (see 23_pause.sql).
CREATE FUNCTION pgslots._paused(paused_until timestamptz, at timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT paused_until IS NOT NULL AND paused_until > at $$;

-- The grant test. The tolerance absorbs the rounding of continuous decay.
CREATE FUNCTION pgslots._fits(shortfall float8) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT shortfall <= 1e-9 $$;

-- Whether stage 1 of admission (20_admission.sql) may grant `slots` on limit row l by itself: an
-- enabled, unpaused plain limit (not a template, a retiring key, a shadow or a window limit) with
-- room for them before the queue is counted. Inlined into the UPDATE that grants, as the pieces
-- above are.
CREATE FUNCTION pgslots._fast_open(l pgslots.limits, at timestamptz, slots integer) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT l.active AND NOT l.is_template AND NOT l.retiring AND NOT l.shadow AND l.window_seconds = 0
           AND NOT pgslots._paused(l.paused_until, at) AND pgslots._fits(pgslots._short(l, at, 0, slots))
$$;

-- Seconds until a refused request may fit. Exact for a decaying limit whose leases leave room (the
-- slots of waiters ahead decay too); otherwise estimated from the average time a slot is held,
-- between 0.1 s and 30 s.
CREATE FUNCTION pgslots._retry_after(shortfall float8, capacity integer, leased integer, slots integer,
                                     rate float8, avg_slot_occupancy_seconds float8)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN rate > 0 AND leased + slots <= capacity
        THEN shortfall / rate
        ELSE least(30::float8, greatest(0.1::float8,
                   avg_slot_occupancy_seconds * shortfall / greatest(capacity, 1)))
    END
$$;

-- The average time a slot is held, after one more lease of `held_seconds` ended: a moving average
-- with weight 1/(2*limit), the base of the retry hint.
CREATE FUNCTION pgslots._occupancy_after(average float8, held_seconds float8, capacity integer)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$ SELECT greatest(0.1::float8, average + (held_seconds - average) / (2.0::float8 * greatest(capacity, 1))) $$;

-- Holder columns of a lease: where the holder said it runs, else what the connection shows.
CREATE FUNCTION pgslots._holder_host(holder jsonb) RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT coalesce(holder ->> 'host', pg_catalog.host(pg_catalog.inet_client_addr()), 'local') $$;

CREATE FUNCTION pgslots._holder_pid(holder jsonb) RETURNS integer
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN holder ->> 'pid' ~ '^[0-9]{1,9}$' THEN (holder ->> 'pid')::integer
                ELSE pg_catalog.pg_backend_pid() END
$$;

CREATE FUNCTION pgslots._application_name() RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT nullif(pg_catalog.current_setting('application_name'), '') $$;

-- The queue lock of a limit (an advisory lock, class 1885827953): taken shared by an acquire that
-- queues without the limit's row lock, exclusively by every release and wake-up before it reads the
-- queue, so none of them can miss a waiter being queued. See acquire. True once held: release takes
-- it in an assignment, which costs no statement of its own (a PERFORM does).
CREATE FUNCTION pgslots._lock_queue(target uuid) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$ SELECT pg_catalog.pg_advisory_xact_lock(1885827953, pg_catalog.hashtext(target::text)) IS NOT NULL $$;

CREATE FUNCTION pgslots._lock_queue_shared(target uuid) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT pg_catalog.pg_advisory_xact_lock_shared(1885827953, pg_catalog.hashtext(target::text)) $$;
