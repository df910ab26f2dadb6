-- 0002_roles: least privilege.
--
-- Why: a concurrency limit that any role can rewrite protects nothing. The tables become private
-- to the schema owner; the public functions run as their owner (SECURITY DEFINER, with the
-- search_path pinned since 0001) and are granted to two group roles:
--   pgslots_user  - acquire, release, renew, rate_limit, queue upkeep, read limits and status;
--                   no table access, no limit changes, and no way to list other holders' lease ids
--                   (a lease id is the capability to release or renew that lease).
--   pgslots_admin - everything pgslots_user may, plus managing limits, listing leases, sweeping.
-- Creating roles needs CREATEROLE. Without it the roles are skipped with a NOTICE and only the
-- schema owner can use pgslots until an administrator creates them and re-runs the grants below
-- (see docs/operations.md).

DO $$
DECLARE
    can_create boolean := (SELECT r.rolcreaterole OR r.rolsuper FROM pg_catalog.pg_roles r
                           WHERE r.rolname = current_user);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_user') THEN
        IF can_create THEN
            CREATE ROLE pgslots_user NOLOGIN;
        ELSE
            RAISE NOTICE 'pgslots: no CREATEROLE privilege, role pgslots_user not created';
        END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_admin') THEN
        IF can_create THEN
            CREATE ROLE pgslots_admin NOLOGIN;
        ELSE
            RAISE NOTICE 'pgslots: no CREATEROLE privilege, role pgslots_admin not created';
        END IF;
    END IF;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA pgslots FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgslots FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgslots FROM PUBLIC;

ALTER FUNCTION pgslots.acquire(text[], integer, float8, jsonb, boolean, bigint, uuid, uuid) SECURITY DEFINER;
ALTER FUNCTION pgslots.rate_limit(text[], integer, boolean, bigint, uuid) SECURITY DEFINER;
ALTER FUNCTION pgslots.release(uuid, boolean) SECURITY DEFINER;
ALTER FUNCTION pgslots.renew(uuid, float8) SECURITY DEFINER;
ALTER FUNCTION pgslots.heartbeat(uuid) SECURITY DEFINER;
ALTER FUNCTION pgslots.leave_queue(bigint) SECURITY DEFINER;
ALTER FUNCTION pgslots.get_limits(text[]) SECURITY DEFINER;
ALTER FUNCTION pgslots.schema_version() SECURITY DEFINER;
ALTER FUNCTION pgslots.sweep() SECURITY DEFINER;
ALTER FUNCTION pgslots.create_limit(text, integer, float8, boolean, integer) SECURITY DEFINER;
ALTER FUNCTION pgslots.update_limit(text, integer, float8, boolean, integer, text) SECURITY DEFINER;
ALTER FUNCTION pgslots.delete_limit(text) SECURITY DEFINER;
ALTER FUNCTION pgslots.list_leases(text) SECURITY DEFINER;
ALTER FUNCTION pgslots.lock_for_apply() SECURITY DEFINER;
-- The status view calls these as the querying role: the clock reads the (private) settings table.
ALTER FUNCTION pgslots._now() SECURITY DEFINER;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_user') THEN
        GRANT USAGE ON SCHEMA pgslots TO pgslots_user;
        GRANT EXECUTE ON FUNCTION
            pgslots.acquire(text[], integer, float8, jsonb, boolean, bigint, uuid, uuid),
            pgslots.rate_limit(text[], integer, boolean, bigint, uuid),
            pgslots.release(uuid, boolean),
            pgslots.renew(uuid, float8),
            pgslots.heartbeat(uuid),
            pgslots.leave_queue(bigint),
            pgslots.get_limits(text[]),
            pgslots.schema_version()
        TO pgslots_user;
        GRANT EXECUTE ON FUNCTION pgslots._now(), pgslots._decayed(float8, float8, timestamptz, timestamptz)
            TO pgslots_user;
        GRANT SELECT ON pgslots.status TO pgslots_user;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_admin') THEN
        GRANT USAGE ON SCHEMA pgslots TO pgslots_admin;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_user') THEN
            GRANT pgslots_user TO pgslots_admin;   -- an admin may do all a user may
        END IF;
        GRANT EXECUTE ON FUNCTION
            pgslots.sweep(),
            pgslots.create_limit(text, integer, float8, boolean, integer),
            pgslots.update_limit(text, integer, float8, boolean, integer, text),
            pgslots.delete_limit(text),
            pgslots.list_leases(text),
            pgslots.lock_for_apply()
        TO pgslots_admin;
        GRANT SELECT ON pgslots.settings TO pgslots_admin;
    END IF;
END
$$;
