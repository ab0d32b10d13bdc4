#!/usr/bin/env bash
# Backlog drain benchmark: N outbox events are committed while the relay is stopped (slot and
# publication already present), then the relay starts and we time how long it takes until
# confirmed_flush_lsn passes the last transaction, i.e. until Kafka acknowledged everything;
# pg_recvlogical (the decode limit) and a polling publisher drain the same backlog alongside.
# Prints a Markdown table. Usage: benches/backlog.sh [N] [TXN_SIZE] [bench.sh options...]
#
# This is the `drain` section of benches/bench.sh, which measures much more (latency, memory,
# scaling, a CPU quota); see there and docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
TXN=${2:-10000}
shift $(($# < 2 ? $# : 2))
exec benches/bench.sh --sections drain -n "$N" --txn "$TXN" "$@"
