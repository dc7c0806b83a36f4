#!/usr/bin/env bash
# What operations cost per request in the real proxy process: `twistd rproxy` under callgrind,
# in front of an nginx origin, with wrk sending 1 KiB keep-alive GETs. Counting starts once the
# proxy listens and stops when wrk ends; the instructions counted (the proxy's own, in user
# space: the reactor, transports, HTTP and the feature measured) divided by the requests wrk
# completed. The kernel's share of each request is not counted, so each variant's extra share
# of the instructions is more than its share of the wall-clock time: a bound from above that a
# loaded machine does not disturb.
#
#   bench/ops_cost_live.sh                 # VARIANTS="bare ids metrics log stdout ops" LOAD=8s
#   REQUESTS=4000 bench/ops_cost_live.sh   # the same number of requests for every variant (h2load --h1, 10
#                                          # connections) rather than wrk for LOAD: the connections' set-up and
#                                          # the start are then shared by as many requests in each variant
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
VARIANTS=${VARIANTS:-"bare ids metrics log stdout ops"}
LOAD=${LOAD:-8s}
START_TIMEOUT=${START_TIMEOUT:-120}
export PATH="$PATH:/usr/sbin:/sbin" PYTHONHASHSEED=0
WORK=$(mktemp -d /tmp/rproxy-ops-live.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk curl h2load taskset valgrind" twisted

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT[origin]=$(free_port)
mkdir -p "$WORK/www" "$WORK/origin/tmp"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
user=""
[[ $EUID -eq 0 ]] && user="user root;"
sed -e "s|@DIR@|$WORK/origin|g" -e "s|@WWW@|$WORK/www|g" -e "s|@USER@|$user|g" -e "s|@PORT@|${PORT[origin]}|g" \
    "$BENCH_DIR/conf/origin-nginx.conf.in" >"$WORK/origin.conf"
start origin 1 nginx -p "$WORK/origin/" -c "$WORK/origin.conf" -e "$WORK/origin/error.log"
wait_listening origin || { echo "origin did not start" >&2; exit 1; }

printf '%-8s %12s %10s %10s\n' variant "Ir/request" requests "vs first"
first=""
for v in $VARIANTS; do
    PORT[$v]=$(free_port)
    server="" admin=""
    case $v in
    bare) server='access_log = "off"'$'\n''request_id_header = ""' ;;
    ids) server='access_log = "off"' ;;
    metrics) server='access_log = "off"' admin='[admin]'$'\n''endpoint = "tcp:0:interface=127.0.0.1"' ;;
    log) server="access_log = \"$WORK/access.log\"" ;;
    stdout) server='access_log = "-"' ;;
    ops) server="access_log = \"$WORK/access.log\"" admin='[admin]'$'\n''endpoint = "tcp:0:interface=127.0.0.1"' ;;
    *) echo "unknown variant $v" >&2; exit 1 ;;
    esac
    cat >"$WORK/$v.toml" <<EOF
[server]
$server

$admin

[[listen]]
endpoint = "tcp:${PORT[$v]}:interface=127.0.0.1"

[[route]]
pool = "origin"

[pool.origin]
backends = ["tcp:127.0.0.1:${PORT[origin]}"]
EOF
    out=$WORK/cg.$v
    start "$v" 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= rproxy --config "$WORK/$v.toml"
    wait_listening "$v" || { echo "$v did not start" >&2; exit 1; }
    curl -s -o /dev/null "http://127.0.0.1:${PORT[$v]}/1k.bin"   # first request: imports, connections
    callgrind_control -i on "${PID[$v]}" >/dev/null 2>&1
    if [[ -n ${REQUESTS:-} ]]; then
        taskset -c 1 h2load --h1 -t1 -c10 -n"$REQUESTS" "http://127.0.0.1:${PORT[$v]}/1k.bin" >"$WORK/wrk.$v" 2>&1
    else
        taskset -c 1 wrk -t1 -c10 -d"$LOAD" "http://127.0.0.1:${PORT[$v]}/1k.bin" >"$WORK/wrk.$v" 2>&1
    fi
    callgrind_control -i off "${PID[$v]}" >/dev/null 2>&1
    callgrind_control -d "${PID[$v]}" >/dev/null 2>&1
    kill -TERM "${PID[$v]}"
    wait "${PID[$v]}" 2>/dev/null || true
    if [[ -n ${REQUESTS:-} ]]; then
        requests=$(awk '/^requests:/ {print $8}' "$WORK/wrk.$v")   # "requests: N total, N started, N done, N succeeded"
    else
        requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.$v")
    fi
    ir=0
    for f in "$out"*; do
        n=$(grep -m1 '^totals:' "$f" | awk '{print $2}')
        ir=$((ir + ${n:-0}))
    done
    per=$((ir / requests))
    [[ -z $first ]] && first=$per
    printf '%-8s %12d %10d %9.1f%%\n' "$v" "$per" "$requests" "$(echo "100 * ($per - $first) / $first" | bc -l)"
done
