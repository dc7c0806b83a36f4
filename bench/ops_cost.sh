#!/usr/bin/env bash
# Instructions per request of each operations variant (bench/ops_cost.py) under
# callgrind, counted only over N requests after WARMUP (client requests from
# bench/callgrind_marks.c, built here with gcc; valgrind's headers needed):
# start-up, imports and the first requests are not counted. Unaffected by the
# load of a shared machine.
#   bench/ops_cost.sh            # VARIANTS="bare ids events metrics log stdout ops" N=3072 WARMUP=600
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
VARIANTS=${VARIANTS:-"bare ids events metrics log stdout ops"}
N=${N:-3072}
WARMUP=${WARMUP:-600}
WORK=$(mktemp -d /tmp/rproxy-ops-cost.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONHASHSEED=0   # the same dictionaries in every run
export PYTHONPATH=${PYTHONPATH:-$REPO_ROOT}   # this checkout's source, not the copy pip installed
gcc -O2 -shared -fPIC -o "$WORK/marks.so" "$BENCH_DIR/callgrind_marks.c"
base=""
printf '%-8s %12s %10s\n' variant "Ir/request" "vs first"
for v in $VARIANTS; do
    OPS_COST_CALLGRIND=$WORK/marks.so valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$WORK/out.$v" "$PYTHON" "$BENCH_DIR/ops_cost.py" "$v" "$N" "$WARMUP" >/dev/null 2>&1
    total=$(grep -h '^totals:' "$WORK/out.$v".* | awk '{s += $2} END {print s}')
    per=$((total / N))
    [[ -z $base ]] && base=$per
    printf '%-8s %12d %9.1f%%\n' "$v" "$per" "$(echo "100 * ($per - $base) / $base" | bc -l)"
done
