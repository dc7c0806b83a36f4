#!/usr/bin/env bash
# Workers on a loaded machine: wall-clock req/s cannot show scaling when every core is busy,
# but CPU time per request can show whether N workers cost more per request than one, and
# how evenly the kernel spreads connections over them. For each worker count, twistd rproxy
# runs on every core in front of the nginx origin; wrk (pinned to LOAD_CPU) sends 1 KiB
# keep-alive GETs; the CPU time (user + system, /proc) of the supervisor and each worker is
# read before and after.
#   bench/workers_cpu.sh            # COUNTS="1 2" LOAD=8s CONNS=50
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
COUNTS=${COUNTS:-"1 2"}
LOAD=${LOAD:-8s}
CONNS=${CONNS:-50}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-30}
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d /tmp/rproxy-workers-cpu.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
start_origin_1k
ticks=$(getconf CLK_TCK)
cpu_of() {  # cpu_of PID...: user+system ticks of these processes
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-8s %9s %12s %16s  %s\n' workers "req/s" "CPU s" "req per CPU s" "CPU s per worker"
for n in $COUNTS; do
    PORT[w$n]=$(free_ports 1)
    start "w$n" "0-$(($(nproc) - 1))" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= \
        rproxy --listen "tcp:${PORT[w$n]}:interface=127.0.0.1" --backend "tcp:127.0.0.1:${PORT[origin]}" \
        --access-log off --workers "$n"
    wait_listening "w$n" || { echo "w$n did not start" >&2; exit 1; }
    sleep 2   # every worker up
    pids=("${PID[w$n]}" $(pgrep -P "${PID[w$n]}" || true))
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:${PORT[w$n]}/1k.bin" >/dev/null 2>&1
    before=() ; for pid in "${pids[@]}"; do before+=("$(cpu_of "$pid")"); done
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$LOAD" "http://127.0.0.1:${PORT[w$n]}/1k.bin" >"$WORK/wrk.$n" 2>&1
    used=0 per=""
    for i in "${!pids[@]}"; do
        d=$(( $(cpu_of "${pids[$i]}") - before[i] ))
        used=$((used + d))
        per+="$(echo "scale=2; $d / $ticks" | bc) "
    done
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.$n")
    rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.$n")
    printf '%-8s %9s %12s %16s  %s\n' "$n" "$rps" "$(echo "scale=2; $used / $ticks" | bc)" \
        "$(echo "$requests * $ticks / $used" | bc)" "$per"
    kill -TERM "${PID[w$n]}"
    wait "${PID[w$n]}" 2>/dev/null || true
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
