-- 002_relay_role.sql: a least-privilege role for the relay, and its publication.
--
-- Run as a superuser (PostgreSQL 15 lets only superusers give a role REPLICATION; 16+ also
-- lets a role with CREATEROLE and REPLICATION; on RDS see below), in the application's
-- database, after 001_outbox.sql. Idempotent: running it again changes nothing. Then give the
-- role a password and put it in the relay's [postgres] url:
--
--   ALTER ROLE outbox_relay PASSWORD '...';         -- or \password outbox_relay in psql
--   url = "postgres://outbox_relay:${PGPASSWORD}@db:5432/app"
--
-- What the relay needs, and why:
--   LOGIN, REPLICATION   open a replication connection (replication=database) and create
--                        its logical slot (pgoutput). Managed services: on Amazon RDS /
--                        Aurora set rds.logical_replication = 1 and `GRANT rds_replication TO
--                        outbox_relay` instead of the REPLICATION attribute; on Cloud SQL set
--                        the cloudsql.logical_decoding flag, then ALTER ROLE ... WITH
--                        REPLICATION as it is here.
--   CONNECT              on the application's database (granted below; PUBLIC usually has it).
--   SELECT on the table  read access to the outbox, as in Debezium's documented setup (handy
--                        when checking an event by id); the relay writes nothing.
--   a publication        created below by the table's owner, so the relay needs no ownership
--                        of anything. The relay creates a publication only when none of that
--                        name exists (which needs ownership of the tables), and never alters
--                        an existing one: add new outbox tables to it yourself.
--
-- The server also needs wal_level = logical (a restart), and pg_hba.conf must let the role
-- connect to the application's database: a logical replication connection
-- (replication=database) matches ordinary database lines, not the `replication` keyword.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_relay') THEN
        CREATE ROLE outbox_relay WITH LOGIN REPLICATION;
    ELSE
        ALTER ROLE outbox_relay WITH LOGIN REPLICATION;
    END IF;
END
$$;

-- CONNECT on this database: PUBLIC has it by default, but hardened servers revoke it. Only the
-- database's owner (or a superuser) can grant it; anyone else gets a warning ("no privileges
-- were granted") or a notice, and the owner grants it separately if PUBLIC may not connect.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO outbox_relay', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'not the owner of database %: run GRANT CONNECT ON DATABASE % TO outbox_relay as its owner if PUBLIC may not connect',
        current_database(), quote_ident(current_database());
END
$$;

GRANT USAGE ON SCHEMA public TO outbox_relay;
GRANT SELECT ON public.outbox TO outbox_relay;

-- The name matches the relay's default `publication = "outbox_relay"`. Inserts only: the
-- relay publishes nothing else, and updates or deletes of outbox rows then cost no decoding.
-- With several outbox tables, list them all: FOR TABLE public.outbox, billing.outbox.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'outbox_relay') THEN
        CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert', publish_via_partition_root = true);
    END IF;
END
$$;

-- Optional: let the relay record "I created slot X" as a comment on the publication, so that
-- a slot lost in a failover (slots are not replicated, catalogs are) is detected at start
-- instead of a fresh slot being created silently. Commenting needs the publication's owner,
-- and owning it needs CREATE on the database; the relay still cannot add tables it does not
-- own. Without this the relay logs a warning and only runtime slot loss is detected.
-- GRANT CREATE ON DATABASE app TO outbox_relay;
-- ALTER PUBLICATION outbox_relay OWNER TO outbox_relay;
