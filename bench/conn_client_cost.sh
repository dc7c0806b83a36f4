#!/usr/bin/env bash
# What a new connection per request costs each side of the benchmark, not only the proxy: wrk's CPU
# time per connection (`perf stat -e task-clock`), the origin nginx's and the proxy's (from /proc),
# and the kernel's TCP counters per connection (`nstat`: segments, resets, tail loss probes), for
# nginx, rproxy and a `BASE_DIR` tree, over TLS and plain. The connection-per-request figures of
# bench/h2.sh run with wrk and the origin sharing CPU 1 and, over TLS, CPU 1 is as busy as the
# proxy's: what wrk spends per connection then bounds the proxy's rate as much as the proxy does.
#
#   bench/conn_client_cost.sh                             # SCHEMES="https http" ROUNDS=2 LOAD=4s
#   BASE_DIR=/tmp/rproxy-base bench/conn_client_cost.sh   # adds "base": rproxy from another tree
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
SCHEMES=${SCHEMES:-"https http"}
ROUNDS=${ROUNDS:-2}
LOAD=${LOAD:-4s}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-30}
BASE_DIR=${BASE_DIR:-}
PROXIES=${PROXIES:-"nginx rproxy${BASE_DIR:+ base}"}
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d /tmp/rproxy-conn-client.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk taskset perf nstat" twisted
start_origin_1k
start_conn_proxies
origin_worker=$(pgrep -P "${PID[origin]}" | head -1)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # user + system, in clock ticks
hz=$(getconf CLK_TCK)
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-6s %-7s %5s %8s %9s %9s %9s %7s %7s %7s %7s\n' scheme proxy round requests "wrk us" "origin us" "proxy us" \
    "segs" "resets" "probes" "rsts"
for round in $(seq "$ROUNDS"); do
    for scheme in $SCHEMES; do
        for p in $(round_order "$round"); do
            port=${PORT[$p]}
            [[ $scheme == https ]] && port=${TLS_PORT[$p]}
            o0=$(cpu_ticks "$origin_worker") p0=$(cpu_ticks "${CPU_PID[$p]}")
            nstat -n >/dev/null
            taskset -c "$LOAD_CPU" perf stat -x, -e task-clock -o "$WORK/perf" \
                wrk -t1 -c50 -d"$LOAD" -H 'Connection: close' "$scheme://127.0.0.1:$port/1k.bin" >"$WORK/wrk" 2>&1
            nstat >"$WORK/nstat" || true
            o1=$(cpu_ticks "$origin_worker") p1=$(cpu_ticks "${CPU_PID[$p]}")
            req=$(awk '/requests in/ {print $1}' "$WORK/wrk")
            wrk_ms=$(awk -F, '/task-clock/ {print $1}' "$WORK/perf")
            counter() { awk -v k="$1" -v r="$req" '$1 == k {printf "%.2f", $2 / r; found = 1} END {if (!found) printf "0"}' "$WORK/nstat"; }
            printf '%-6s %-7s %5d %8d %9.0f %9.0f %9.0f %7s %7s %7s %7s\n' "$scheme" "$p" "$round" "$req" \
                "$(echo "$wrk_ms * 1000 / $req" | bc -l)" "$(echo "($o1 - $o0) * 1000000 / $hz / $req" | bc -l)" \
                "$(echo "($p1 - $p0) * 1000000 / $hz / $req" | bc -l)" "$(counter TcpOutSegs)" \
                "$(counter TcpEstabResets)" "$(counter TcpExtTCPLossProbes)" "$(counter TcpOutRsts)"
        done
    done
done
echo "(per connection: CPU time in µs; segs: TCP segments sent by anyone on loopback; resets: established"
echo " connections reset; probes: tail loss probes, a retransmission when an ACK is late; rsts: resets sent)"
