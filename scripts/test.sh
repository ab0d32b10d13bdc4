#!/usr/bin/env bash
# The whole test suite: unit tests (decoder on captured pgoutput bytes, config, ack tracking,
# mapping) and the integration tests in tests/, which start their own throwaway PostgreSQL and
# Apache Kafka (scripts/kafka.sh) and run the built relay against them. Installs what is
# missing first (see scripts/lib.sh: ensure_tools) and exports OUTBOX_KAFKA_LIBS, Kafka's jars,
# and OUTBOX_DEBEZIUM_LIBS, Kafka Connect's and Debezium's (ensure_debezium), for
# tests/debezium.rs, which runs Debezium beside the relay.
# Extra arguments go to cargo test, e.g. scripts/test.sh --test crash -- --nocapture; without
# any, the end-to-end tests also run on PostgreSQL 14, 16, 17 and 18 (scripts/pg-matrix.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_tools
ensure_debezium
# Tests that need a given PostgreSQL major (failover slots need 17+) find its server here.
pg_stage_init
OUTBOX_TEST_PG17_BIN="$(pg_major_bin 17)"
OUTBOX_TEST_PG18_BIN="$(pg_major_bin 18)"
export OUTBOX_TEST_PG17_BIN OUTBOX_TEST_PG18_BIN
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/outbox-relay-test.XXXXXX")"
on_exit "rm -rf '$LOG_DIR'"
LOG="$LOG_DIR/cargo-test.log"

say "cargo test --no-fail-fast $* (unit, integration and doc tests; examples are compiled too)"
set +e
cargo test --no-fail-fast "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e

# The whole suite (no arguments) also runs the end-to-end and table-less outbox tests on the
# other supported PostgreSQL majors (about a minute, binaries cached in ~/.cache/outbox-relay/pg);
# OUTBOX_SKIP_PG_MATRIX=1 skips it. scripts/pg-matrix.sh alone runs the longer matrix. It
# appends "passed failed" per version to PG_MATRIX_COUNTS, so its tests count in the summary
# below, and leaves the closing word to this script (no OK of its own).
MATRIX_COUNTS="$LOG_DIR/matrix-counts"
: >"$MATRIX_COUNTS"
matrix="not run (arguments given)"
matrix_rc=0
if [ -n "${OUTBOX_SKIP_PG_MATRIX:-}" ]; then
    matrix="skipped (OUTBOX_SKIP_PG_MATRIX)"
elif [ "$#" -eq 0 ]; then
    echo
    PG_MATRIX_COUNTS="$MATRIX_COUNTS" PG_MATRIX_TESTS="e2e messages" \
        bash scripts/pg-matrix.sh 14 16 17 18 || matrix_rc=$?
    matrix=
fi

# Sum cargo's per-binary "test result:" lines and the matrix's counts into one summary. Its
# last line, "N passed, N failed", is the last line printed: CI reads it. A failure outside
# any test (a build error, a crashed test binary, a failed download) counts as one failed
# test, so that line never says "0 failed" when the exit status says otherwise.
read -r passed failed ignored binaries < <(
    awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) p += $(i - 1)
                if ($(i) ~ /^failed;?$/) f += $(i - 1)
                if ($(i) ~ /^ignored;?$/) g += $(i - 1)
            }
            n++
         }
         END { print p + 0, f + 0, g + 0, n + 0 }' "$LOG"
)
read -r matrix_passed matrix_failed < <(awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }' "$MATRIX_COUNTS")
if [ "$matrix_rc" -ne 0 ] && [ "$matrix_failed" -eq 0 ]; then
    matrix_failed=1
fi
: "${matrix:=$matrix_passed passed, $matrix_failed failed}"
echo
echo "==================== summary ===================="
echo "test binaries run: $binaries, ignored: $ignored; PostgreSQL matrix: $matrix"
grep -E '^test .* \.\.\. FAILED$' "$LOG" | sed 's/^/  /' || true
if [ "$rc" -ne 0 ]; then
    echo "FAILED: cargo test exited with status $rc"
elif [ "$binaries" -eq 0 ] || [ "$passed" -eq 0 ]; then
    echo "FAILED: no test ran"
    rc=1
fi
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1
fi
if [ "$matrix_rc" -ne 0 ]; then
    echo "FAILED: the PostgreSQL matrix exited with status $matrix_rc (see its output above)"
fi
echo "$((passed + matrix_passed)) passed, $((failed + matrix_failed)) failed"
[ "$rc" -eq 0 ] && [ "$matrix_rc" -eq 0 ] || exit 1
