-- 0012_refused_waiters: a wait that ends in a grant is not a refusal.
--
-- Why: refusals_total counted every refused attempt, so a healthy queue (every caller queued, then
-- granted) showed as many refusals as grants. A queued waiter's place now remembers, per limit,
-- whether that limit refused it (refused); the refusal counts once the waiter leaves the queue
-- without its slots (it gave up, timed out or died), never when it is granted. A call that does
-- not queue counts at once, as before.

ALTER TABLE pgslots.waiters ADD COLUMN refused boolean NOT NULL DEFAULT false;
