#!/usr/bin/env bash
# Apache Kafka for the tests and the demo: the one place that knows how a broker is configured,
# formatted and started. The jars come from Maven Central (tests/kafka/pom.xml), fetched once per
# version into a cache directory (scripts/lib.sh: ensure_kafka; $OUTBOX_KAFKA_LIBS names it, and
# it is fetched here if unset). Everything listens on 127.0.0.1.
#
# scripts/kafka.sh run --dir DIR --node-id N --port P [options]
#     Writes DIR/server.properties, formats DIR/data unless it already is (so a restart with the
#     same DIR keeps topics, offsets and SCRAM users), then execs the broker in the foreground:
#     the caller's pid is the JVM's (SIGTERM = controlled shutdown, SIGKILL/SIGSTOP hit the JVM).
#     Logs go to stdout: WARN and up, plus lifecycle lines; "Kafka Server started" means it serves
#     requests (set KAFKA_LOG_LEVEL=INFO for more). KRaft combined mode (broker + controller).
#       --dir DIR                 the node's home: server.properties, data/, ssl/
#       --node-id N               node.id (1, 2, 3, ...)
#       --port P                  PLAINTEXT listener for clients, also the inter-broker one
#       --controller-port C       the KRaft controller listener (plaintext). Single node: a free
#                                 port if not given. With --voters: taken from this node's entry.
#       --voters V                three-node (or n-node) mode: static quorum, e.g.
#                                 "1@127.0.0.1:C1,2@127.0.0.1:C2,3@127.0.0.1:C3", the same on
#                                 every node, as is --cluster-id (required with --voters).
#                                 With 3+ voters: default.replication.factor=3,
#                                 min.insync.replicas=2, internal topics RF 3 (min ISR 2).
#                                 Without: one node, everything RF 1, min ISR 1.
#       --cluster-id ID           22-character base64 Kafka UUID; random if not given (single node)
#       --ssl-port S              an SSL listener (server auth only) ...
#       --sasl-port A             ... and a SASL_SSL listener, SCRAM-SHA-512; both need:
#       --cert PEM --key PEM      the server certificate (chain) and its unencrypted private key
#       --ca PEM                  the CA certificate(s) (the truststore; clients are not asked
#                                 for certificates)
#       --scram USER:PASSWORD     a SCRAM-SHA-512 user, added when formatting (repeatable; the
#                                 password must not contain , ] or ")
#       --advertised-host H       the host name advertised to clients (default 127.0.0.1;
#                                 listeners always bind 127.0.0.1)
#       --set KEY=VALUE           any broker setting, appended last so it wins (repeatable)
#     JVM: KAFKA_HEAP_OPTS (default -Xmx512m -Xms64m), KAFKA_JVM_OPTS (default: serial GC, C1
#     only; see KAFKA_JVM_OPTS_DEFAULT below), plus the class-data sharing archive made when the
#     jars were fetched (KAFKA_CDS=0: without it).
#
# scripts/kafka.sh produce-java --bootstrap B --topic T [--command-config FILE]
#     Produces stdin's `key:value` lines with Kafka's own Java producer (ConsoleProducer,
#     parse.key=true, the default partitioner, acks=all), to compare partitions with the relay's.
#     A record it could not send is logged on stderr ("Error when sending"), yet the exit code is 0
#     (ConsoleProducer's way): read the topic back. Request timeout 30 s (the tool's default,
#     1.5 s, times out while a killed follower is still in the ISR).
# scripts/kafka.sh consume-java --bootstrap B --topic T [--max-messages N] [--timeout-ms MS]
#                              [--read-committed] [--command-config FILE]
#     Prints `partition<TAB>offset<TAB>key<TAB>value` lines from the beginning of T (ConsoleConsumer).
# scripts/kafka.sh create-topic --bootstrap B --topic T [--partitions N] [--replication-factor R]
#                               [--config K=V]... [--command-config FILE]
# scripts/kafka.sh topics --bootstrap B ARGS...   TopicCommand with ARGS (--list, --describe ...)
# scripts/kafka.sh make-certs --dir D [--host NAME]... [--no-loopback]
#     A throwaway CA (D/ca.pem, D/ca.key) and a server certificate signed by it (D/server.pem,
#     D/server.key) for 127.0.0.1, localhost and each --host (openssl). --no-loopback leaves out
#     127.0.0.1 and localhost (--no-loopback --host wrong.invalid: a host-name mismatch).
# scripts/kafka.sh java CLASS ARGS...             any class on the Kafka classpath
# scripts/kafka.sh libs                           fetch the jars if needed, print their directory
set -euo pipefail
_KAFKA_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$_KAFKA_SH_DIR/lib.sh"
LOG4J_CONF="$(cd "$_KAFKA_SH_DIR/.." && pwd)/tests/kafka/log4j2.properties"
# The serial collector and C1 only: a broker is ready in about half the time and uses ~30 MB
# less than with G1 and C2, and tests never run long enough for C2 to pay off. For throughput
# benchmarks set KAFKA_JVM_OPTS (e.g. "-XX:+UseSerialGC" or "-XX:+UseG1GC").
KAFKA_JVM_OPTS_DEFAULT="-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

_libs() {
    if [ -z "${OUTBOX_KAFKA_LIBS:-}" ] || ! [ -f "$OUTBOX_KAFKA_LIBS/.fetched" ]; then
        ensure_kafka
    fi
}

# Tools (not the broker): a small heap, C1 only, fast start, class-data sharing as for the broker.
_java_tool() {
    _libs
    local cds=() jsa
    jsa="$(dirname "$OUTBOX_KAFKA_LIBS")/tools.jsa"
    if [ -n "${KAFKA_CDS_DUMP:-}" ]; then
        cds=(-XX:ArchiveClassesAtExit="$KAFKA_CDS_DUMP")
    elif [ -f "$jsa" ] && [ "${KAFKA_CDS:-1}" != 0 ]; then
        cds=(-XX:SharedArchiveFile="$jsa" -Xshare:auto)
    fi
    java "${cds[@]}" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Doutbox.kafka.log.target=SYSTEM_ERR \
        -Dlog4j2.configurationFile="$LOG4J_CONF" -cp "$OUTBOX_KAFKA_LIBS/*" "$@"
}

# A Kafka UUID: 16 random bytes, base64url without padding, not starting with '-'.
_random_cluster_id() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
        [ "${id:0:1}" != - ] && break
    done
    echo "$id"
}

cmd_run() {
    local dir='' node_id='' port='' cport='' voters='' cluster_id='' ssl_port='' sasl_port=''
    local cert='' key='' ca='' adv_host=127.0.0.1
    local scram=() sets=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --dir) dir=$2 ;;
        --node-id) node_id=$2 ;;
        --port) port=$2 ;;
        --controller-port) cport=$2 ;;
        --voters) voters=$2 ;;
        --cluster-id) cluster_id=$2 ;;
        --ssl-port) ssl_port=$2 ;;
        --sasl-port) sasl_port=$2 ;;
        --cert) cert=$2 ;;
        --key) key=$2 ;;
        --ca) ca=$2 ;;
        --scram) scram+=("$2") ;;
        --advertised-host) adv_host=$2 ;;
        --set) sets+=("$2") ;;
        *) die "run: unknown option $1 (see scripts/kafka.sh --help)" ;;
        esac
        shift 2
    done
    if [ -z "$dir" ] || [ -z "$node_id" ] || [ -z "$port" ]; then die "run needs --dir, --node-id and --port"; fi
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"

    local n_voters
    if [ -n "$voters" ]; then
        [ -n "$cluster_id" ] || die "run: --voters needs --cluster-id (the same on every node)"
        local mine
        mine="$(tr ',' '\n' <<<"$voters" | grep "^$node_id@" || true)"
        [ -n "$mine" ] || die "run: node $node_id is not among --voters $voters"
        [ -n "$cport" ] || cport="${mine##*:}"
        [ "${mine##*:}" = "$cport" ] || die "run: --controller-port $cport differs from --voters entry $mine"
        n_voters="$(tr ',' '\n' <<<"$voters" | grep -c .)"
    else
        [ -n "$cport" ] || cport="$(free_port)"
        voters="$node_id@127.0.0.1:$cport"
        n_voters=1
    fi

    local rf=1 min_isr=1
    if [ "$n_voters" -ge 3 ]; then
        rf=3 min_isr=2
    elif [ "$n_voters" -eq 2 ]; then
        rf=2 min_isr=1
    fi

    local listeners="PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
    local advertised="PLAINTEXT://$adv_host:$port"
    if [ -n "$ssl_port$sasl_port" ]; then
        if [ -z "$cert" ] || [ -z "$key" ] || [ -z "$ca" ]; then die "run: --ssl-port/--sasl-port need --cert, --key and --ca"; fi
        mkdir -p "$dir/ssl"
        # Kafka's PEM keystore: an unencrypted PKCS#8 key followed by the certificate chain.
        if grep -q 'BEGIN PRIVATE KEY' "$key"; then
            cat "$key" >"$dir/ssl/keystore.pem"
        else
            openssl pkcs8 -topk8 -nocrypt -in "$key" -out "$dir/ssl/keystore.pem"
        fi
        cat "$cert" >>"$dir/ssl/keystore.pem"
        cat "$ca" >"$dir/ssl/truststore.pem"
        chmod 600 "$dir/ssl/keystore.pem"
    fi
    if [ -n "$ssl_port" ]; then
        listeners+=",SSL://127.0.0.1:$ssl_port"
        advertised+=",SSL://$adv_host:$ssl_port"
    fi
    if [ -n "$sasl_port" ]; then
        listeners+=",SASL_SSL://127.0.0.1:$sasl_port"
        advertised+=",SASL_SSL://$adv_host:$sasl_port"
    fi

    cat >"$dir/server.properties" <<EOF
# Written by scripts/kafka.sh run; rewritten at every start.
process.roles=broker,controller
node.id=$node_id
controller.quorum.voters=$voters
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data

# Tests create their topics.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$min_isr
# Fewer partitions for the internal topics than the default 50: created faster on first use.
offsets.topic.num.partitions=5
transaction.state.log.num.partitions=5

# Timings friendly to tests; none of them changes what is guaranteed.
group.initial.rebalance.delay.ms=0
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
controller.quorum.election.timeout.ms=1000
controller.quorum.fetch.timeout.ms=2000
controller.quorum.election.backoff.max.ms=500
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=6000
# The log cleaner's dedupe buffer is allocated on the heap at start-up (default 128 MiB).
log.cleaner.dedupe.buffer.size=16777216
EOF
    if [ -n "$ssl_port$sasl_port" ]; then
        cat >>"$dir/server.properties" <<EOF

# TLS for the SSL and SASL_SSL listeners (the controller and inter-broker ones stay plaintext).
ssl.keystore.type=PEM
ssl.keystore.location=$dir/ssl/keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$dir/ssl/truststore.pem
ssl.client.auth=none
EOF
    fi
    if [ -n "$sasl_port" ]; then
        cat >>"$dir/server.properties" <<EOF
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
    fi
    if [ "${#sets[@]}" -gt 0 ]; then
        printf '\n# --set\n' >>"$dir/server.properties"
        printf '%s\n' "${sets[@]}" >>"$dir/server.properties"
    fi

    _libs
    if [ -f "$dir/data/meta.properties" ]; then
        [ "${#scram[@]}" -eq 0 ] || echo "kafka.sh: $dir/data is formatted already: its SCRAM users are kept, --scram is not applied again" >&2
    else
        [ -n "$cluster_id" ] || cluster_id="$(_random_cluster_id)"
        local fmt=(format --config "$dir/server.properties" --cluster-id "$cluster_id") s
        for s in "${scram[@]}"; do
            [[ "$s" == *:* ]] || die "run: --scram wants USER:PASSWORD, got $s"
            fmt+=(--add-scram "SCRAM-SHA-512=[name=${s%%:*},password=${s#*:}]")
        done
        # Its output lists the SCRAM users' salted keys: shown only if it fails, never kept.
        local out
        out="$(_java_tool kafka.tools.StorageTool "${fmt[@]}" 2>&1)" || {
            printf '%s\n' "$out" | grep -v UserScramCredentialRecord >&2
            die "formatting $dir/data failed"
        }
    fi

    # Class-data sharing (scripts/lib.sh: _kafka_make_cds): written once, then read by every start.
    local cds=() jsa
    jsa="$(dirname "$OUTBOX_KAFKA_LIBS")/kafka.jsa"
    if [ -n "${KAFKA_CDS_DUMP:-}" ]; then
        cds=(-XX:ArchiveClassesAtExit="$KAFKA_CDS_DUMP")
    elif [ -f "$jsa" ] && [ "${KAFKA_CDS:-1}" != 0 ]; then
        cds=(-XX:SharedArchiveFile="$jsa" -Xshare:auto)
    fi
    # shellcheck disable=SC2086 # the options are word lists
    exec java ${KAFKA_HEAP_OPTS:--Xmx512m -Xms64m} ${KAFKA_JVM_OPTS:-$KAFKA_JVM_OPTS_DEFAULT} "${cds[@]}" \
        -Dlog4j2.configurationFile="$LOG4J_CONF" \
        -cp "$OUTBOX_KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties"
}

cmd_produce_java() {
    local bootstrap='' topic='' extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --bootstrap) bootstrap=$2 ;;
        --topic) topic=$2 ;;
        --command-config) extra+=(--command-config "$2") ;;
        *) die "produce-java: unknown option $1" ;;
        esac
        shift 2
    done
    if [ -z "$bootstrap" ] || [ -z "$topic" ]; then die "produce-java needs --bootstrap and --topic"; fi
    _java_tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$bootstrap" --topic "$topic" \
        --reader-property parse.key=true --reader-property key.separator=: \
        --command-property acks=all --request-timeout-ms 30000 "${extra[@]}"
}

cmd_consume_java() {
    local bootstrap='' topic='' extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --bootstrap) bootstrap=$2 ;;
        --topic) topic=$2 ;;
        --max-messages | --timeout-ms | --command-config) extra+=("$1" "$2") ;;
        --read-committed)
            extra+=(--isolation-level read_committed)
            shift
            continue
            ;;
        *) die "consume-java: unknown option $1" ;;
        esac
        shift 2
    done
    if [ -z "$bootstrap" ] || [ -z "$topic" ]; then die "consume-java needs --bootstrap and --topic"; fi
    _java_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$bootstrap" \
        --topic "$topic" --from-beginning \
        --formatter-property print.partition=true --formatter-property print.offset=true \
        --formatter-property print.key=true --formatter-property print.value=true \
        "${extra[@]}" | sed -E 's/^Partition:([0-9]+)\tOffset:([0-9]+)\t/\1\t\2\t/'
}

cmd_create_topic() {
    local bootstrap='' topic='' partitions=1 rf='' extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --bootstrap) bootstrap=$2 ;;
        --topic) topic=$2 ;;
        --partitions) partitions=$2 ;;
        --replication-factor) rf=$2 ;;
        --config | --command-config) extra+=("$1" "$2") ;;
        *) die "create-topic: unknown option $1" ;;
        esac
        shift 2
    done
    if [ -z "$bootstrap" ] || [ -z "$topic" ]; then die "create-topic needs --bootstrap and --topic"; fi
    [ -z "$rf" ] || extra+=(--replication-factor "$rf")
    _java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" --create \
        --topic "$topic" --partitions "$partitions" "${extra[@]}"
}

cmd_topics() {
    [ "${1:-}" = --bootstrap ] || die "topics needs --bootstrap B first"
    local bootstrap=$2
    shift 2
    _java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap" "$@"
}

cmd_make_certs() {
    local dir='' hosts=(127.0.0.1 localhost) san='' h
    while [ $# -gt 0 ]; do
        case "$1" in
        --dir) dir=$2 ;;
        --host) hosts+=("$2") ;;
        --no-loopback)
            hosts=("${hosts[@]:2}")
            shift
            continue
            ;;
        *) die "make-certs: unknown option $1" ;;
        esac
        shift 2
    done
    [ -n "$dir" ] || die "make-certs needs --dir"
    [ "${#hosts[@]}" -gt 0 ] || die "make-certs: --no-loopback needs a --host"
    command -v openssl >/dev/null || _apt_install openssl
    for h in "${hosts[@]}"; do
        if [[ "$h" =~ ^[0-9.]+$ ]]; then san+="${san:+,}IP:$h"; else san+="${san:+,}DNS:$h"; fi
    done
    mkdir -p "$dir"
    (
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
            -subj '/CN=outbox-relay test CA' 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
            -subj '/CN=localhost' 2>/dev/null
        printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$san" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile server.ext -out server.pem 2>/dev/null
        rm -f server.csr server.ext ca.srl
    )
}

if [ $# -lt 1 ]; then
    usage >&2
    exit 2
fi
sub=$1
shift
case "$sub" in
run) cmd_run "$@" ;;
produce-java) cmd_produce_java "$@" ;;
consume-java) cmd_consume_java "$@" ;;
create-topic) cmd_create_topic "$@" ;;
topics) cmd_topics "$@" ;;
make-certs) cmd_make_certs "$@" ;;
java)
    [ $# -ge 1 ] || die "java needs a class name"
    _java_tool "$@"
    ;;
libs)
    _libs
    echo "$OUTBOX_KAFKA_LIBS"
    ;;
-h | --help | help) usage ;;
*) die "unknown command $sub (see scripts/kafka.sh --help)" ;;
esac
