-- Every privilege of pgslots, in one place: applied by the migrator after the functions, each time
-- they are (re)created, so no function is ever left callable by PUBLIC or without its definer rights.
--
--   tables, sequences   private to the schema owner (the role that migrates).
--   public functions    SECURITY DEFINER (they run as the owner, with search_path pinned in their
--                       definitions), EXECUTE only for the roles below.
--   helpers (_name)     not callable by anyone but the owner, except the pure helpers the status view
--                       uses, which run as the role reading the view.
--   pgslots_user        acquire, release, renew, rate_limit, reserve, settle, queue upkeep, read
--                       limits and status;
--                       no table access, no limit changes, and no way to list other holders' lease
--                       ids (a lease id is the capability to release or renew that lease).
--   pgslots_admin       everything pgslots_user may, plus managing limits, listing leases, sweeping.
-- Roles that do not exist (no CREATEROLE when 0002 ran) are skipped with a NOTICE.

DO $$
DECLARE
    user_functions text[] := ARRAY['acquire', 'acquire_each', 'release_each', 'rate_limit', 'reserve', 'settle', 'release', 'renew', 'renew_leases', 'heartbeat',
                                   'leave_queue', 'keep_alive', 'get_limits', 'get_instances', 'reclaimable_slots', 'pause',
                                   'schema_version', 'get_overview', 'template_gauges'];
    admin_functions text[] := ARRAY['sweep', 'create_limit', 'update_limit', 'delete_limit', 'resume',
                                    'list_leases', 'list_holders', 'lock_for_apply', 'clear_debt'];
    view_helpers text[] := ARRAY['_clock', '_decayed', '_unleased', '_paused', '_span'];
    f record;
    has_user boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_user');
    has_admin boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgslots_admin');
BEGIN
    REVOKE ALL ON ALL TABLES IN SCHEMA pgslots FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgslots FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgslots FROM PUBLIC;
    -- Functions created later by this role are not executable by PUBLIC either.
    ALTER DEFAULT PRIVILEGES IN SCHEMA pgslots REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

    FOR f IN SELECT p.oid::regprocedure AS signature, p.proname::text AS name
             FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'pgslots'::regnamespace LOOP
        IF f.name = ANY (user_functions || admin_functions) THEN
            EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', f.signature);
        ELSIF f.name NOT LIKE '\_%' THEN
            RAISE EXCEPTION 'pgslots function % is neither granted nor internal: add it to privileges.sql.',
                f.signature;
        END IF;
        IF f.name = ANY (user_functions || view_helpers) AND has_user THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pgslots_user', f.signature);
        ELSIF f.name = ANY (admin_functions) AND has_admin THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pgslots_admin', f.signature);
        END IF;
    END LOOP;

    IF has_user THEN
        GRANT USAGE ON SCHEMA pgslots TO pgslots_user;
        GRANT SELECT ON pgslots.status TO pgslots_user;
    ELSE
        RAISE NOTICE 'pgslots: role pgslots_user does not exist, its grants are skipped';
    END IF;
    IF has_admin THEN
        GRANT USAGE ON SCHEMA pgslots TO pgslots_admin;
        IF has_user THEN
            GRANT pgslots_user TO pgslots_admin;   -- an admin may do all a user may
        END IF;
        GRANT SELECT ON pgslots.settings TO pgslots_admin;
    ELSE
        RAISE NOTICE 'pgslots: role pgslots_admin does not exist, its grants are skipped';
    END IF;
END
$$;
