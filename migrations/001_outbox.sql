-- 001_outbox.sql: the outbox table, in the Debezium Outbox Event Router's default shape, so
-- that consumers of Debezium-produced topics read the relay's records unchanged.
--
-- The application writes one row per event in the same transaction as its business change:
--
--   BEGIN;
--   UPDATE orders SET status = 'paid' WHERE id = 42;
--   INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
--   VALUES (gen_random_uuid(), 'order', '42', 'OrderPaid', '{"orderId": 42, "status": "paid"}');
--   COMMIT;
--
-- The relay reads inserts from the write-ahead log (logical replication, pgoutput), not from
-- the table, so rows may be deleted at any time after commit, even in the same transaction
-- ("insert then delete" keeps the table empty, as with Debezium). Updates and deletes of
-- outbox rows are never published.
--
-- Every column name is configurable per [[outbox]] entry in the relay's config; these are
-- the defaults. Run as the role that owns the application's tables.

CREATE TABLE IF NOT EXISTS public.outbox (
    -- Event id: the record's `id` header. Consumers deduplicate on it (delivery is
    -- at-least-once).
    id            uuid PRIMARY KEY,
    -- Kind of aggregate the event is about, e.g. 'order'. With the default topic template
    -- `outbox.event.{aggregatetype}` it names the topic: outbox.event.order.
    aggregatetype text NOT NULL,
    -- The aggregate's id: the record key (UTF-8). Events of one aggregate land in one
    -- partition, in commit order.
    aggregateid   text NOT NULL,
    -- Event type, e.g. 'OrderPaid': the record's `type` header.
    type          text NOT NULL,
    -- The record value, sent as stored: json/jsonb/text as text (jsonb in PostgreSQL's
    -- normalised rendering), bytea as raw bytes. NULL gives a record with a null value.
    payload       jsonb
);

COMMENT ON TABLE public.outbox IS
    'Transactional outbox: each committed insert is published to Kafka by outbox-relay';

-- Indexes: the primary key is the only one needed. The relay reads the WAL, not the table, so
-- no index helps it, and each extra index costs every insert. If the application keeps rows
-- for a while instead of deleting them at once, purge them by age with a timestamp column and
-- an index on it (the relay ignores columns it is not configured to read):
--
--   ALTER TABLE public.outbox ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
--   CREATE INDEX IF NOT EXISTS outbox_created_at_idx ON public.outbox (created_at);
--   -- periodically, once the events are surely in Kafka:
--   DELETE FROM public.outbox WHERE created_at < now() - interval '7 days';
