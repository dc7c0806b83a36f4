#!/bin/bash
# Instructions per request of bench/scrub_harness.py variants, by callgrind: the difference
# between a run of 3000 requests and one of 1000, divided by 2000 (client, proxy and origin
# of one process together, so the proxy's own share is smaller than the total).
#   bench/scrub_callgrind.sh plain waf rl waf-rl
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
source "$BENCH_DIR/setup.sh"   # check_setup
check_setup valgrind twisted
OUT=$(mktemp -d /tmp/rproxy-scrub-cg.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
for variant in "$@"; do
    declare -A ir=()
    for n in 1000 3000; do
        valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$variant.$n" \
            "$PYTHON" "$BENCH_DIR/scrub_harness.py" "$variant" "$n" >/dev/null 2>"$OUT/err.$variant.$n"
        ir[$n]=$(grep -h "Collected" "$OUT/err.$variant.$n" | awk '{print $NF}')
    done
    echo "$variant: $(( (ir[3000] - ir[1000]) / 2000 )) instructions per request"
done
