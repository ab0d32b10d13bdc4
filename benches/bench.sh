#!/usr/bin/env bash
# outbox-relay benchmark: one command, Markdown tables on stdout (progress on stderr).
#
#   benches/bench.sh                 full run on a throwaway PostgreSQL 15 + Apache Kafka (~10 min)
#   benches/bench.sh --quick         small sizes, a smoke test (~5 min after the build)
#   benches/bench.sh --pg-url postgres://me@db:5432/app --brokers kafka:9092
#                                    against your own server and/or broker
#
# What it measures, side by side on the same server, broker and backlog (slot and publication
# created first, then N events in transactions of --txn, JSON payloads of --payload bytes,
# 64 keys, 2 topics x 8 partitions):
#   drain    the decode limit (pg_recvlogical on a copy of the slot, to /dev/null, --endpos =
#            the last commit), outbox-relay (process start until confirmed_flush_lsn passes the
#            last commit) and a polling publisher (examples/bench_poller.rs: SELECT ... FOR
#            UPDATE SKIP LOCKED / produce / wait for acks / DELETE, on a copy of the rows), and
#            librdkafka alone (examples/bench_floor.rs: the same records straight to the broker)
#   quota    outbox-relay on the same backlog under a CPU quota (cgroup; --quota-pct of a core)
#   latency  single-event transactions at fixed rates (examples/bench_load.rs): commit-to-ack
#            from the relay's histogram, commit-to-consumer from a consumer
#   memory   one transaction of --mem-events events, with the broker keeping up and with the
#            broker frozen (SIGSTOP) for --freeze-secs right after the commit
#   scaling  payload sizes, number of outbox tables, backlog sizes
#   compare  (not in the default run) two relay builds, --relay-bin and --compare-bin,
#            draining the same backlog in turns, --repeat times each: an A/B of a change
#   eos      (not in the default run) at-least-once against exactly-once ([kafka] delivery):
#            the same backlog drained in turns, --repeat times each; then single-event
#            transactions at --eos-rate, commit-to-consumer in both modes (read_committed
#            consumer for exactly-once)
#   debezium (not in the default run) the relay against Debezium (scripts/debezium.sh: Kafka
#            Connect standalone, Debezium's PostgreSQL connector, the Outbox Event Router) in
#            turns, each on its own copy of the same slot, Debezium's topics behind a prefix of
#            their own: a backlog drain (also with the Connect JVM at --debezium-small-heap,
#            and both under a 1-CPU quota), steady single-event transactions at --rates
#            (commit-to-consumer), and the time from process start to the first record
#
# The throwaway broker is a single-node Apache Kafka (scripts/lib.sh start_kafka, jars from
# Maven Central), fresh for each section, with the JVM settings of Kafka's own start scripts
# (G1, C2, 1 GB heap) unless KAFKA_JVM_OPTS / KAFKA_HEAP_OPTS say otherwise (scripts/kafka.sh's
# defaults, C1 only, favour start-up over throughput).
#
# On your own setup it works in a schema, publication, slots and topics of its own, all named
# outbox_bench / outbox-bench.*, and drops the schema, publication and slots when done (the
# topics stay). The role needs CREATE on the database, REPLICATION, and pg_recvlogical.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

usage() {
    cat <<'EOF'
Usage: benches/bench.sh [options]

  --quick                 small sizes (smoke test, ~5 minutes)
  -n, --events N          backlog size for the drain comparison (default 1000000)
  --txn N                 events per transaction in backlogs (default 10000)
  --payload BYTES         JSON payload size (default 230)
  --repeat R              repeat each drain measurement R times, report the median (default 1)
  --poll-batch N          rows per polling-publisher transaction (default 1000)
  --rates R1,R2           latency: transactions per second (default 1000,10000)
  --load-secs S           latency: seconds per rate (default 30)
  --mem-events N          memory: events in the one big transaction (default 1000000)
  --freeze-secs S         memory: how long the broker is frozen (default 5)
  --scale-events N        scaling: events per payload/table run (default 200000)
  --scale-payloads LIST   scaling: payload sizes (default 100,1000,10000)
  --scale-tables LIST     scaling: outbox table counts, at most 16 (default 1,4,16)
  --scale-sources LIST    scaling: where events come from: table (outbox rows), message
                          (pg_logical_emit_message, the table-less outbox) (default table,message)
  --scale-backlogs LIST   scaling: backlog sizes (default 100000,1000000)
  --quota-pct P           quota: CPU limit in % of one core (default 25)
  --eos-rate R            eos: transactions per second of the latency part (default 1000)
  --debezium-mode M       debezium: scripts/debezium.sh --mode, what Debezium's records look
                          like: strings (the relay's records byte for byte), defaults or
                          raw-json (default strings)
  --debezium-heap SIZE    debezium: the Connect JVM's -Xmx (default 2G, connect-standalone.sh's)
  --debezium-small-heap SIZE
                          debezium: the heap of the extra drain, a sidecar's budget (default 256m)
  --slot-grace-secs S     debezium: once every record is in Kafka, how long to wait for the
                          slot to be confirmed past the last commit (default 30; Debezium
                          confirms only when it flushes offsets, every 10 s, and then only
                          up to the commit before its last record's transaction)
                          The debezium section drains 500,000 events unless -n says otherwise
                          and repeats everything 3 times unless --repeat says otherwise.
  --sections LIST         any of drain,quota,latency,memory,scaling,compare,eos,debezium
                          (default: all but compare, eos and debezium)
  --pg-url URL            use this PostgreSQL (wal_level=logical) instead of a throwaway one
  --brokers HOST:PORT     use this Kafka instead of a throwaway Apache Kafka (it must support
                          transactions for eos; its offsets topic is outbox-bench.offsets)
  --relay-bin PATH        relay binary to measure (default: outbox-relay in
                          ${CARGO_TARGET_DIR:-target}/release, built)
  --compare-bin PATH      compare: the other relay binary (e.g. a build of the previous commit)
  --no-build              don't run cargo build (binaries must exist)
  --perf FILE             also profile one extra relay drain with perf into FILE and print
                          the top symbols (perf report --no-children --sort dso,sym);
                          --sections none --perf FILE: only that
  --results FILE          keep the raw results (JSON lines) in FILE
  -h, --help              this text
EOF
}

N=1000000
TXN=10000
PAYLOAD=230
KEYS=64
PARTITIONS=8
REPEAT=1
POLL_BATCH=1000
RATES=1000,10000
LOAD_SECS=30
MEM_EVENTS=1000000
FREEZE_SECS=5
SCALE_N=200000
SCALE_PAYLOADS=100,1000,10000
SCALE_TABLES=1,4,16
SCALE_SOURCES=table,message
SCALE_BACKLOGS=100000,1000000
QUOTA_PCT=25
EOS_RATE=1000
DBZ_MODE="strings"
DBZ_HEAP=2G
DBZ_SMALL_HEAP=256m
DBZ_GRACE=30
N_SET=
REPEAT_SET=
SECTIONS=drain,quota,latency,memory,scaling
PG_URL_ARG=
BROKERS_ARG=
RELAY_BIN=
COMPARE_BIN=
BUILD=1
PERF_OUT=
RESULTS_ARG=

while [ $# -gt 0 ]; do
    case "$1" in
    --quick)
        N=100000 LOAD_SECS=5 MEM_EVENTS=200000 SCALE_N=20000 SCALE_BACKLOGS=20000,100000 N_SET=1
        ;;
    -n | --events) N=$2 N_SET=1 && shift ;;
    --txn) TXN=$2 && shift ;;
    --payload) PAYLOAD=$2 && shift ;;
    --repeat) REPEAT=$2 REPEAT_SET=1 && shift ;;
    --poll-batch) POLL_BATCH=$2 && shift ;;
    --rates) RATES=$2 && shift ;;
    --load-secs) LOAD_SECS=$2 && shift ;;
    --mem-events) MEM_EVENTS=$2 && shift ;;
    --freeze-secs) FREEZE_SECS=$2 && shift ;;
    --scale-events) SCALE_N=$2 && shift ;;
    --scale-payloads) SCALE_PAYLOADS=$2 && shift ;;
    --scale-tables) SCALE_TABLES=$2 && shift ;;
    --scale-sources) SCALE_SOURCES=$2 && shift ;;
    --scale-backlogs) SCALE_BACKLOGS=$2 && shift ;;
    --quota-pct) QUOTA_PCT=$2 && shift ;;
    --eos-rate) EOS_RATE=$2 && shift ;;
    --debezium-mode) DBZ_MODE=$2 && shift ;;
    --debezium-heap) DBZ_HEAP=$2 && shift ;;
    --debezium-small-heap) DBZ_SMALL_HEAP=$2 && shift ;;
    --slot-grace-secs) DBZ_GRACE=$2 && shift ;;
    --sections) SECTIONS=$2 && shift ;;
    --pg-url) PG_URL_ARG=$2 && shift ;;
    --brokers) BROKERS_ARG=$2 && shift ;;
    --relay-bin) RELAY_BIN=$2 && shift ;;
    --compare-bin) COMPARE_BIN=$2 && shift ;;
    --no-build) BUILD= ;;
    --perf) PERF_OUT=$2 && shift ;;
    --results) RESULTS_ARG=$2 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage >&2 && die "unknown option: $1" ;;
    esac
    shift
done
for v in N TXN PAYLOAD REPEAT POLL_BATCH LOAD_SECS MEM_EVENTS SCALE_N QUOTA_PCT EOS_RATE DBZ_GRACE; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number, not '${!v}'"
done
has_section() { [[ ",$SECTIONS," == *",$1,"* ]]; }
case "$DBZ_MODE" in
defaults | raw-json | strings) ;;
*) die "--debezium-mode is strings, defaults or raw-json, not $DBZ_MODE" ;;
esac

# Names of everything the benchmark creates; on your own setup nothing else is touched.
SCHEMA=outbox_bench
PUB=outbox_bench
SLOT=outbox_bench           # the relay's slot
BASE_SLOT=outbox_bench_base # pristine copy of the slot as it was before the backlog
COPY_SLOT=outbox_bench_copy # what pg_recvlogical reads
TOPIC_PREFIX=outbox-bench.
TOPICS="${TOPIC_PREFIX}order,${TOPIC_PREFIX}customer"
OFFSETS_TOPIC=${TOPIC_PREFIX}offsets # exactly-once: the relay's positions (1 partition, compacted)
MARKER='outbox-relay benchmark scratch schema (benches/bench.sh drops it)'
DBZ_SLOT=outbox_bench_dbz # Debezium's slot (the debezium section)
DBZ_PREFIX=outbox-bench-dbz.
# Where Debezium's Outbox Event Router sends the rows: <prefix>outbox.event.<aggregatetype>.
DBZ_TOPICS="${DBZ_PREFIX}outbox.event.order,${DBZ_PREFIX}outbox.event.customer"

# ---------------------------------------------------------------------------------------
# Tools, binaries, servers.
if [ -z "$PG_URL_ARG" ] || [ -z "$BROKERS_ARG" ]; then
    ensure_tools
else
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
fi
for t in psql pg_recvlogical python3; do
    command -v "$t" >/dev/null || die "$t not found (PostgreSQL client tools and python3 are needed)"
done
has_section debezium && ensure_debezium
make_workdir
REPORT="python3 benches/report.py"
RESULTS="$WORK_DIR/results.jsonl"
: >"$RESULTS"
TCK=$(getconf CLK_TCK)

TARGET_DIR=${CARGO_TARGET_DIR:-target}
EX=$TARGET_DIR/release/examples
if [ -n "$BUILD" ]; then
    say "building the relay and the benchmark programs (release)"
    cargo build --release --quiet --bin outbox-relay --example create_topics \
        --example bench_drain --example bench_poller --example bench_load --example bench_floor
fi
RELAY_BIN=${RELAY_BIN:-$TARGET_DIR/release/outbox-relay}
for b in "$RELAY_BIN" "$EX"/create_topics "$EX"/bench_drain "$EX"/bench_poller "$EX"/bench_load "$EX"/bench_floor; do
    [ -x "$b" ] || die "$b not found; build it (or drop --no-build)"
done

if [ -n "$PG_URL_ARG" ]; then
    PG_URL=$PG_URL_ARG
else
    start_pg "$WORK_DIR/pg" "$(free_port)"
fi
OWN_BROKER=
BROKER_PID=
BROKER_DIR=
BROKER_N=0
WATCH=()
# Kafka's own start scripts' JVM settings (kafka-server-start.sh, kafka-run-class.sh): C2 on,
# which scripts/kafka.sh's defaults (C1 only, for fast starts in tests) leave off.
export KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx1g -Xms1g}
export KAFKA_JVM_OPTS=${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}
new_broker() {
    # A fresh broker between sections, so that every section starts alike (empty logs, no
    # records of the previous sections to keep in the page cache or to clean up).
    if [ -n "$BROKERS_ARG" ]; then
        KAFKA_BROKERS=$BROKERS_ARG
    else
        stop_kafka
        [ -z "$BROKER_DIR" ] || rm -rf "$BROKER_DIR"
        BROKER_N=$((BROKER_N + 1))
        BROKER_DIR="$WORK_DIR/kafka-$BROKER_N"
        start_kafka "$BROKER_DIR" "$(free_port)"
        BROKER_PID=$KAFKA_PID
        OWN_BROKER=1
        WATCH=(--watch-pid "$BROKER_PID") # the broker's CPU time is reported too
    fi
    # The broker creates no topics on its own (auto.create.topics.enable=false).
    "$EX"/create_topics --brokers "$KAFKA_BROKERS" --partitions "$PARTITIONS" \
        "${TOPICS%%,*}" "${TOPICS##*,}" >/dev/null
    if has_section eos; then
        "$EX"/create_topics --brokers "$KAFKA_BROKERS" --partitions 1 \
            --config cleanup.policy=compact "$OFFSETS_TOPIC" >/dev/null
    fi
    if has_section debezium; then
        "$EX"/create_topics --brokers "$KAFKA_BROKERS" --partitions "$PARTITIONS" \
            "${DBZ_TOPICS%%,*}" "${DBZ_TOPICS##*,}" >/dev/null
    fi
    if [ -n "$OWN_BROKER" ]; then
        # Not measured: a new broker creates and loads its transaction state log when the first
        # (idempotent) producer asks for a producer id ("Coordinator load in progress", up to a
        # second), and its JIT compiles the hot paths under the first load; a broker that has
        # been running for a while did both long ago.
        say "warming the broker up (200,000 records straight to it, not measured)"
        "$EX"/bench_floor --brokers "$KAFKA_BROKERS" --topics "$TOPICS" -n 200000 \
            --payload "$PAYLOAD" --keys "$KEYS" >/dev/null || die "bench_floor (broker warm-up) failed"
    fi
}
new_broker

bpsql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d "$PG_URL" "$@"; }

# ---------------------------------------------------------------------------------------
# The scratch schema: 16 outbox tables, the poller's table, a pool of incompressible filler.
wait_slot_idle() {
    local i
    for ((i = 0; i < 100; i++)); do
        [ "$(bpsql -At -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'outbox\_bench%' AND active")" = 0 ] && return 0
        sleep 0.1
    done
    die "a benchmark slot stays active"
}
drop_slots() {
    wait_slot_idle
    bpsql -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name IN ('$SLOT', '$BASE_SLOT', '$COPY_SLOT', '$DBZ_SLOT')" >/dev/null
}
cleanup_db() {
    drop_slots 2>/dev/null || true
    bpsql -c "DROP PUBLICATION IF EXISTS $PUB" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" \
        >/dev/null 2>&1 || true
}

existing=$(bpsql -At -c "SELECT coalesce(obj_description(oid, 'pg_namespace'), '') FROM pg_namespace WHERE nspname = '$SCHEMA'")
if [ -n "$existing" ] && [ "$existing" != "$MARKER" ]; then
    die "schema $SCHEMA exists and was not made by this benchmark; refusing to touch it"
fi
[ "$(bpsql -At -c "SHOW wal_level")" = logical ] || die "wal_level must be logical"
on_exit cleanup_db
drop_slots
say "creating schema $SCHEMA (outbox tables, filler)"
{
    echo "DROP PUBLICATION IF EXISTS $PUB;"
    echo "DROP SCHEMA IF EXISTS $SCHEMA CASCADE;"
    echo "CREATE SCHEMA $SCHEMA;"
    echo "COMMENT ON SCHEMA $SCHEMA IS '$MARKER';"
    # The shape of migrations/001_outbox.sql.
    echo "CREATE TABLE $SCHEMA.outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL,
          aggregateid text NOT NULL, type text NOT NULL, payload jsonb);"
    for t in $(seq 2 16); do
        echo "CREATE TABLE $SCHEMA.outbox_$t (LIKE $SCHEMA.outbox INCLUDING ALL);"
    done
    # 997 random hex strings of 10,560 characters: payload filler PostgreSQL can't compress,
    # so big payloads cost what real ones do (TOAST, detoasting in the walsender).
    echo "CREATE TABLE $SCHEMA.filler AS SELECT i, string_agg(md5(random()::text), '') AS s
          FROM generate_series(0, 996) i, generate_series(1, 330) j GROUP BY i;"
    echo "CREATE UNIQUE INDEX ON $SCHEMA.filler (i);"
} | bpsql >/dev/null

table_name() { if [ "$1" = 1 ]; then echo "$SCHEMA.outbox"; else echo "$SCHEMA.outbox_$1"; fi; }
table_list() {
    local k=$1 t out=
    for ((t = 1; t <= k; t++)); do out+="${out:+, }$(table_name "$t")"; done
    echo "$out"
}

# rows_sql TABLE FIRST LAST PAYLOAD TABLES T: INSERT of events FIRST..LAST that go to table T
# of TABLES (every other event to each topic, keys key-0..key-63).
rows_sql() {
    local table=$1 first=$2 last=$3 payload=$4 k=$5 t=$6 note
    note=$((payload > 66 ? payload - 66 : 1))
    echo "INSERT INTO $table (id, aggregatetype, aggregateid, type, payload)
        SELECT gen_random_uuid(), CASE WHEN g % 2 = 0 THEN 'order' ELSE 'customer' END,
               'key-' || (g % $KEYS), 'Created',
               jsonb_build_object('seq', g, 'customer', 'c-' || (g % 977),
                   'note', left(f.s, $note), 'total', g * 1.5)
        FROM generate_series($first::bigint, $last::bigint) g
        JOIN $SCHEMA.filler f ON f.i = g % 997
        WHERE (g / 2) % $k = $((t - 1))"
}

# msgs_sql FIRST LAST PAYLOAD: the same events as rows_sql, emitted as logical decoding
# messages (the table-less outbox, [[message]] prefix "outbox") instead of table rows.
msgs_sql() {
    local first=$1 last=$2 payload=$3 note
    note=$((payload > 66 ? payload - 66 : 1))
    echo "SELECT count(pg_logical_emit_message(true, 'outbox', jsonb_build_object(
               'id', gen_random_uuid(),
               'aggregatetype', CASE WHEN g % 2 = 0 THEN 'order' ELSE 'customer' END,
               'aggregateid', 'key-' || (g % $KEYS), 'type', 'Created',
               'payload', jsonb_build_object('seq', g, 'customer', 'c-' || (g % 977),
                   'note', left(f.s, $note), 'total', g * 1.5))::text))
        FROM generate_series($first::bigint, $last::bigint) g
        JOIN $SCHEMA.filler f ON f.i = g % 997"
}

# new_backlog N PAYLOAD TABLES: empty tables, a fresh publication and slot, then N events in
# transactions of $TXN spread over TABLES tables (TABLES = message: emitted as logical
# decoding messages, no table). Sets TARGET (the WAL position after the last
# commit), LAST_COMMIT (the WAL insert position just before the last COMMIT: a slot confirmed
# at or past it has the last transaction, whichever of its commit record's start or end the
# reader confirms), BYTES (payload bytes as published) and PAYLOAD_AVG; keeps a pristine copy of the
# slot so that every reader starts from the same place.
new_backlog() {
    local n=$1 payload=$2 k=$3 t off m
    drop_slots
    {
        echo "TRUNCATE $(table_list 16);"
        echo "DROP PUBLICATION IF EXISTS $PUB;"
        if [ "$k" = message ]; then
            echo "CREATE PUBLICATION $PUB WITH (publish = 'insert');"
        else
            echo "CREATE PUBLICATION $PUB FOR TABLE $(table_list "$k") WITH (publish = 'insert');"
        fi
        echo "SELECT pg_create_logical_replication_slot('$SLOT', 'pgoutput');"
    } | bpsql >/dev/null
    local wal_start
    wal_start=$(bpsql -At -c "SELECT pg_current_wal_lsn()")
    rm -f "$WORK_DIR/last-commit"
    if [ "$n" -gt 0 ]; then
        say "writing $n events ($payload-byte payloads, $k table(s), transactions of $TXN)"
        {
            printf '\\pset tuples_only on\n\\pset format unaligned\n'
            for ((off = 0; off < n; off += TXN)); do
                m=$((n - off < TXN ? n - off : TXN))
                echo "BEGIN;"
                if [ "$k" = message ]; then
                    echo "$(msgs_sql $((off + 1)) $((off + m)) "$payload");"
                fi
                for ((t = 1; t <= ${k/message/0}; t++)); do
                    echo "$(rows_sql "$(table_name "$t")" $((off + 1)) $((off + m)) "$payload" "$k" "$t");"
                done
                if ((off + TXN >= n)); then
                    echo "SELECT pg_current_wal_insert_lsn() \\g $WORK_DIR/last-commit"
                fi
                echo "COMMIT;"
            done
        } | bpsql >/dev/null
    fi
    TARGET=$(bpsql -At -c "SELECT pg_current_wal_lsn()")
    LAST_COMMIT=$TARGET
    [ ! -s "$WORK_DIR/last-commit" ] || LAST_COMMIT=$(tr -d '[:space:]' <"$WORK_DIR/last-commit")
    # Don't let a checkpoint triggered by the writes land in the middle of a measurement
    # (needs superuser or pg_checkpoint; skipped otherwise).
    bpsql -c "CHECKPOINT" >/dev/null 2>&1 || true
    local wal_bytes
    wal_bytes=$(bpsql -At -c "SELECT pg_wal_lsn_diff('$TARGET', '$wal_start')")
    if [ "$k" = message ]; then
        # The same payload expression as msgs_sql, measured without emitting anything.
        read -r BYTES PAYLOAD_AVG < <(bpsql -At -F ' ' -c "SELECT coalesce(sum(b), 0), coalesce(avg(b), 0) FROM (
            SELECT octet_length(jsonb_build_object('seq', g, 'customer', 'c-' || (g % 977),
                'note', left(f.s, $((payload > 66 ? payload - 66 : 1))), 'total', g * 1.5)::text) AS b
            FROM generate_series(1::bigint, $n::bigint) g JOIN $SCHEMA.filler f ON f.i = g % 997) x")
    else
        read -r BYTES PAYLOAD_AVG < <(bpsql -At -F ' ' -c "SELECT coalesce(sum(b), 0), coalesce(avg(b), 0) FROM (
            $(for ((t = 1; t <= k; t++)); do
                [ "$t" = 1 ] || echo "UNION ALL"
                echo "SELECT octet_length(payload::text) AS b FROM $(table_name "$t")"
            done)) x")
    fi
    bpsql -c "SELECT pg_copy_logical_replication_slot('$SLOT', '$BASE_SLOT')" >/dev/null
    BL_TABLES=$k
    decode_opts
    BL_FIELDS=("n=$n" "txn=$TXN" "payload=$payload" "payload_avg=$PAYLOAD_AVG" "bytes=$BYTES"
        "tables=$k" "keys=$KEYS" "partitions=$PARTITIONS" "wal_bytes=$wal_bytes")
}

# Resets slot $1 to the pristine copy.
reset_slot() {
    wait_slot_idle
    bpsql -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$1'" \
        -c "SELECT pg_copy_logical_replication_slot('$BASE_SLOT', '$1')" >/dev/null
}

# relay_config FILE TABLES [METRICS_ADDR]: in the delivery mode $DELIVERY (at-least-once by
# default; exactly-once: a transactional id of its own for every configuration written, so
# that no run finds the position of an earlier one in the offsets topic).
DELIVERY=at-least-once
BENCH_ID="$(date +%s)-$$"
CFG_N=0
relay_config() {
    local file=$1 k=$2 listen=${3:-} t
    CFG_N=$((CFG_N + 1))
    {
        printf '[postgres]\nurl = "%s"\nslot = "%s"\npublication = "%s"\n' "$PG_URL" "$SLOT" "$PUB"
        if [ "$k" = message ]; then
            printf '[[message]]\nprefix = "outbox"\ntopic = "%s{aggregatetype}"\n' "$TOPIC_PREFIX"
        fi
        for ((t = 1; t <= ${k/message/0}; t++)); do
            printf '[[outbox]]\ntable = "%s"\ntopic = "%s{aggregatetype}"\n' "$(table_name "$t")" "$TOPIC_PREFIX"
        done
        printf '[kafka]\nbrokers = "%s"\n' "$KAFKA_BROKERS"
        if [ "$DELIVERY" = exactly-once ]; then
            printf 'delivery = "exactly-once"\ntransactional_id = "outbox-bench-%s-%s"\noffsets_topic = "%s"\n' \
                "$BENCH_ID" "$CFG_N" "$OFFSETS_TOPIC"
        fi
        [ -z "$listen" ] || printf '[metrics]\nlisten = "%s"\n' "$listen"
    } >"$file"
}

# record KEY=VALUE... JSON: append one result.
record() { $REPORT merge "$@" >>"$RESULTS"; }

RUN=0
# on_copy KIND WHAT LABEL FIELDS... -- COMMAND...: COMMAND (which must exit) under bench_drain
# on a fresh copy of the slot; records its result as kind=KIND.
on_copy() {
    local kind=$1 what=$2 label=$3 fields=() out
    shift 3
    while [ "$1" != -- ]; do fields+=("$1") && shift; done
    shift
    RUN=$((RUN + 1))
    reset_slot "$COPY_SLOT"
    say "$label: $what"
    out=$("$EX"/bench_drain --pg-url "$PG_URL" --slot "$COPY_SLOT" --clk-tck "$TCK" \
        --log "$WORK_DIR/$kind-$RUN.log" -- "$@") ||
        { cat "$WORK_DIR/$kind-$RUN.log" >&2; die "$what failed"; }
    record kind="$kind" "${fields[@]}" "${BL_FIELDS[@]}" "$out"
}

# measure_decode LABEL FIELDS...: pg_recvlogical on a copy of the slot until --endpos.
measure_decode() {
    on_copy decode "pg_recvlogical (decode limit)" "$@" -- \
        pg_recvlogical -d "$PG_URL" -S "$COPY_SLOT" --start --no-loop --endpos "$TARGET" \
        -o proto_version=1 -o publication_names="$PUB" "${DECODE_OPTS[@]}" -f /dev/null
}

# pgoutput options for the backlog's source: messages too, for the table-less one.
decode_opts() {
    DECODE_OPTS=()
    [ "$BL_TABLES" != message ] || DECODE_OPTS=(-o messages=true)
}

# measure_sql_decode LABEL FIELDS...: the same decoding inside a backend, no client and no
# network (pg_logical_slot_peek_binary_changes on a copy of the slot): what the server's
# decoder alone can do, for reference.
measure_sql_decode() {
    on_copy sqldecode "decoding in SQL (pg_logical_slot_peek_binary_changes)" "$@" -- \
        psql -X -q -At -v ON_ERROR_STOP=1 -d "$PG_URL" -c "SELECT count(*) FROM
            pg_logical_slot_peek_binary_changes('$COPY_SLOT', '$TARGET', NULL,
                'proto_version', '1', 'publication_names', '$PUB'$([ "$BL_TABLES" != message ] || echo ", 'messages', 'true'"))"
}

# measure_relay LABEL [--quota] [--perf FILE] FIELDS...: the relay on the backlog (--quota:
# started through QUOTA_PREFIX, inside the CPU limit).
measure_relay() {
    local label=$1 prefix=() perf=() out cfg loadavg
    shift
    while true; do
        case "${1:-}" in
        --quota) prefix=("${QUOTA_PREFIX[@]}") && shift ;;
        --perf) perf=(--perf-out "$2") && shift 2 ;;
        *) break ;;
        esac
    done
    RUN=$((RUN + 1))
    reset_slot "$SLOT"
    cfg="$WORK_DIR/relay-$RUN.toml"
    relay_config "$cfg" "$BL_TABLES"
    say "$label: outbox-relay${prefix:+ (${prefix[*]})}"
    loadavg=$(cut -d' ' -f1 /proc/loadavg)
    out=$("$EX"/bench_drain --pg-url "$PG_URL" --slot "$SLOT" --target-lsn "$TARGET" \
        --clk-tck "$TCK" --log "$WORK_DIR/relay-$RUN.log" "${WATCH[@]}" "${perf[@]}" -- \
        "${prefix[@]}" "$RELAY_BIN" run --config "$cfg") ||
        { tail -n 20 "$WORK_DIR/relay-$RUN.log" >&2; die "relay run failed"; }
    record kind=relay delivery="$DELIVERY" loadavg="$loadavg" "$@" "${BL_FIELDS[@]}" "$out"
}

# ---------------------------------------------------------------------------------------
# 1-3. Backlog drain: decode limit, relay, polling publisher.
if has_section drain || has_section quota || has_section compare || [ -n "$PERF_OUT" ]; then
    new_backlog "$N" "$PAYLOAD" 1
fi
if has_section drain; then
    # The poller's copy of the rows: same columns plus the ordering column a poller needs.
    bpsql -c "CREATE TABLE $SCHEMA.outbox_poll (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                  id uuid NOT NULL UNIQUE, aggregatetype text NOT NULL, aggregateid text NOT NULL,
                  type text NOT NULL, payload jsonb)" >/dev/null
    for ((rep = 1; rep <= REPEAT; rep++)); do
        measure_decode "drain $rep/$REPEAT" section=drain rep=$rep
        measure_sql_decode "drain $rep/$REPEAT" section=drain rep=$rep
        measure_relay "drain $rep/$REPEAT" section=drain rep=$rep
        say "drain $rep/$REPEAT: copying the rows for the poller"
        bpsql -c "TRUNCATE $SCHEMA.outbox_poll" \
            -c "INSERT INTO $SCHEMA.outbox_poll (id, aggregatetype, aggregateid, type, payload)
                SELECT id, aggregatetype, aggregateid, type, payload FROM $SCHEMA.outbox
                ORDER BY (payload->>'seq')::bigint" \
            -c "VACUUM (ANALYZE) $SCHEMA.outbox_poll" >/dev/null
        say "drain $rep/$REPEAT: polling publisher"
        RUN=$((RUN + 1))
            out=$("$EX"/bench_drain --pg-url "$PG_URL" --slot "$SLOT" --clk-tck "$TCK" \
            --log "$WORK_DIR/poller-$RUN.log" "${WATCH[@]}" -- \
            "$EX"/bench_poller --pg-url "$PG_URL" --brokers "$KAFKA_BROKERS" \
            --table "$SCHEMA.outbox_poll" --batch "$POLL_BATCH" --topic-prefix "$TOPIC_PREFIX" \
            --clk-tck "$TCK") || { cat "$WORK_DIR/poller-$RUN.log" >&2; die "poller failed"; }
        poll=$(grep '^{' "$WORK_DIR/poller-$RUN.log" | tail -n 1)
        [ "$(echo "$poll" | python3 -c 'import json,sys; print(json.load(sys.stdin)["events"])')" = "$N" ] ||
            die "the poller published $poll, expected $N events"
        # The harness's numbers (process CPU, RSS) and the poller's own (backend CPU).
        record kind=poller section=drain rep=$rep poll_batch="$POLL_BATCH" "${BL_FIELDS[@]}" \
            "$(echo "$poll" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ("backend_cpu_s", "batches", "select_s", "produce_s", "delete_s")}))')" \
            "$out"
        # librdkafka alone: the same records straight to the broker, no database (the floor).
        say "drain $rep/$REPEAT: librdkafka alone (bench_floor)"
        floor=$("$EX"/bench_floor --brokers "$KAFKA_BROKERS" --topics "$TOPICS" -n "$N" \
            --payload "$PAYLOAD" --keys "$KEYS") || die "bench_floor failed"
        record kind=floor section=drain rep=$rep "$floor"
    done
fi

# An A/B of two relay builds on the same backlog, in turns (ABBA...) so that a machine that
# gets busier or quieter during the run weighs on both alike.
if has_section compare; then
    [ -n "$COMPARE_BIN" ] || die "--sections compare needs --compare-bin PATH"
    [ -x "$COMPARE_BIN" ] || die "--compare-bin $COMPARE_BIN is not an executable"
    for ((rep = 1; rep <= REPEAT; rep++)); do
        order=("$RELAY_BIN" "$COMPARE_BIN")
        ((rep % 2)) || order=("$COMPARE_BIN" "$RELAY_BIN")
        for bin in "${order[@]}"; do
            RELAY_BIN="$bin" measure_relay "compare $rep/$REPEAT: $bin" section=compare rep=$rep bin="$bin"
        done
    done
fi

# ---------------------------------------------------------------------------------------
# 7. The relay under a CPU quota, on the same backlog.
CGROUP=
quota_prefix() {
    # quota_prefix PCT: a limit of PCT % of one core, by the cgroup v1 cpu controller, cgroup
    # v2 cpu.max, or systemd-run: false if none works; sets QUOTA_PREFIX (an array) to the
    # command prefix that starts a process inside the limit and QUOTA_HOW to what it is.
    local pct=$1 period=100000 quota=$(($1 * 1000)) d
    for d in /sys/fs/cgroup/cpu /sys/fs/cgroup/cpu,cpuacct; do
        if [ -w "$d/cgroup.procs" ] && mkdir "$d/outbox-bench-$$-$pct" 2>/dev/null; then
            CGROUP="$d/outbox-bench-$$-$pct"
            on_exit "rmdir '$CGROUP' 2>/dev/null"
            echo $period >"$CGROUP/cpu.cfs_period_us"
            echo $quota >"$CGROUP/cpu.cfs_quota_us"
            QUOTA_PREFIX=(sh -c "echo \$\$ >$CGROUP/cgroup.procs && exec \"\$@\"" sh)
            QUOTA_HOW="cgroup v1 cpu.cfs_quota_us=$quota/$period"
            return 0
        fi
    done
    if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null &&
        mkdir "/sys/fs/cgroup/outbox-bench-$$-$pct" 2>/dev/null; then
        CGROUP="/sys/fs/cgroup/outbox-bench-$$-$pct"
        on_exit "rmdir '$CGROUP' 2>/dev/null"
        echo "$quota $period" >"$CGROUP/cpu.max"
        QUOTA_PREFIX=(sh -c "echo \$\$ >$CGROUP/cgroup.procs && exec \"\$@\"" sh)
        QUOTA_HOW="cgroup v2 cpu.max=$quota/$period"
        return 0
    fi
    if command -v systemd-run >/dev/null && systemd-run --scope --quiet -p CPUQuota=1% true 2>/dev/null; then
        QUOTA_PREFIX=(systemd-run --scope --quiet -p "CPUQuota=${pct}%")
        QUOTA_HOW="systemd-run CPUQuota=${pct}%"
        return 0
    fi
    return 1
}
if has_section quota; then
    if quota_prefix "$QUOTA_PCT"; then
        measure_relay "quota ${QUOTA_PCT}%" --quota section=quota \
            quota_pct="$QUOTA_PCT" quota_how="$QUOTA_HOW"
    else
        say "quota: no writable cgroup and no systemd-run; skipped"
        record section=quota skipped="no writable cgroup (v1 cpu or v2 cpu.max) and no systemd-run" n="$N"
    fi
fi

if [ -n "$PERF_OUT" ]; then
    command -v perf >/dev/null || die "--perf: perf not found"
    measure_relay "perf" --perf "$PERF_OUT" section=perf
    perf report -i "$PERF_OUT" --no-children --sort dso,sym --stdio -g none --percent-limit 0.5 \
        2>/dev/null | grep -v '^#' | grep -v '^[[:space:]]*$' | head -n 40 >"$WORK_DIR/perf.txt" || true
fi

# ---------------------------------------------------------------------------------------
# 4. Latency under a steady load of single-event transactions.
RELAY_PID=
stop_relay() {
    [ -z "$RELAY_PID" ] || stop_pid "$RELAY_PID" 15
    RELAY_PID=
}
on_exit stop_relay
# start_relay TABLES: a relay in the background on the current slot, with /metrics.
start_relay() {
    local port i
    port=$(free_port)
    METRICS_URL="http://127.0.0.1:$port"
    relay_config "$WORK_DIR/relay-bg.toml" "$1" "127.0.0.1:$port"
    "$RELAY_BIN" run --config "$WORK_DIR/relay-bg.toml" 2>>"$WORK_DIR/relay-bg.log" &
    RELAY_PID=$!
    for ((i = 0; i < 300; i++)); do
        if $REPORT scrape "$METRICS_URL/readyz" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$RELAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$WORK_DIR/relay-bg.log" >&2
    die "the relay did not become ready"
}
# CPU ticks (user + system) of process $1, of the whole machine; seconds between two readings.
proc_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
ticks_s() { if [ -n "$1" ] && [ -n "$2" ]; then python3 -c "print(($2 - $1) / $TCK)"; else echo null; fi; }

# warm_up: 2 s at 100 transactions/s, not measured: the relay's producer learns each topic's
# metadata with its first records (a few hundred ms), which a long-running relay did long ago.
warm_up() {
    say "$1: warming up (2 s at 100 transactions/s, not measured)"
    "$EX"/bench_load --pg-url "$PG_URL" --brokers "$KAFKA_BROKERS" --table "$SCHEMA.outbox" \
        --topics "$TOPICS" --rate 100 --secs 2 "${@:2}" >/dev/null 2>"$WORK_DIR/warmup.log" ||
        { cat "$WORK_DIR/warmup.log" >&2; die "bench_load (warm-up) failed"; }
}
# load_run RATE [BENCH_LOAD_OPTIONS...]: single-event transactions at RATE for $LOAD_SECS
# (examples/bench_load.rs) against the relay start_relay started, until the relay acknowledged
# every committed event. Sets LOAD_FIELDS, record's arguments: the CPU the relay, its walsender,
# the broker and the whole machine used meanwhile, bench_load's JSON (commit-to-consumer) and
# the relay's commit-to-ack quantiles.
load_run() {
    local rate=$1 load committed i t0 t1 ws w0 w1 b0 b1 m0 m1 s0 s1 before loadavg
    shift
    $REPORT scrape "$METRICS_URL/metrics" >"$WORK_DIR/m-before"
    before=$($REPORT hist-count "$WORK_DIR/m-before")
    loadavg=$(cut -d' ' -f1 /proc/loadavg)
    t0=$(proc_ticks "$RELAY_PID")
    ws=$(bpsql -At -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$SLOT'")
    w0=$(proc_ticks "$ws" 2>/dev/null || echo)
    b0=$([ -z "$OWN_BROKER" ] || proc_ticks "$BROKER_PID")
    m0=$(machine_ticks) s0=$(date +%s.%N)
    load=$("$EX"/bench_load --pg-url "$PG_URL" --brokers "$KAFKA_BROKERS" --table "$SCHEMA.outbox" \
        --topics "$TOPICS" --rate "$rate" --secs "$LOAD_SECS" "$@" 2>"$WORK_DIR/load.log") ||
        { cat "$WORK_DIR/load.log" >&2; die "bench_load failed"; }
    committed=$(echo "$load" | python3 -c 'import json,sys; print(json.load(sys.stdin)["committed"])')
    for ((i = 0; i < 600; i++)); do
        $REPORT scrape "$METRICS_URL/metrics" >"$WORK_DIR/m-after"
        [ "$($REPORT hist-count "$WORK_DIR/m-after")" -ge $((before + committed)) ] && break
        sleep 0.1
    done
    t1=$(proc_ticks "$RELAY_PID")
    w1=$(proc_ticks "$ws" 2>/dev/null || echo)
    b1=$([ -z "$OWN_BROKER" ] || proc_ticks "$BROKER_PID")
    m1=$(machine_ticks) s1=$(date +%s.%N)
    LOAD_FIELDS=(secs="$LOAD_SECS" loadavg="$loadavg" relay_cpu_s="$(ticks_s "$t0" "$t1")"
        walsender_cpu_s="$(ticks_s "$w0" "$w1")" broker_cpu_s="$(ticks_s "$b0" "$b1")"
        machine_cpu_s="$(ticks_s "$m0" "$m1")" wall_s="$(python3 -c "print($s1 - $s0)")"
        "$load" "$($REPORT quantiles "$WORK_DIR/m-before" "$WORK_DIR/m-after")")
}

if has_section latency; then
    new_broker
    new_backlog 0 "$PAYLOAD" 1
    start_relay 1
    warm_up latency
    for rate in ${RATES//,/ }; do
        # Twice: the relay alone (the broker serves nothing else, as for the baseline below),
        # then with a consumer reading the topics (commit-to-consumer).
        for pass in alone consumer; do
            extra=()
            [ "$pass" = consumer ] || extra=(--no-consumer)
            say "latency: $rate transactions/s for $LOAD_SECS s ($pass)"
            load_run "$rate" "${extra[@]}"
            if [ "$pass" = alone ]; then
                # The baseline: the same records at the same rate produced straight to the broker
                # with the relay's producer settings (no database), right after.
                say "latency: $rate records/s produced straight to the broker (baseline)"
                direct=$("$EX"/bench_load --direct --brokers "$KAFKA_BROKERS" --topics "$TOPICS" \
                    --rate "$rate" --secs "$LOAD_SECS" 2>"$WORK_DIR/direct.log") ||
                    { cat "$WORK_DIR/direct.log" >&2; die "bench_load --direct failed"; }
            else
                direct='{}'
            fi
            record section=latency pass="$pass" "${LOAD_FIELDS[@]}" "$direct"
        done
    done
    stop_relay
fi

# ---------------------------------------------------------------------------------------
# 8. At-least-once against exactly-once: the same backlog drained in turns (ABBA...), then
# commit-to-consumer under a steady load, read_committed in exactly-once mode.
if has_section eos; then
    new_broker
    new_backlog "$N" "$PAYLOAD" 1
    for ((rep = 1; rep <= REPEAT; rep++)); do
        order=(at-least-once exactly-once)
        ((rep % 2)) || order=(exactly-once at-least-once)
        for mode in "${order[@]}"; do
            DELIVERY=$mode measure_relay "eos $rep/$REPEAT: $mode" section=eos rep="$rep"
        done
    done
    for ((rep = 1; rep <= REPEAT; rep++)); do
        order=(at-least-once exactly-once)
        ((rep % 2)) || order=(exactly-once at-least-once)
        for mode in "${order[@]}"; do
            extra=()
            [ "$mode" = at-least-once ] || extra=(--read-committed)
            new_backlog 0 "$PAYLOAD" 1
            DELIVERY=$mode start_relay 1
            warm_up "eos latency ($mode)" "${extra[@]}"
            say "eos latency $rep/$REPEAT: $EOS_RATE transactions/s for $LOAD_SECS s ($mode${extra:+, read_committed consumer})"
            load_run "$EOS_RATE" "${extra[@]}"
            record section=eos kind=latency delivery="$mode" rep="$rep" "${LOAD_FIELDS[@]}"
            stop_relay
        done
    done
fi

# ---------------------------------------------------------------------------------------
# 9. Debezium beside the relay (issue #13): the same backlog drained in turns, steady loads,
# start-up; Debezium on a slot of its own copied from the same pristine slot, through the
# benchmark's publication, its topics behind DBZ_PREFIX.
DBZ_N=$([ -n "$N_SET" ] && echo "$N" || echo 500000)
DBZ_REPEAT=$([ -n "$REPEAT_SET" ] && echo "$REPEAT" || echo 3)
BG_PID=
# stop_bg: stops the relay or Connect worker started in the background, if any.
stop_bg() {
    [ -z "$BG_PID" ] || stop_pid "$BG_PID" 30
    BG_PID=
}
on_exit stop_bg
# fresh_slot NAME: slot NAME dropped and created anew at the current WAL position, so that a
# steady run replays nothing of the runs before it.
fresh_slot() {
    wait_slot_idle
    bpsql -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$1'" \
        -c "SELECT pg_create_logical_replication_slot('$1', 'pgoutput')" >/dev/null
}
# dbz_pg_args: scripts/debezium.sh's connection options for PG_URL (sets DBZ_PG_ARGS).
dbz_pg_args() {
    local host port user db password
    read -r host port user db password < <(python3 -c '
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(p.hostname or "127.0.0.1", p.port or 5432, u.unquote(p.username or "postgres"),
      p.path.lstrip("/") or "postgres", u.unquote(p.password or "-"))' "$PG_URL")
    [ "$password" != - ] || password=
    DBZ_PG_ARGS=(--pg-host "$host" --pg-port "$port" --pg-user "$user" --pg-db "$db" --pg-password "$password")
}
# system_cmd SYSTEM HEAP: sets SYS_CMD (the command line), SYS_SLOT and SYS_TOPICS of SYSTEM:
# the relay on SLOT, or a Connect worker with Debezium (heap HEAP) on DBZ_SLOT, with a home of
# its own (no offsets from an earlier run) and the benchmark's publication as it is
# (publication.autocreate.mode=disabled: a publication created later than the slot's start
# could not be decoded from it).
system_cmd() {
    RUN=$((RUN + 1))
    if [ "$1" = relay ]; then
        relay_config "$WORK_DIR/relay-$RUN.toml" 1
        SYS_CMD=("$RELAY_BIN" run --config "$WORK_DIR/relay-$RUN.toml")
        SYS_SLOT=$SLOT SYS_TOPICS=$TOPICS
    else
        SYS_CMD=(scripts/debezium.sh run --dir "$WORK_DIR/dbz-$RUN" --bootstrap "$KAFKA_BROKERS"
            "${DBZ_PG_ARGS[@]}" --mode "$DBZ_MODE" --heap "$2" --slot "$DBZ_SLOT"
            --publication "$PUB" --table "$SCHEMA.outbox" --prefix "$DBZ_PREFIX"
            --partitions "$PARTITIONS" --connector-set publication.autocreate.mode=disabled)
        SYS_SLOT=$DBZ_SLOT SYS_TOPICS=$DBZ_TOPICS
    fi
}
# check_jvm SYSTEM OUT: dies unless bench_drain measured the process it should have (for
# Debezium the JVM itself, not a shell around it).
check_jvm() {
    local comm
    comm=$(echo "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("comm"))')
    if [ "$1" = debezium ] && [ "$comm" != java ]; then
        die "measured process '$comm', not the Connect JVM"
    fi
}
# dbz_drain SYSTEM LABEL [--quota] [--heap SIZE] FIELDS...: SYSTEM (relay or debezium) drains
# the backlog from its own copy of the pristine slot until all DBZ_N records are in its topics
# and its slot is confirmed at or past LAST_COMMIT (for at most --slot-grace-secs more).
dbz_drain() {
    local sys=$1 label=$2 prefix=() heap=$DBZ_HEAP out loadavg log
    shift 2
    while true; do
        case "${1:-}" in
        --quota) prefix=("${QUOTA_PREFIX[@]}") && shift ;;
        --heap) heap=$2 && shift 2 ;;
        *) break ;;
        esac
    done
    system_cmd "$sys" "$heap"
    reset_slot "$SYS_SLOT"
    log="$WORK_DIR/$sys-$RUN.log"
    say "$label: $sys${prefix:+ (${prefix[*]})}"
    loadavg=$(cut -d' ' -f1 /proc/loadavg)
    out=$("$EX"/bench_drain --pg-url "$PG_URL" --slot "$SYS_SLOT" --target-lsn "$LAST_COMMIT" \
        --records "$DBZ_N" --brokers "$KAFKA_BROKERS" --topics "$SYS_TOPICS" \
        --slot-grace-secs "$DBZ_GRACE" --clk-tck "$TCK" --log "$log" "${WATCH[@]}" -- \
        "${prefix[@]}" "${SYS_CMD[@]}") || { tail -n 30 "$log" >&2; die "$sys drain failed"; }
    check_jvm "$sys" "$out"
    record section=debezium kind=drain system="$sys" heap="$([ "$sys" = relay ] || echo "$heap")" \
        loadavg="$loadavg" mode="$DBZ_MODE" grace="$DBZ_GRACE" last_commit="$LAST_COMMIT" "$@" \
        "${BL_FIELDS[@]}" "$out"
}
# dbz_first SYSTEM REP: one event waiting in a fresh slot, SYSTEM started; the time from its
# start until the record is in its topics.
dbz_first() {
    local sys=$1 out log
    system_cmd "$sys" "$DBZ_HEAP"
    fresh_slot "$SYS_SLOT"
    rows_sql "$SCHEMA.outbox" 1 1 "$PAYLOAD" 1 1 | bpsql >/dev/null
    log="$WORK_DIR/$sys-first-$RUN.log"
    say "start-up $2/$DBZ_REPEAT: $sys, until its first record is in Kafka"
    out=$("$EX"/bench_drain --pg-url "$PG_URL" --slot "$SYS_SLOT" --records 1 \
        --brokers "$KAFKA_BROKERS" --topics "$SYS_TOPICS" --clk-tck "$TCK" --log "$log" -- \
        "${SYS_CMD[@]}") || { tail -n 30 "$log" >&2; die "$sys start-up run failed"; }
    check_jvm "$sys" "$out"
    record section=debezium kind=first system="$sys" rep="$2" "$out"
}
# dbz_steady SYSTEM RATE REP: SYSTEM started in the background on a fresh slot and warmed up,
# then single-event transactions at RATE for LOAD_SECS with a consumer on its topics
# (bench_load: commit-to-consumer); the CPU SYSTEM, its walsender, the broker and the machine
# used from the load's start until the consumer had every record, and SYSTEM's RSS.
dbz_steady() {
    local sys=$1 rate=$2 log warm ws t0 t1 w0 w1 b0 b1 m0 m1 s0 s1 load loadavg rss hwm
    system_cmd "$sys" "$DBZ_HEAP"
    fresh_slot "$SYS_SLOT"
    log="$WORK_DIR/$sys-steady-$RUN.log"
    say "steady $3/$DBZ_REPEAT: $sys, warming up (2 s at 100 transactions/s, not measured)"
    "${SYS_CMD[@]}" >"$log" 2>&1 &
    BG_PID=$!
    # Until the consumer has every warm-up record: Connect takes a while to start streaming.
    warm=$("$EX"/bench_load --pg-url "$PG_URL" --brokers "$KAFKA_BROKERS" --table "$SCHEMA.outbox" \
        --topics "$SYS_TOPICS" --rate 100 --secs 2 --drain-secs 300 2>"$WORK_DIR/warmup.log") ||
        { cat "$WORK_DIR/warmup.log" >&2; die "bench_load (warm-up) failed"; }
    echo "$warm" | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d["consumed"] != d["committed"])' ||
        { tail -n 30 "$log" >&2; die "$sys did not publish the warm-up records: $warm"; }
    [ "$sys" = relay ] || [ "$(cat "/proc/$BG_PID/comm")" = java ] || die "pid $BG_PID is not the Connect JVM"
    say "steady $3/$DBZ_REPEAT: $sys, $rate transactions/s for $LOAD_SECS s"
    loadavg=$(cut -d' ' -f1 /proc/loadavg)
    ws=$(bpsql -At -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$SYS_SLOT'")
    t0=$(proc_ticks "$BG_PID") w0=$(proc_ticks "$ws" 2>/dev/null || echo)
    b0=$([ -z "$OWN_BROKER" ] || proc_ticks "$BROKER_PID")
    m0=$(machine_ticks) s0=$(date +%s.%N)
    load=$("$EX"/bench_load --pg-url "$PG_URL" --brokers "$KAFKA_BROKERS" --table "$SCHEMA.outbox" \
        --topics "$SYS_TOPICS" --rate "$rate" --secs "$LOAD_SECS" --drain-secs 120 2>"$WORK_DIR/load.log") ||
        { cat "$WORK_DIR/load.log" >&2; die "bench_load failed"; }
    t1=$(proc_ticks "$BG_PID") w1=$(proc_ticks "$ws" 2>/dev/null || echo)
    b1=$([ -z "$OWN_BROKER" ] || proc_ticks "$BROKER_PID")
    m1=$(machine_ticks) s1=$(date +%s.%N)
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$BG_PID/status")
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$BG_PID/status")
    stop_bg
    record section=debezium kind=steady system="$sys" rep="$3" secs="$LOAD_SECS" loadavg="$loadavg" \
        heap="$([ "$sys" = relay ] || echo "$DBZ_HEAP")" \
        cpu_s="$(ticks_s "$t0" "$t1")" walsender_cpu_s="$(ticks_s "$w0" "$w1")" \
        broker_cpu_s="$(ticks_s "$b0" "$b1")" machine_cpu_s="$(ticks_s "$m0" "$m1")" \
        wall_s="$(python3 -c "print($s1 - $s0)")" rss_kb="$rss" hwm_kb="$hwm" "$load"
}

if has_section debezium; then
    dbz_pg_args
    new_broker
    new_backlog "$DBZ_N" "$PAYLOAD" 1
    quota=()
    if quota_prefix 100; then
        quota=(--quota)
    else
        say "debezium: no writable cgroup and no systemd-run; no 1-CPU runs"
    fi
    # In turns, the order reversed every other round, so that a machine getting busier or
    # quieter weighs on both alike.
    for ((rep = 1; rep <= DBZ_REPEAT; rep++)); do
        runs=(relay debezium debezium-small relay-quota debezium-quota)
        ((rep % 2)) || runs=(debezium-quota relay-quota debezium-small debezium relay)
        for r in "${runs[@]}"; do
            case "$r" in
            relay | debezium) dbz_drain "$r" "drain $rep/$DBZ_REPEAT" variant=default rep="$rep" ;;
            debezium-small)
                dbz_drain debezium "drain $rep/$DBZ_REPEAT, -Xmx$DBZ_SMALL_HEAP" --heap "$DBZ_SMALL_HEAP" \
                    variant=small-heap rep="$rep"
                ;;
            *-quota)
                [ "${#quota[@]}" -gt 0 ] || continue
                dbz_drain "${r%-quota}" "drain $rep/$DBZ_REPEAT, 1 CPU" "${quota[@]}" variant=quota \
                    quota_how="$QUOTA_HOW" rep="$rep"
                ;;
            esac
        done
    done
    for ((rep = 1; rep <= DBZ_REPEAT; rep++)); do
        for rate in ${RATES//,/ }; do
            runs=(relay debezium)
            ((rep % 2)) || runs=(debezium relay)
            for r in "${runs[@]}"; do dbz_steady "$r" "$rate" "$rep"; done
        done
    done
    for ((rep = 1; rep <= DBZ_REPEAT; rep++)); do
        runs=(relay debezium)
        ((rep % 2)) || runs=(debezium relay)
        for r in "${runs[@]}"; do dbz_first "$r" "$rep"; done
    done
fi

# ---------------------------------------------------------------------------------------
# 5. Memory: one big transaction, broker keeping up / frozen.
if has_section memory; then
    rows_sql "$SCHEMA.outbox" 1 "$MEM_EVENTS" "$PAYLOAD" 1 1 >"$WORK_DIR/big.sql"
    printf -v trigger 'psql -X -q -v ON_ERROR_STOP=1 -d %q -f %q' "$PG_URL" "$WORK_DIR/big.sql"
    for scenario in keeping-up frozen; do
        new_broker
        new_backlog 0 "$PAYLOAD" 1
        relay_config "$WORK_DIR/relay-mem.toml" 1
        freeze=()
        label="broker keeping up"
        if [ "$scenario" = frozen ]; then
            label="broker frozen ${FREEZE_SECS} s after the commit"
            if [ -z "$OWN_BROKER" ]; then
                record section=memory scenario="$label" n="$MEM_EVENTS" skipped="not our broker (--brokers)"
                continue
            fi
            freeze=(--freeze-pid "$BROKER_PID" --freeze-secs "$FREEZE_SECS")
        fi
        say "memory: one transaction of $MEM_EVENTS events, $label"
        out=$("$EX"/bench_drain --pg-url "$PG_URL" --slot "$SLOT" --trigger "$trigger" "${freeze[@]}" \
            --clk-tck "$TCK" --log "$WORK_DIR/relay-mem-$scenario.log" -- \
            "$RELAY_BIN" run --config "$WORK_DIR/relay-mem.toml") ||
            { tail -n 20 "$WORK_DIR/relay-mem-$scenario.log" >&2; die "memory run failed"; }
        record section=memory scenario="$label" n="$MEM_EVENTS" "$out"
    done
fi

# ---------------------------------------------------------------------------------------
# 6. Scaling: payload size, outbox tables, backlog size.
if has_section scaling; then
    for p in ${SCALE_PAYLOADS//,/ }; do
        new_broker
        new_backlog "$SCALE_N" "$p" 1
        measure_decode "payload $p B" section=scaling dim=payload variant="$p"
        measure_relay "payload $p B" section=scaling dim=payload variant="$p"
    done
    for k in ${SCALE_TABLES//,/ }; do
        if [ "$k" -lt 1 ] || [ "$k" -gt 16 ]; then die "--scale-tables: 1 to 16"; fi
        new_broker
        new_backlog "$SCALE_N" "$PAYLOAD" "$k"
        measure_decode "$k tables" section=scaling dim=tables variant="$k"
        measure_relay "$k tables" section=scaling dim=tables variant="$k"
    done
    for src in ${SCALE_SOURCES//,/ }; do
        new_broker
        new_backlog "$SCALE_N" "$PAYLOAD" "${src/table/1}"
        measure_decode "source $src" section=scaling dim=source variant="$src"
        measure_relay "source $src" section=scaling dim=source variant="$src"
    done
    for b in ${SCALE_BACKLOGS//,/ }; do
        new_broker
        new_backlog "$b" "$PAYLOAD" 1
        measure_decode "backlog $b" section=scaling dim=backlog variant="$b"
        measure_relay "backlog $b" section=scaling dim=backlog variant="$b"
    done
fi

# ---------------------------------------------------------------------------------------
[ -z "$RESULTS_ARG" ] || cp "$RESULTS" "$RESULTS_ARG"
echo "## outbox-relay benchmark, $(date -u +%Y-%m-%d)"
echo
echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))," \
    "$(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo) RAM;" \
    "PostgreSQL: $(bpsql -At -c 'SHOW server_version');" \
    "broker: $([ -n "$OWN_BROKER" ] && echo "Apache Kafka $(kafka_version), one node (KRaft), JVM $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS" || echo "$KAFKA_BROKERS")."
echo
echo "Load average at the end (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg)."
echo
$REPORT render "$RESULTS"
if [ -n "$PERF_OUT" ] && [ -s "$WORK_DIR/perf.txt" ]; then
    echo "### perf: one extra relay drain (perf record -F 999 -g), top symbols"
    echo
    echo '```'
    cat "$WORK_DIR/perf.txt"
    echo '```'
fi
