#!/usr/bin/env bash
# What operations cost in CPU time per request, kernel included: for each variant, twistd
# rproxy pinned to PROXY_CPU in front of the nginx origin, wrk (LOAD_CPU) sends 1 KiB
# keep-alive GETs, and the proxy's user + system CPU time (/proc) is divided by the requests
# served. Less disturbed by other load than req/s (a busy machine lowers the req/s, less the
# CPU a request takes), so it gives ratios on a shared machine. Rounds are interleaved.
#   bench/ops_cpu.sh          # VARIANTS="ids metrics log stdout ops bare" ROUNDS=3 LOAD=6s
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
VARIANTS=${VARIANTS:-"ids metrics log stdout ops bare"}
ROUNDS=${ROUNDS:-3}
LOAD=${LOAD:-6s}
CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-30}
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d /tmp/rproxy-ops-cpu.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk taskset" twisted
start_origin_1k
ticks=$(getconf CLK_TCK)
for v in $VARIANTS; do
    PORT[$v]=$(free_ports 1)
    server="" admin=""
    case $v in
    bare) server='access_log = "off"'$'\n''request_id_header = ""' ;;
    ids) server='access_log = "off"' ;;
    metrics) server='access_log = "off"' admin='[admin]'$'\n''endpoint = "tcp:0:interface=127.0.0.1"' ;;
    log) server="access_log = \"$WORK/access-$v.log\"" ;;
    stdout) server='access_log = "-"' ;;
    ops) server="access_log = \"$WORK/access-$v.log\"" admin='[admin]'$'\n''endpoint = "tcp:0:interface=127.0.0.1"' ;;
    *) echo "unknown variant $v" >&2; exit 1 ;;
    esac
    printf '[server]\n%s\n\n%s\n\n[[listen]]\nendpoint = "tcp:%s:interface=127.0.0.1"\n\n[[route]]\npool = "o"\n\n[pool.o]\nbackends = ["tcp:127.0.0.1:%s"]\n' \
        "$server" "$admin" "${PORT[$v]}" "${PORT[origin]}" >"$WORK/$v.toml"
    start "$v" "$PROXY_CPU" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= rproxy \
        --config "$WORK/$v.toml"
    wait_listening "$v" || { echo "$v did not start" >&2; exit 1; }
done
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A SUM_REQ=() SUM_TICKS=()
for ((r = 1; r <= ROUNDS; r++)); do
    for v in $VARIANTS; do
        url="http://127.0.0.1:${PORT[$v]}/1k.bin"
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s "$url" >/dev/null 2>&1
        before=$(awk '{print $14 + $15}' "/proc/${PID[$v]}/stat")
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$LOAD" "$url" >"$WORK/wrk.$v.$r" 2>&1
        used=$(( $(awk '{print $14 + $15}' "/proc/${PID[$v]}/stat") - before ))
        requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.$v.$r")
        SUM_REQ[$v]=$(( ${SUM_REQ[$v]:-0} + requests ))
        SUM_TICKS[$v]=$(( ${SUM_TICKS[$v]:-0} + used ))
        printf 'round %d %-8s %8d requests %6.2f CPU s  %8.1f us/request\n' "$r" "$v" "$requests" \
            "$(echo "$used / $ticks" | bc -l)" "$(echo "$used * 1000000 / $ticks / $requests" | bc -l)"
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
first=""
printf '%-8s %14s %10s\n' variant "CPU us/request" "vs first"
for v in $VARIANTS; do
    us=$(echo "${SUM_TICKS[$v]} * 1000000 / $ticks / ${SUM_REQ[$v]}" | bc -l)
    [[ -z $first ]] && first=$us
    printf '%-8s %14.1f %9.1f%%\n' "$v" "$us" "$(echo "100 * ($us - $first) / $first" | bc -l)"
done
