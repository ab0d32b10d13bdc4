#!/usr/bin/env bash
# Debezium beside the relay (issue #13): the one place that knows how Kafka Connect, Debezium's
# PostgreSQL connector and its Outbox Event Router are configured and started, set up as a user
# would. The jars come from Maven Central (tests/debezium/pom.xml), fetched once per version
# into a cache directory (scripts/lib.sh: ensure_debezium; $OUTBOX_DEBEZIUM_LIBS names it, and it
# is fetched here if unset). Connect's classpath is its own, never the broker's.
#
# scripts/debezium.sh run --dir DIR --bootstrap HOST:PORT --pg-port P [options]
#     Writes DIR/worker.properties and DIR/connector.properties, then execs a standalone Connect
#     worker (ConnectStandalone) in the foreground: the caller's pid is the JVM's (SIGTERM stops
#     the connector and commits its offsets). Offsets are kept in DIR/offsets.dat, so a restart
#     with the same DIR resumes. Logs go to stdout; Debezium's INFO lines say when it streams.
#     The connector reads the outbox table through its OWN slot and publication (created if
#     missing, publication.autocreate.mode=filtered: that table only) with plugin.name=pgoutput,
#     streams only (snapshot.mode=no_data, like the relay without initial_snapshot), and routes
#     each row with the Outbox Event Router to PREFIX + outbox.event.<aggregatetype>: the relay's
#     default topic behind a prefix, so both write to one broker.
#       --dir DIR               the worker's home: properties, offsets
#       --bootstrap HOST:PORT   the Kafka broker(s)
#       --mode M                what the records look like (default: defaults):
#                                 defaults  Debezium's documented defaults with the JSON
#                                           converter for keys and values (schemas on, as
#                                           Kafka's JsonConverter has them by default)
#                                 raw-json  the payload as JSON rather than an escaped string:
#                                           table.expand.json.payload=true, JsonConverter with
#                                           schemas.enable=false for keys and values
#                                 strings   StringConverter for keys and values (the key and
#                                           the jsonb text as UTF-8 bytes), the `type` column
#                                           as a header (table.fields.additional.placement),
#                                           no __debezium.context.* headers
#                                           (extended.headers.enabled=false): the relay's
#                                           records, byte for byte
#       --pg-host H             PostgreSQL host (default 127.0.0.1)
#       --pg-port P             PostgreSQL port
#       --pg-user U             a role with REPLICATION (default postgres)
#       --pg-password PW        its password (default none: trust or peer authentication)
#       --pg-db DB              the database holding the outbox (default postgres)
#       --slot NAME             Debezium's replication slot (default debezium)
#       --publication NAME      Debezium's publication (default debezium)
#       --table SCHEMA.TABLE    the outbox table (default public.outbox), its columns the
#                               relay's defaults (migrations/001_outbox.sql)
#       --prefix P              topic prefix (default "debezium.")
#       --partitions N          partitions of the topics Connect creates (default 1; topics
#                               that exist are used as they are)
#       --heap SIZE             the JVM's -Xmx (default 2G, what Kafka's connect-standalone.sh
#                               gives; e.g. 256m for a sidecar's budget)
#       --rest-port PORT        Connect's REST listener on 127.0.0.1 (default: a free port)
#       --set KEY=VALUE         any worker setting, appended last so it wins (repeatable)
#       --connector-set K=V     any connector or transform setting, likewise (repeatable)
#     JVM: DEBEZIUM_JVM_OPTS (default: the G1 options Kafka's scripts start Connect with).
#
# scripts/debezium.sh libs      fetch the jars if needed, print their directory
set -euo pipefail
_DEBEZIUM_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$_DEBEZIUM_SH_DIR/lib.sh"
DEBEZIUM_LOG4J_CONF="$(cd "$_DEBEZIUM_SH_DIR/.." && pwd)/tests/debezium/log4j2.properties"
# What Kafka's own start scripts give a Connect worker, so the JVM is the one users run.
DEBEZIUM_JVM_OPTS_DEFAULT="-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true -XX:+ExitOnOutOfMemoryError"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

_libs() {
    if [ -z "${OUTBOX_DEBEZIUM_LIBS:-}" ] || ! [ -f "$OUTBOX_DEBEZIUM_LIBS/.fetched" ]; then
        ensure_debezium
    fi
}

# _converters MODE: the worker's converter lines for MODE.
_converters() {
    local json=org.apache.kafka.connect.json.JsonConverter
    local string=org.apache.kafka.connect.storage.StringConverter
    case "$1" in
    defaults) printf 'key.converter=%s\nvalue.converter=%s\n' "$json" "$json" ;;
    raw-json)
        printf 'key.converter=%s\nkey.converter.schemas.enable=false\n' "$json"
        printf 'value.converter=%s\nvalue.converter.schemas.enable=false\n' "$json"
        ;;
    strings) printf 'key.converter=%s\nvalue.converter=%s\n' "$string" "$string" ;;
    esac
}

# _router_extras MODE: the Outbox Event Router's settings beyond the column mapping for MODE.
_router_extras() {
    case "$1" in
    defaults) ;;
    # The docs' recipe for a JSON payload: expand it (its schema deduced from the document) and
    # write it with the JSON converter; without schemas the value is the bare document.
    raw-json) echo 'transforms.outbox.table.expand.json.payload=true' ;;
    # The relay sends the event type as a `type` header; Debezium sends it only when asked.
    strings) echo 'transforms.outbox.table.fields.additional.placement=type:header:type' ;;
    esac
}

# _connector_extras MODE: the connector's settings beyond the common ones for MODE.
_connector_extras() {
    case "$1" in
    # Debezium 3 adds __debezium.context.{connectorLogicalName,taskId,connectorName,runId}
    # headers to every record unless told not to; the relay sends none of them.
    strings) echo 'extended.headers.enabled=false' ;;
    esac
}

cmd_run() {
    local dir='' bootstrap='' mode=defaults pg_host=127.0.0.1 pg_port='' pg_user=postgres
    local pg_password='' pg_db=postgres slot=debezium publication=debezium table=public.outbox
    local prefix=debezium. partitions=1 heap=2G rest_port=''
    local sets=() csets=()
    while [ $# -gt 0 ]; do
        [ $# -ge 2 ] || die "run: $1 needs a value (see scripts/debezium.sh --help)"
        case "$1" in
        --dir) dir=$2 ;;
        --bootstrap) bootstrap=$2 ;;
        --mode) mode=$2 ;;
        --pg-host) pg_host=$2 ;;
        --pg-port) pg_port=$2 ;;
        --pg-user) pg_user=$2 ;;
        --pg-password) pg_password=$2 ;;
        --pg-db) pg_db=$2 ;;
        --slot) slot=$2 ;;
        --publication) publication=$2 ;;
        --table) table=$2 ;;
        --prefix) prefix=$2 ;;
        --partitions) partitions=$2 ;;
        --heap) heap=$2 ;;
        --rest-port) rest_port=$2 ;;
        --set) sets+=("$2") ;;
        --connector-set) csets+=("$2") ;;
        *) die "run: unknown option $1 (see scripts/debezium.sh --help)" ;;
        esac
        shift 2
    done
    if [ -z "$dir" ] || [ -z "$bootstrap" ] || [ -z "$pg_port" ]; then
        die "run needs --dir, --bootstrap and --pg-port"
    fi
    case "$mode" in
    defaults | raw-json | strings) ;;
    *) die "run: --mode is defaults, raw-json or strings, not $mode" ;;
    esac
    [[ "$table" == *.* ]] || table="public.$table"
    [ -n "$rest_port" ] || rest_port="$(free_port)"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"

    {
        echo "# Written by scripts/debezium.sh run --mode $mode; rewritten at every start."
        echo "bootstrap.servers=$bootstrap"
        _converters "$mode"
        cat <<EOF
# Standalone mode keeps source offsets (for Debezium: the LSN reached) in a file; every flush
# also confirms that LSN to the slot. 10 s as in the sample file Kafka ships.
offset.storage.file.filename=$dir/offsets.dat
offset.flush.interval.ms=10000
listeners=http://127.0.0.1:$rest_port
# No plugin.path: the connector's jars are on the worker's classpath (one directory,
# scripts/lib.sh); with one connector nothing needs isolating.
EOF
        if [ "${#sets[@]}" -gt 0 ]; then
            printf '\n# --set\n'
            printf '%s\n' "${sets[@]}"
        fi
    } >"$dir/worker.properties"

    {
        echo "# Written by scripts/debezium.sh run --mode $mode; rewritten at every start."
        cat <<EOF
name=outbox-debezium
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname=$pg_host
database.port=$pg_port
database.user=$pg_user
database.password=$pg_password
database.dbname=$pg_db
# Names the connector's own topics (heartbeats, none here); the outbox rows are routed below.
topic.prefix=debezium
plugin.name=pgoutput
slot.name=$slot
publication.name=$publication
publication.autocreate.mode=filtered
table.include.list=$table
# Stream from the slot's creation on, as the relay does without initial_snapshot.
snapshot.mode=no_data
# The brokers the tests run do not create topics on their own.
topic.creation.default.replication.factor=-1
topic.creation.default.partitions=$partitions
EOF
        _connector_extras "$mode"
        cat <<EOF

transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
# The relay's default columns (migrations/001_outbox.sql), which are also Debezium's defaults:
# spelled out so that a changed default on either side shows here.
transforms.outbox.table.field.event.id=id
transforms.outbox.table.field.event.key=aggregateid
transforms.outbox.table.field.event.payload=payload
transforms.outbox.route.by.field=aggregatetype
transforms.outbox.route.topic.replacement=${prefix}outbox.event.\${routedByValue}
EOF
        _router_extras "$mode"
        if [ "${#csets[@]}" -gt 0 ]; then
            printf '\n# --connector-set\n'
            printf '%s\n' "${csets[@]}"
        fi
    } >"$dir/connector.properties"

    _libs
    # shellcheck disable=SC2086 # the options are a word list
    exec java -Xmx"$heap" ${DEBEZIUM_JVM_OPTS:-$DEBEZIUM_JVM_OPTS_DEFAULT} \
        -Dlog4j2.configurationFile="$DEBEZIUM_LOG4J_CONF" -cp "$OUTBOX_DEBEZIUM_LIBS/*" \
        org.apache.kafka.connect.cli.ConnectStandalone "$dir/worker.properties" "$dir/connector.properties"
}

if [ $# -lt 1 ]; then
    usage >&2
    exit 2
fi
sub=$1
shift
case "$sub" in
run) cmd_run "$@" ;;
libs)
    _libs
    echo "$OUTBOX_DEBEZIUM_LIBS"
    ;;
-h | --help | help) usage ;;
*) die "unknown command $sub (see scripts/debezium.sh --help)" ;;
esac
