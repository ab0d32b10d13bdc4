#!/usr/bin/env bash
# Backlog drain benchmark: N outbox events are committed while the relay is stopped (slot and
# publication already present), then the relay starts and we time how long it takes until
# confirmed_flush_lsn passes the last transaction, i.e. until Kafka acknowledged everything.
# Prints a Markdown table row. Usage: benches/backlog.sh [N] [TXN_SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

N=${1:-100000}
TXN=${2:-10000}
KEYS=64

ensure_tools
make_workdir
say "building the relay (release)"
cargo build --release --quiet --bin outbox-relay --example create_topics
PG_PORT_=$(free_port)
start_pg "$WORK_DIR/pg" "$PG_PORT_"
start_tansu "$(free_port)"
./target/release/examples/create_topics --brokers "$KAFKA_BROKERS" --partitions 8 \
    outbox.event.order outbox.event.customer >/dev/null

pg_psql -f migrations/001_outbox.sql >/dev/null
pg_psql -c "CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert')" \
    -c "SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')" >/dev/null

say "writing $N events in transactions of $TXN"
# ~230-byte JSON payloads, 64 keys, two aggregate types (two topics).
for ((done = 0; done < N; done += TXN)); do
    n=$((N - done < TXN ? N - done : TXN))
    pg_psql -c "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
        SELECT gen_random_uuid(), CASE WHEN i % 2 = 0 THEN 'order' ELSE 'customer' END,
               'key-' || (i % $KEYS), 'Created',
               json_build_object('seq', $done + i, 'customer', 'c-' || (i % 977),
                   'note', repeat('x', 150), 'total', i * 1.5)
        FROM generate_series(1, $n) i"
done
TARGET=$(pg_psql -At -c "SELECT pg_current_wal_lsn()")
BYTES=$(pg_psql -At -c "SELECT sum(pg_column_size(payload)) FROM outbox")

cat >"$WORK_DIR/relay.toml" <<TOML
[postgres]
url = "$PG_URL"
[[outbox]]
table = "public.outbox"
[kafka]
brokers = "$KAFKA_BROKERS"
TOML

say "draining with outbox-relay"
start=$(date +%s.%N)
RUST_LOG=warn ./target/release/outbox-relay run --config "$WORK_DIR/relay.toml" 2>"$WORK_DIR/relay.log" &
RELAY=$!
on_exit "stop_pid $RELAY 5"
if [ -n "${PERF_OUT:-}" ]; then
    # Sampling profile of the drain (perf's software clock works where hardware counters don't).
    perf record -q -F 999 -g -p "$RELAY" -o "$PERF_OUT" 2>/dev/null &
    PERF=$!
    on_exit "kill -INT $PERF 2>/dev/null; wait $PERF 2>/dev/null"
fi
until [ "$(pg_psql -At -c "SELECT confirmed_flush_lsn >= '$TARGET' FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")" = t ]; do
    kill -0 $RELAY 2>/dev/null || { cat "$WORK_DIR/relay.log" >&2; die "relay exited"; }
    sleep 0.05
done
end=$(date +%s.%N)
# utime + stime of all threads, in clock ticks; VmHWM is peak RSS.
read -r utime stime < <(awk '{print $14, $15}' "/proc/$RELAY/stat")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$RELAY/status")
tck=$(getconf CLK_TCK)
python3 - "$N" "$BYTES" "$start" "$end" "$utime" "$stime" "$tck" "$hwm" <<'PY'
import sys
n, b, s, e, ut, st, tck, hwm = sys.argv[1:]
n, b, secs = int(n), int(b), float(e) - float(s)
cpu = (int(ut) + int(st)) / int(tck)
print("| events | seconds | events/s | payload MB/s | CPU s / 100k events | peak RSS MB |")
print("|---|---|---|---|---|---|")
print(f"| {n} | {secs:.2f} | {n / secs:,.0f} | {b / secs / 1e6:.1f} | {cpu * 100000 / n:.3f} | {int(hwm) / 1024:.1f} |")
PY
