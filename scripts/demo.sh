#!/usr/bin/env bash
# The relay end to end on this machine: a throwaway PostgreSQL 15 and Apache Kafka 4 (one KRaft
# node started by scripts/kafka.sh from jars fetched from Maven Central once and cached), the relay
# in between, a few outbox events written in SQL and read back from Kafka, and the replication
# slot's confirmed LSN catching up with the server's WAL position.
# Everything runs on 127.0.0.1 in a temporary directory removed on exit (KEEP_WORKDIR=1 keeps
# it, logs included). Installs what is missing first (see scripts/lib.sh: ensure_tools).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

DEMO_T0=$SECONDS
ensure_tools

say "building the relay and the demo's Kafka tools (cargo build --release)"
cargo build --release --bin outbox-relay --example create_topics --example consume
TARGET="${CARGO_TARGET_DIR:-target}"
RELAY="$TARGET/release/outbox-relay"
EXAMPLES="$TARGET/release/examples"

make_workdir
start_pg "$WORK_DIR" "$(free_port)"
start_kafka "$WORK_DIR/kafka" "$(free_port)"

say "creating the outbox table and the relay's role (migrations/001_outbox.sql, 002_relay_role.sql)"
pg_psql -f migrations/001_outbox.sql -f migrations/002_relay_role.sql

TOPICS=(outbox.event.order outbox.event.customer)
say "creating topics ${TOPICS[*]} (3 partitions each)"
"$EXAMPLES/create_topics" --brokers "$KAFKA_BROKERS" --partitions 3 "${TOPICS[@]}"

cat >"$WORK_DIR/relay.toml" <<EOF
[postgres]
url = "postgres://outbox_relay@127.0.0.1:$PG_PORT/postgres"
status_interval_secs = 2

[[outbox]]
table = "public.outbox"

[kafka]
brokers = "$KAFKA_BROKERS"
EOF
say "relay config ($WORK_DIR/relay.toml):"
sed 's/^/    /' "$WORK_DIR/relay.toml"

say "starting the relay: $RELAY run --config $WORK_DIR/relay.toml (log: $WORK_DIR/relay.log)"
RUST_LOG="${RUST_LOG:-info}" "$RELAY" run --config "$WORK_DIR/relay.toml" >"$WORK_DIR/relay.log" 2>&1 &
RELAY_PID=$!
on_exit "stop_pid $RELAY_PID 15"
relay_failed() {
    echo "---- relay log ($WORK_DIR/relay.log) ----" >&2
    tail -n 40 "$WORK_DIR/relay.log" >&2
    die "$1"
}

# The relay is streaming once its slot is active.
for ((i = 0; i < 300; i++)); do
    kill -0 "$RELAY_PID" 2>/dev/null || relay_failed "the relay exited during start-up"
    active=$(pg_psql -At -c "SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
    [ "$active" = t ] && break
    sleep 0.1
done
[ "$active" = t ] || relay_failed "the relay's slot outbox_relay did not become active within 30 s"
say "relay connected: slot outbox_relay is active"

say "writing sample events to the outbox"
pg_psql -e <<'SQL'
-- One event per transaction.
INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
VALUES (gen_random_uuid(), 'order', 'order-1001', 'OrderCreated',
        '{"orderId": "order-1001", "customerId": "cust-7", "total": 42.50}');
INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
VALUES (gen_random_uuid(), 'customer', 'cust-7', 'CustomerRegistered',
        '{"customerId": "cust-7", "name": "Zoë Müller"}');
-- Several events in one transaction: published together, in order per key.
BEGIN;
INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES
    (gen_random_uuid(), 'order', 'order-1001', 'OrderPaid', '{"orderId": "order-1001", "amount": 42.50}'),
    (gen_random_uuid(), 'order', 'order-1002', 'OrderCreated', '{"orderId": "order-1002", "customerId": "cust-8", "total": 9.99}'),
    (gen_random_uuid(), 'customer', 'cust-7', 'CustomerEmailChanged', '{"customerId": "cust-7", "email": "zoe@example.com"}');
INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
VALUES (gen_random_uuid(), 'order', 'order-1001', 'OrderShipped', '{"orderId": "order-1001", "carrier": "DHL"}');
COMMIT;
-- A rolled-back transaction: never published.
BEGIN;
INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
VALUES (gen_random_uuid(), 'order', 'order-9999', 'OrderCreated', '{"orderId": "order-9999"}');
ROLLBACK;
-- Writes to a table outside the publication: never published, yet the slot must move past
-- them once the outbox is idle, or the server would keep their WAL.
CREATE TABLE demo_other_table (n int);
INSERT INTO demo_other_table SELECT generate_series(1, 1000);
SQL
EXPECTED=6
# The WAL written so far: each commit above was flushed before it returned, so this is past the
# last one. (Not pg_current_wal_insert_lsn(): when the last record ends on a page boundary it
# points past the next page's header, where no record is, and the slot only gets there once
# more WAL is written.)
TARGET_LSN=$(pg_psql -At -c "SELECT pg_current_wal_lsn()")

say "reading the topics back from Kafka (expecting $EXPECTED records; the rolled-back one must not appear)"
topics=$(
    IFS=,
    echo "${TOPICS[*]}"
)
if ! "$EXAMPLES/consume" --brokers "$KAFKA_BROKERS" --topics "$topics" --expect "$EXPECTED" --timeout-secs 30; then
    relay_failed "fewer than $EXPECTED records arrived in Kafka within 30 s"
fi
# Nothing beyond the expected ones (the rolled-back event, say) may be there either.
if "$EXAMPLES/consume" --brokers "$KAFKA_BROKERS" --topics "$topics" --expect $((EXPECTED + 1)) \
    --timeout-secs 3 >/dev/null 2>&1; then
    die "more than $EXPECTED records in Kafka: something that was not committed was published"
fi

say "the slot's confirmed position catching up with the WAL (target: $TARGET_LSN, the WAL position after all writes)"
caught_up=
for ((i = 0; i < 30; i++)); do
    kill -0 "$RELAY_PID" 2>/dev/null || relay_failed "the relay exited"
    pg_psql -At -F '  ' -c "SELECT 'slot ' || slot_name, 'confirmed_flush_lsn ' || confirmed_flush_lsn,
                                   'pg_current_wal_lsn ' || pg_current_wal_lsn()
                            FROM pg_replication_slots WHERE slot_name = 'outbox_relay'" | sed 's/^/    /'
    caught_up=$(pg_psql -At -c "SELECT confirmed_flush_lsn >= '$TARGET_LSN'::pg_lsn
                                FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
    [ "$caught_up" = t ] && break
    sleep 1
done
[ "$caught_up" = t ] || relay_failed "confirmed_flush_lsn did not reach $TARGET_LSN within 30 s"

say "stopping the relay (SIGTERM)"
stop_pid "$RELAY_PID" 15
pg_psql -At -c "SELECT 'after shutdown: confirmed_flush_lsn ' || confirmed_flush_lsn
                FROM pg_replication_slots WHERE slot_name = 'outbox_relay'" | sed 's/^/    /'
echo "---- relay log ----"
sed 's/^/    /' "$WORK_DIR/relay.log"
say "demo finished in $((SECONDS - DEMO_T0)) s: $EXPECTED events relayed, slot confirmed past the last write"
