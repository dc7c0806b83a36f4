#!/usr/bin/env bash
# System calls per new connection of nginx and rproxy (and a base tree), by name: each proxy pinned
# to PROXY_CPU in front of the nginx origin, wrk (LOAD_CPU) opening a new connection per request
# (`Connection: close`, TLS for close-tls, -c50); the proxy process (nginx's worker) counted twice,
# in separate runs: `perf stat` (all system calls, user and system time; little overhead) and
# `strace -c` (by name; slows the proxy, which changes how many events one epoll_wait returns, so
# read epoll_wait and a failed accept4 as load-dependent).  Per connection = count / requests.
#   bench/conn_syscalls.sh                             # TESTS="close-tls close" LOAD=5s
#   BASE_DIR=/tmp/rproxy-base bench/conn_syscalls.sh   # adds "base": rproxy from another source tree
#   PROFILE=1 bench/conn_syscalls.sh                   # and where the CPU time goes, by library
#                                                      # (`perf record -e cpu-clock`, kernel included)
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
TESTS=${TESTS:-"close-tls close"}
LOAD=${LOAD:-5s}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-30}
BASE_DIR=${BASE_DIR:-}
PROXIES=${PROXIES:-"nginx rproxy${BASE_DIR:+ base}"}
PROFILE=${PROFILE:-}
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d /tmp/rproxy-conn-sys.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk taskset perf strace" twisted
start_origin_1k
start_conn_proxies
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
# run_counted TEST PROXY TOOL...: wrk against PROXY while TOOL counts its process; prints the requests.
run_counted() {
    local t=$1 p=$2 url counter
    shift 2
    url="http://127.0.0.1:${PORT[$p]}/1k.bin"
    [[ $t == close-tls ]] && url="https://127.0.0.1:${TLS_PORT[$p]}/1k.bin"
    taskset -c "$LOAD_CPU" wrk -t1 -c50 -d1s -H 'Connection: close' "$url" >/dev/null 2>&1
    "$@" -p "${CPU_PID[$p]}" &
    counter=$!
    sleep 0.5
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/${CPU_PID[$p]}/stat")
    taskset -c "$LOAD_CPU" wrk -t1 -c50 -d"$LOAD" -H 'Connection: close' "$url" >"$WORK/wrk.$t.$p" 2>&1
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/${CPU_PID[$p]}/stat")
    sleep 0.2
    kill -INT "$counter"
    wait "$counter" || true
    echo "$(awk '/requests in/ {print $1}' "$WORK/wrk.$t.$p") $((u1 - u0)) $((s1 - s0))"
}
for t in $TESTS; do
    for p in $PROXIES; do
        read -r n ut st <<<"$(run_counted "$t" "$p" perf stat -x, -e raw_syscalls:sys_enter -o "$WORK/perf.$t.$p")"
        awk -F, -v n="$n" -v t="$t" -v p="$p" -v ut="$ut" -v st="$st" -v hz="$(getconf CLK_TCK)" '
            /raw_syscalls/ {sys = $1}
            END {printf "%-10s %-7s %7d requests (perf) %6.1f system calls, user %6.1f us, system %6.1f us per connection\n",
                 t, p, n, sys / n, ut * 1e6 / hz / n, st * 1e6 / hz / n}' "$WORK/perf.$t.$p"
    done
    for p in $PROXIES; do
        read -r n _ <<<"$(run_counted "$t" "$p" strace -c -f -o "$WORK/strace.$t.$p")"
        echo "$t $p: $n requests (strace), calls per connection:"
        awk -v n="$n" '$1 ~ /^[0-9.]+$/ && $4 ~ /^[0-9]+$/ {
                errs = (NF == 6) ? $5 : 0
                printf "    %-16s %7.2f%s\n", $NF, $4 / n, errs ? sprintf("  (%.2f failed)", errs / n) : ""}' "$WORK/strace.$t.$p"
    done
    [[ -n $PROFILE ]] || continue
    for p in $PROXIES; do
        read -r n _ <<<"$(run_counted "$t" "$p" perf record -q -e cpu-clock -F 2000 -o "$WORK/perf.data.$t.$p")"
        echo "$t $p: $n requests (perf record), CPU time per connection by library (kernel included):"
        perf report -q -n -i "$WORK/perf.data.$t.$p" --sort dso --stdio 2>/dev/null | awk -v n="$n" '
            $1 ~ /%$/ && $2 ~ /^[0-9]+$/ {printf "    %7s %7.1f us  %s\n", $1, $2 * 500 / n, $3}' | head -12
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
