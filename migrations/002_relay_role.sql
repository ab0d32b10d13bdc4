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
--                        when checking an event by id); the relay writes nothing there.
--   SELECT, INSERT,      on public.outbox_relay_slots (created below): the record of the
--   UPDATE               slots it created, for the lost-slot guard.
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

-- The lost-slot guard: the relay records each slot it creates here, and refuses to start
-- when a recorded slot is gone instead of silently creating a fresh one (which would skip the
-- events committed in between). Rows are replicated to standbys, slots are not (before
-- PostgreSQL 17's failover slots), so this is what notices a slot lost in a failover. The
-- relay inserts and updates its own rows only; it never deletes one: after recovering from a
-- lost slot, its owner does (DELETE FROM public.outbox_relay_slots WHERE slot_name = '...').
-- A table rather than the publication's comment: commenting needs the publication's
-- ownership, and owning it needs CREATE on the database, which would also let the relay
-- create schemas and publications.
CREATE TABLE IF NOT EXISTS public.outbox_relay_slots (
    slot_name   text PRIMARY KEY,
    created_lsn pg_lsn NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON public.outbox_relay_slots TO outbox_relay;
