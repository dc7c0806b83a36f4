#!/usr/bin/env bash
# Instructions per request of each operations variant (bench/ops_cost.py) under
# callgrind: the difference between N2 and N1 requests, divided by N2 - N1, so
# start-up cancels out. Unaffected by the load of a shared machine.
#   bench/ops_cost.sh            # VARIANTS="bare ids metrics log stdout ops" N1=500 N2=2500
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
VARIANTS=${VARIANTS:-"bare ids metrics log stdout ops"}
N1=${N1:-500}
N2=${N2:-2500}
WORK=$(mktemp -d /tmp/rproxy-ops-cost.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONHASHSEED=0   # the same dictionaries in every run
count() {  # count VARIANT N: total instructions (Ir) of one run
    valgrind --tool=callgrind --callgrind-out-file="$WORK/out.$1.$2" "$PYTHON" "$BENCH_DIR/ops_cost.py" "$1" "$2" \
        >/dev/null 2>&1
    grep -m1 '^summary:\|^totals:' "$WORK/out.$1.$2" | awk '{print $2}'
}
base=""
printf '%-8s %12s %10s\n' variant "Ir/request" "vs bare"
for v in $VARIANTS; do
    a=$(count "$v" "$N1")
    b=$(count "$v" "$N2")
    per=$(( (b - a) / (N2 - N1) ))
    [[ -z $base ]] && base=$per
    printf '%-8s %12d %9.1f%%\n' "$v" "$per" "$(echo "100 * ($per - $base) / $base" | bc -l)"
done
