-- 0018_keep_pages: vacuum keeps the empty pages at the end of the leases and waiters tables.
--
-- Why: a lease row lives from an acquire to its release, so a busy limiter deletes nearly every row
-- it writes, and autovacuum then finds the tables empty and truncates them to a page or two. Each
-- vacuum also makes every session plan its statements on these tables again, now against that
-- page: a scan of one page costs less than an index lookup, so the plans kept until the next vacuum
-- read the whole table by scanning it, while it grows again from the releases' dead rows (measured
-- on PostgreSQL 15: a release's lookup of its lease read 11 to 12 pages a call instead of 3, on a
-- table that had grown from none to 70 pages since the vacuum). Kept, the pages are reused for new rows (vacuum
-- records their free space), the table stays at the size its busiest minute needed, and the plans
-- made after a vacuum look leases and waiters up by their keys. Truncating also takes the table's
-- exclusive lock, which stops every acquire and release while it is held. VACUUM FULL (or pg_repack)
-- still gives the space back when an operator wants it.

ALTER TABLE pgslots.leases SET (vacuum_truncate = false);
ALTER TABLE pgslots.waiters SET (vacuum_truncate = false);
