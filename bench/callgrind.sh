#!/usr/bin/env bash
# Instructions per request of one bench/inmem.py mode, counted by callgrind:
# two runs of different lengths, the difference divided by the difference in
# requests (start-up and imports cancel out). Unaffected by the machine's load.
# PYTHONHASHSEED is fixed (0 unless set): with random string hashes, dict and
# set layouts differ from run to run, and so do the counts, by a few percent.
#
#   bench/callgrind.sh h2 [SRC_DIR] [extra inmem.py args...]
#   SMALL=500 LARGE=2500 bench/callgrind.sh close /tmp/rproxy-base
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
source "$BENCH_DIR/setup.sh"   # check_setup
check_setup valgrind twisted
MODE=$1
SRC=${2:-$(dirname "$BENCH_DIR")}
shift $(($# >= 2 ? 2 : 1))
SMALL=${SMALL:-500}
LARGE=${LARGE:-2500}
count() {
    local out n=$1
    shift
    out=$(PYTHONHASHSEED=${PYTHONHASHSEED:-0} PYTHONPATH=$SRC valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$PYTHON" "$BENCH_DIR/inmem.py" "$MODE" --requests "$n" "$@" 2>&1 >/dev/null | grep -o 'Collected : [0-9]*' | grep -o '[0-9]*')
    echo "$out"
}
a=$(count "$SMALL" "$@")
b=$(count "$LARGE" "$@")
echo "$MODE $SRC: $(( (b - a) / (LARGE - SMALL) )) instructions per request ($SMALL and $LARGE requests: $a, $b)"
