-- 0015_key_counts: how many keys each template has, kept as keys come and go.
--
-- Why: a new key checks its template's max_keys. Counting the keys walked an index as long as the
-- template had keys: at 100,000 keys a new key's first use took about 40 ms, for everyone. The
-- count is kept in up to 16 shards per template (the backend pid picks one), so that backends
-- creating keys at once do not queue on one row; a template's count is the sum of its shards.

CREATE TABLE pgslots.template_keys (
    template_id uuid NOT NULL REFERENCES pgslots.limits (id) ON DELETE CASCADE,
    shard integer NOT NULL,
    keys bigint NOT NULL,
    PRIMARY KEY (template_id, shard)
);

INSERT INTO pgslots.template_keys (template_id, shard, keys)
SELECT k.template_id, 0, count(*)
FROM pgslots.limits k JOIN pgslots.limits t ON t.id = k.template_id AND t.is_template
GROUP BY k.template_id;

-- A template's gauges, its keys' summed (pgslots.template_gauges answers one; the status view shows
-- it on the template's row).
CREATE TYPE pgslots.key_gauges AS (
    instances integer,
    leased integer,
    unleased double precision,
    reclaimable integer,
    leases integer,
    expired_leases integer,
    waiters integer,
    oldest_waiter_seconds double precision,
    waiter_priorities integer[],
    denied_slots bigint,
    paused_keys integer
);
