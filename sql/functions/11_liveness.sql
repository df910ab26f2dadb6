-- Liveness: when a lease taken for a session is dead, so that its slots come back in seconds, and
-- keep_alive, by which a session says it is alive.

-- Liveness. A lease taken for a session (a client process that calls keep_alive) is dead once the
-- session has not been seen for liveness_seconds and the connection it last called keep_alive from
-- is gone: the process died, or was cut off for longer than it could hold on (its client gives the
-- leases up before then). A session without a connection of its own (kept alive through a pooler)
-- is judged by time alone. A connection still there (a paused process) keeps its leases until they
-- expire.
--
-- The connection is known by an advisory lock, not by its backend PID: keep_alive takes the
-- session's lock, shared, for the life of its connection, and a connection that ends lets it go.
-- A PID can be reused by another connection after the holder died; a lock held by nobody cannot.
CREATE FUNCTION pgslots._session_lock(session uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE
AS $$ SELECT ('x' || pg_catalog.left(pg_catalog.replace(session::text, '-', ''), 16))::bit(64)::bigint $$;

-- True while a connection holds the session's lock. Probing takes the lock exclusively when it is
-- free, until the end of the caller's transaction: a keep_alive meanwhile cannot take it, but that
-- keep_alive marks the session seen, which keeps it alive just the same.
CREATE FUNCTION pgslots._connected(session uuid) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$ SELECT NOT pg_catalog.pg_try_advisory_xact_lock(pgslots._session_lock(session)) $$;

CREATE FUNCTION pgslots._session_dead(session uuid, at timestamptz, liveness_seconds float8) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT EXISTS (SELECT 1 FROM pgslots.sessions s
                   WHERE s.id = session AND s.seen_at <= at - make_interval(secs => liveness_seconds)
                     AND (s.backend_pid IS NULL OR NOT pgslots._connected(s.id)))
$$;

-- A lease row whose slots may be taken back: expired, or its session dead (and the lease older than
-- liveness_seconds: a session silent for a while, e.g. idle between two leases, does not doom a new one).
CREATE FUNCTION pgslots._lease_gone(expires_at timestamptz, session uuid, acquired_at timestamptz,
                                    at timestamptz, liveness_seconds float8) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT expires_at <= at
        OR (session IS NOT NULL AND acquired_at <= at - make_interval(secs => liveness_seconds)
            AND pgslots._session_dead(session, at, liveness_seconds))
$$;

-- Whether any lease of one limit is gone (see _lease_gone), asked on every hand-off and queued
-- refusal. Expiry is one probe of the (limit_id, expires_at) index; only leases older than
-- liveness_seconds can have a dead session, so the session's row is looked up for them alone.
-- Calling _lease_gone on each lease instead cost about 65 microseconds on a limit holding 50
-- leases (PostgreSQL 15); this, about 20.
-- The probe reads acquired_at (implied: a lease is acquired before it expires) so that it is not
-- an index-only scan: an index-only scan never marks the index entries of deleted rows dead, and
-- released leases (a hand-off's first term is short) then leave thousands of entries in the
-- probe's range for every later probe to visit until vacuum comes (200 microseconds each, seen
-- with 200 tasks on a limit of 50); an index scan marks each once.
CREATE FUNCTION pgslots._holds_gone_leases(target uuid, at timestamptz, liveness_seconds float8) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM pgslots.leases x WHERE x.limit_id = target AND x.expires_at <= at AND x.acquired_at <= at)
        OR EXISTS (SELECT 1 FROM pgslots.leases x
                   WHERE x.limit_id = target AND x.session_id IS NOT NULL
                     AND x.acquired_at <= at - make_interval(secs => liveness_seconds)
                     AND pgslots._session_dead(x.session_id, at, liveness_seconds));
END
$$;

CREATE FUNCTION pgslots.keep_alive(session uuid, leases uuid[] DEFAULT NULL, bind boolean DEFAULT true,
                                   OUT liveness_seconds float8, OUT lost uuid[], OUT orphans uuid[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pgslots, pg_temp
SET enable_seqscan = off   -- keyed lookups whatever the statistics say: see the top of 30_slots.sql
SET jit = off
AS $$
DECLARE
    at timestamptz := pgslots._now();
BEGIN
    IF session IS NULL THEN
        RAISE EXCEPTION 'session must be a UUID, not NULL.' USING ERRCODE = 'PS011',
            HINT = 'Pass the random UUID you give acquire as session.';
    END IF;
    -- The first caller of a session id owns it; no other login role can keep it alive or move it.
    UPDATE pgslots.sessions s SET backend_pid = CASE WHEN bind THEN pg_backend_pid() END, seen_at = at
    WHERE s.id = keep_alive.session AND s.owner = session_user;
    IF NOT FOUND THEN
        PERFORM pgslots._new_session(session, bind, at);
    END IF;
    IF bind THEN
        -- Held, shared, as long as this connection lives (see _connected). Taken again on every
        -- call: a prober may have held it for a moment; holding it twice costs nothing.
        PERFORM pg_try_advisory_lock_shared(pgslots._session_lock(session));
    END IF;
    liveness_seconds := (SELECT s.liveness_seconds FROM pgslots.settings s);
    -- Of the leases the caller believes it holds for this session, those that are gone (reclaimed,
    -- released by an operator, or never replicated to this server after a failover). Only leases of
    -- this session count as held: an id of anyone else's lease is answered as gone, like a made-up one.
    lost := ARRAY(SELECT g.id FROM unnest(leases) AS g(id)
                  WHERE NOT EXISTS (SELECT 1 FROM pgslots.leases x
                                    WHERE x.id = g.id AND x.expires_at > at AND x.session_id = keep_alive.session));
    -- Leases of this session the caller no longer holds (a release lost in a failover, a lease it
    -- gave up): kept alive by the session, they would wait for their expiry. Only those older than
    -- liveness_seconds, so none that is being granted right now.
    IF leases IS NOT NULL THEN
        orphans := ARRAY(SELECT DISTINCT x.id FROM pgslots.leases x
                         WHERE x.session_id = keep_alive.session AND x.id <> ALL (leases)
                           AND x.acquired_at <= at - make_interval(secs => liveness_seconds));
    END IF;
END
$$;

-- A session id seen for the first time: it belongs to the calling role from now on. A role has at
-- most settings.max_sessions_per_role sessions; at that number, its sessions that have gone quiet
-- for liveness_seconds, hold no lease and have no connection are removed to make room, and a new
-- session that still finds none is refused (PS019).
CREATE FUNCTION pgslots._new_session(session uuid, bind boolean, at timestamptz) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    cfg pgslots.settings;
BEGIN
    SELECT * INTO cfg FROM pgslots.settings;
    IF (SELECT count(*) FROM (SELECT 1 FROM pgslots.sessions s WHERE s.owner = session_user
                              LIMIT cfg.max_sessions_per_role) n) >= cfg.max_sessions_per_role THEN
        DELETE FROM pgslots.sessions s
        WHERE s.id IN (SELECT x.id FROM pgslots.sessions x
                       WHERE x.owner = session_user AND x.seen_at <= at - make_interval(secs => cfg.liveness_seconds)
                         AND NOT EXISTS (SELECT 1 FROM pgslots.leases l WHERE l.session_id = x.id)
                         AND (x.backend_pid IS NULL OR NOT pgslots._connected(x.id))
                       ORDER BY x.seen_at LIMIT 16 FOR UPDATE SKIP LOCKED);
        IF (SELECT count(*) FROM (SELECT 1 FROM pgslots.sessions s WHERE s.owner = session_user
                                  LIMIT cfg.max_sessions_per_role) n) >= cfg.max_sessions_per_role THEN
            RAISE EXCEPTION 'This role keeps % sessions alive, its most (settings.max_sessions_per_role): session % is not started.',
                cfg.max_sessions_per_role, session
                USING ERRCODE = 'PS019',
                      HINT = 'Reuse one session per process (a client does), or ask an operator to raise max_sessions_per_role.';
        END IF;
    END IF;
    INSERT INTO pgslots.sessions AS s (id, owner, backend_pid, seen_at)
    VALUES (session, session_user, CASE WHEN bind THEN pg_backend_pid() END, at)
    ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        PERFORM pgslots._not_your_session(session);
    END IF;
END
$$;

COMMENT ON FUNCTION pgslots.keep_alive(uuid, uuid[], boolean) IS
'Keeps a session alive: call it at least every second from a connection that stays open, and pass '
'the same UUID as acquire''s session. Its leases then live while it does: once it has not been '
'seen for liveness_seconds (returned) and the backend it last called from is gone, they are dead '
'and their slots go to whoever needs them. Give up the leases yourself if you cannot call it for '
'liveness_seconds - 1. Returns, of `leases` (all the leases the caller holds), those that are gone, '
'and the orphans: leases of the session older than liveness_seconds that are not in `leases` (release '
'them). bind => false (a connection through a transaction pooler): judge the session by time alone.';
