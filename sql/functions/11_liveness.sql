-- Liveness: when a lease taken for a session is dead, so that its slots come back in seconds.

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
