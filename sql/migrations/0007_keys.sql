-- 0007_keys: a limit per key (templates and their instances), priorities and fairness keys in the
-- queue.
--
-- Why: one declaration, `tenant:*`, must limit every tenant separately without creating each limit
-- in advance, and waiters must be served by priority and round-robin across tenants, not only in
-- arrival order.
--  * A template is a limit row whose name ends in `*` (is_template). It holds no slots itself. The
--    first acquire of a name that starts with its prefix creates that name's instance: an ordinary
--    limit row pointing to its template (template_id) with the template's values. Limits named with
--    a trailing `*` before this migration stay ordinary limits.
--  * An instance of a deleted template that still has holders is `retiring` (its template_id names
--    the deleted template): acquires treat its name as missing, its holders release normally, and
--    it is deleted once idle.
--  * Waiters carry their priority and fairness key; served_keys remembers when each key of a limit
--    was last served, so a round of the round-robin starts with the key served least recently.

ALTER TABLE pgslots.limits
    ADD COLUMN is_template boolean NOT NULL DEFAULT false,
    ADD COLUMN template_id uuid,
    ADD COLUMN retiring boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT limits_template_rule CHECK (NOT (is_template AND template_id IS NOT NULL));
CREATE INDEX limits_templates ON pgslots.limits (name) WHERE is_template;
CREATE INDEX limits_instances ON pgslots.limits (template_id) WHERE template_id IS NOT NULL;
COMMENT ON COLUMN pgslots.limits.template_id IS
    'For an instance (a key created on first use), the template it was created from and follows.';

ALTER TABLE pgslots.settings
    ADD COLUMN priority_aging_seconds float8 NOT NULL DEFAULT 60,
    ADD CONSTRAINT settings_priority_aging CHECK (
        priority_aging_seconds >= 0 AND priority_aging_seconds < 'Infinity'::float8);
COMMENT ON COLUMN pgslots.settings.priority_aging_seconds IS
    'Each this many seconds a waiter has waited counts as one more priority level (0: no aging).';

ALTER TABLE pgslots.waiters
    ADD COLUMN priority smallint NOT NULL DEFAULT 0,
    ADD COLUMN fairness_key text;
-- Whether a queue is in plain ticket order (no priority, no key) is asked on every contended call:
-- this index holds only the waiters that make it otherwise, so the answer costs one probe.
CREATE INDEX waiters_ordered ON pgslots.waiters (limit_id) WHERE priority <> 0 OR fairness_key IS NOT NULL;

CREATE TABLE pgslots.served_keys (
    limit_id uuid NOT NULL,
    fairness_key text NOT NULL,   -- '' for waiters without a key (they form one group)
    served_at timestamptz NOT NULL,
    PRIMARY KEY (limit_id, fairness_key)
);
COMMENT ON TABLE pgslots.served_keys IS
    'When each fairness key of a limit was last granted slots while others waited.';
