-- 0019_session_leases: the leases of a session, found by an index.
--
-- Why: keep_alive, which every process holding leases calls twice a second, names the leases of its
-- session that the caller no longer holds (orphans), and nothing indexed leases by session: each
-- call read the whole table (8 ms with 100,000 live leases on PostgreSQL 15, so a hundred holding
-- processes kept most of a core busy). The index costs each acquire one more index entry (2 to 4
-- microseconds a cycle, measured in the server alone); leases without a session are left out.

CREATE INDEX leases_session ON pgslots.leases (session_id) WHERE session_id IS NOT NULL;
