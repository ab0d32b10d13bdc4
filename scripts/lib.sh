# shellcheck shell=bash
# Shared shell functions for scripts/demo.sh and scripts/test.sh (so .ci/run too). Source it:
#   . "$(dirname "$0")/lib.sh"
#
#   ensure_tools        install what is missing (PostgreSQL 15 server, C toolchain for
#                       librdkafka, python3, Tansu); sets PATH and exports TANSU
#   make_workdir        a throwaway directory in $WORK_DIR, removed on exit (KEEP_WORKDIR=1 keeps it)
#   free_port           print a free TCP port on 127.0.0.1
#   start_pg DIR PORT   throwaway PostgreSQL 15 (wal_level=logical, trust auth on 127.0.0.1)
#   stop_pg             stop it
#   pg_psql ARGS...     psql against it as the superuser `postgres`
#   start_tansu PORT    throwaway Tansu broker (in-memory storage) on 127.0.0.1:PORT
#   stop_tansu          stop it
#   on_exit CMD...      run CMD when the script exits (last registered runs first)
#
# Every process started here is stopped by its own pid, never by name.

PG_BINDIR_DEBIAN=/usr/lib/postgresql/15/bin
# Tansu's broker flags below were checked against this version; a tansu already installed
# (on PATH, in ~/.cargo/bin or named by $TANSU) is used whatever its version.
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"

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

# Prints the path of a tansu binary, if one is found.
find_tansu() {
    local c
    for c in "${TANSU:-}" "$(command -v tansu 2>/dev/null || true)" \
        "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" "$HOME/.cargo/bin/tansu"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

_ensure_tansu() {
    local found
    if ! found="$(find_tansu)"; then
        say "installing Tansu $TANSU_VERSION (cargo install; about 10 minutes, cached under ~/.cargo afterwards)"
        cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore
        found="$(find_tansu)" || die "cargo install tansu finished but no tansu binary was found"
    fi
    export TANSU="$found"
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
    _ensure_tansu
    # Said once per run: scripts that call each other (test.sh -> pg-matrix.sh) check again
    # but need not repeat it.
    if [ -z "${OUTBOX_TOOLS_SAID:-}" ]; then
        say "tools: $(initdb --version), $(cargo --version), tansu at $TANSU"
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
# Tansu (a Kafka-compatible broker in one binary), in-memory storage.
TANSU_PID=
start_tansu() {
    local port=$1 log
    [ -n "${TANSU:-}" ] || _ensure_tansu
    log="${WORK_DIR:-${TMPDIR:-/tmp}}/tansu-$port.log"
    say "starting Tansu on 127.0.0.1:$port"
    "$TANSU" broker \
        --storage-engine memory://tansu/ \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        >"$log" 2>&1 &
    TANSU_PID=$!
    on_exit stop_tansu
    wait_port "$port" 30 "$TANSU_PID" || {
        tail -n 30 "$log" >&2
        die "Tansu did not start listening on 127.0.0.1:$port (log: $log)"
    }
    export TANSU_PORT=$port KAFKA_BROKERS="127.0.0.1:$port"
}

stop_tansu() {
    [ -n "$TANSU_PID" ] || return 0
    stop_pid "$TANSU_PID" 10
    TANSU_PID=
}
