-- 0006_sessions: leases bound to the life of a client process.
--
-- Why: a holder that dies (SIGKILL, OOM) kept its slots until its lease expired, 300 s by default.
-- A client process now keeps one session alive (its background connection calls keep_alive about
-- twice a second) and takes its leases for that session. A lease whose session has not been seen
-- for liveness_seconds, and whose backend is gone, is dead: the next caller that needs its slots
-- takes them back. The lease's expiry stays the backstop for what the database cannot see.

ALTER TABLE pgslots.settings
    ADD COLUMN liveness_seconds float8 NOT NULL DEFAULT 10,
    ADD CONSTRAINT settings_liveness CHECK (liveness_seconds >= 1 AND liveness_seconds < 3600);
COMMENT ON COLUMN pgslots.settings.liveness_seconds IS
    'A lease taken for a session is dead once the session has not been seen for this long and its backend is gone.';

CREATE TABLE pgslots.sessions (
    id uuid PRIMARY KEY,
    owner name NOT NULL,
    backend_pid integer,
    seen_at timestamptz NOT NULL
);
COMMENT ON TABLE pgslots.sessions IS
    'Client processes that keep their leases alive (keep_alive): the backend they last called from, and when.';

ALTER TABLE pgslots.leases ADD COLUMN session_id uuid;
ALTER TABLE pgslots.waiters ADD COLUMN session_id uuid;
