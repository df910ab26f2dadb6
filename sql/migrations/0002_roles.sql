-- 0002_roles: the two group roles of least privilege.
--
-- Why: a concurrency limit that any role can rewrite protects nothing. Tables stay private to the
-- schema owner; callers get EXECUTE on functions through two group roles:
--   pgslots_user  - acquire, release, renew, rate_limit, queue upkeep, read limits and status.
--   pgslots_admin - everything pgslots_user may, plus managing limits, listing leases, sweeping.
-- What each role may call is kept in sql/privileges.sql, applied after every change of the
-- functions. Creating roles needs CREATEROLE; without it the roles are skipped with a NOTICE, and
-- the grants follow once an administrator has created them and the schema is migrated again.

DO $$
DECLARE
    can_create boolean := (SELECT r.rolcreaterole OR r.rolsuper FROM pg_catalog.pg_roles r
                           WHERE r.rolname = current_user);
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['pgslots_user', 'pgslots_admin'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = role_name);
        IF can_create THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
        ELSE
            RAISE NOTICE 'pgslots: no CREATEROLE privilege, role % not created', role_name;
        END IF;
    END LOOP;
END
$$;
