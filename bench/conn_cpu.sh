#!/usr/bin/env bash
# CPU time per new connection, kernel included, of nginx and rproxy (and a base tree): each proxy
# pinned to PROXY_CPU in front of the nginx origin, wrk (LOAD_CPU) opening a new connection per
# request (`Connection: close`, TLS for close-tls), the proxy's user + system CPU time (/proc; the
# nginx worker's) divided by the requests served. A busy shared machine lowers req/s far more than
# the CPU a connection takes, so the ratios of these figures hold better than req/s ratios there
# (they are the req/s ratios of a proxy that has a core to itself). Rounds are interleaved.
#   bench/conn_cpu.sh                             # TESTS="close-tls close" ROUNDS=3 LOAD=5s
#   BASE_DIR=/tmp/rproxy-base bench/conn_cpu.sh   # adds "base": rproxy from another source tree
#   BASE_DIR=. BASE_PYTHON=/tmp/venv-deb/bin/python bench/conn_cpu.sh   # "base": this tree, another interpreter
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
TESTS=${TESTS:-"close-tls close"}
ROUNDS=${ROUNDS:-3}
LOAD=${LOAD:-5s}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-30}
BASE_DIR=${BASE_DIR:-}
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d /tmp/rproxy-conn-cpu.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk taskset" twisted
PROXIES="nginx rproxy${BASE_DIR:+ base}"
start_origin_1k
start_conn_proxies
ticks=$(getconf CLK_TCK)
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A SUM_REQ=() SUM_TICKS=()
for ((r = 1; r <= ROUNDS; r++)); do
    for t in $TESTS; do
        for p in $(round_order "$r"); do
            url="http://127.0.0.1:${PORT[$p]}/1k.bin"
            [[ $t == close-tls || $t == tls-1k ]] && url="https://127.0.0.1:${TLS_PORT[$p]}/1k.bin"
            close=(-H 'Connection: close')
            [[ $t == h1-1k || $t == tls-1k ]] && close=()
            taskset -c "$LOAD_CPU" wrk -t1 -c50 -d1s "${close[@]}" "$url" >/dev/null 2>&1
            before=$(awk '{print $14 + $15}' "/proc/${CPU_PID[$p]}/stat")
            taskset -c "$LOAD_CPU" wrk -t1 -c50 -d"$LOAD" "${close[@]}" "$url" >"$WORK/wrk.$t.$p.$r" 2>&1
            used=$(( $(awk '{print $14 + $15}' "/proc/${CPU_PID[$p]}/stat") - before ))
            requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.$t.$p.$r")
            SUM_REQ[$t.$p]=$(( ${SUM_REQ[$t.$p]:-0} + requests ))
            SUM_TICKS[$t.$p]=$(( ${SUM_TICKS[$t.$p]:-0} + used ))
            printf 'round %d %-10s %-7s %7d requests %6.2f CPU s %8.1f us/request\n' "$r" "$t" "$p" "$requests" \
                "$(echo "$used / $ticks" | bc -l)" "$(echo "$used * 1000000 / $ticks / $requests" | bc -l)"
        done
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %-7s %18s %12s\n' test proxy "CPU us/request" "nginx/this"
for t in $TESTS; do
    ngx=$(echo "${SUM_TICKS[$t.nginx]} * 1000000 / $ticks / ${SUM_REQ[$t.nginx]}" | bc -l)
    for p in $PROXIES; do
        us=$(echo "${SUM_TICKS[$t.$p]} * 1000000 / $ticks / ${SUM_REQ[$t.$p]}" | bc -l)
        printf '%-10s %-7s %18.1f %11.2fx\n' "$t" "$p" "$us" "$(echo "$ngx / $us" | bc -l)"
    done
done
