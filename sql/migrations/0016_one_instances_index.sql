-- 0016_one_instances_index: one index on a key's template, not two.
--
-- Why: limits_instances (template_id) and limits_instances_by_id (template_id, id) serve the same
-- lookups (the second's leading column is the first's); every new key paid for both.

DROP INDEX pgslots.limits_instances;
