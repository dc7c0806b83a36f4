#!/usr/bin/env bash
# 2 workers against 1, as CPU efficiency: on a 2-core machine wrk and the origin need CPU too,
# so req/s cannot show what two free cores would give. Instead the proxy group is pinned to
# PROXY_CPU, and wrk (pipelining DEPTH requests per write, bench/pipeline.lua) and the nginx
# origin to LOAD_CPU: one worker has the core to itself; two workers share it. Both keep the
# core busy, so each mode's requests per CPU second of the group (supervisor and workers,
# user + system from /proc) say what a worker costs per request (and perf counts its system
# calls per request, which the machine's other load does not change); with two workers that cost
# includes whatever splitting the group adds (more processes, fewer ready connections per
# epoll wake-up). Scaling on two free cores would be 2 x (efficiency of 2 / efficiency of 1),
# less whatever two cores add that one does not (shared caches, memory bandwidth).
# Modes: w1 (one process), w2 (two workers, each its own SO_REUSEPORT socket), w2-shared (two
# workers sharing one socket: [server] reuseport = false); w2-spread and w2-spread-shared run
# two workers free on every core (the real placement, sharing CPUs with the load). Modes run
# interleaved, ROUNDS times, each against its own long-running twistd; each round's wrk opens
# CONNS new connections, which the kernel hands to the workers.
#   bench/workers_scaling.sh      # MODES="w1 w2" ROUNDS=4 LOAD=6s CONNS=50 DEPTH=8 CLOSE=0
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
MODES=${MODES:-"w1 w2"}
ROUNDS=${ROUNDS:-4}
LOAD=${LOAD:-6s}
CONNS=${CONNS:-50}
export DEPTH=${DEPTH:-8}
CLOSE=${CLOSE:-0}        # 1: a new connection per request (Connection: close, no pipelining)
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-30}
EXTRA=${EXTRA:-}         # more twistd rproxy options for every mode
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d /tmp/rproxy-workers-scaling.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk perf taskset" twisted
start_origin_1k
ticks=$(getconf CLK_TCK)
if ((CLOSE)); then
    WRK_REQUESTS=(-H "Connection: close")
else
    WRK_REQUESTS=(-s "$BENCH_DIR/pipeline.lua")
fi
# stat_of PID...: "CPU-ticks voluntary-switches involuntary-switches" summed over these processes
stat_of() {
    local cpu=0 vol=0 inv=0 pid
    for pid in "$@"; do
        cpu=$((cpu + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
        vol=$((vol + $(awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$pid/status")))
        inv=$((inv + $(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "/proc/$pid/status")))
    done
    echo "$cpu $vol $inv"
}
for mode in $MODES; do
    case $mode in
        w1) n=1 cpus=$PROXY_CPU reuseport=true ;;
        w2) n=2 cpus=$PROXY_CPU reuseport=true ;;
        w2-shared) n=2 cpus=$PROXY_CPU reuseport=false ;;
        w2-spread) n=2 cpus="0-$(($(nproc) - 1))" reuseport=true ;;
        w2-spread-shared) n=2 cpus="0-$(($(nproc) - 1))" reuseport=false ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    PORT[$mode]=$(free_ports 1)
    cat >"$WORK/$mode.toml" <<TOML
[server]
workers = $n
reuseport = $reuseport
access_log = "off"

[[listen]]
endpoint = "tcp:${PORT[$mode]}:interface=127.0.0.1"

[[route]]
path = "/"
pool = "origin"

[pool.origin]
backends = ["tcp:127.0.0.1:${PORT[origin]}"]
TOML
    # shellcheck disable=SC2086
    start "$mode" "$cpus" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= \
        rproxy --config "$WORK/$mode.toml" $EXTRA
    wait_listening "$mode" || { echo "$mode did not start" >&2; exit 1; }
done
sleep 2   # every worker up
echo "$(machine_line)"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); DEPTH=$DEPTH CLOSE=$CLOSE CONNS=$CONNS LOAD=$LOAD"
printf '%-16s %5s %9s %6s %5s %9s %9s %9s %10s  %s\n' mode round "req/s" "CPU s" "busy" "req/CPU s" \
    "sysc/kreq" "vcsw/kreq" "ivcsw/kreq" "CPU s per process (supervisor first)"
for ((round = 1; round <= ROUNDS; round++)); do
    for mode in $MODES; do
        pids=("${PID[$mode]}" $(pgrep -P "${PID[$mode]}" || true))
        url="http://127.0.0.1:${PORT[$mode]}/1k.bin"
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s "${WRK_REQUESTS[@]}" "$url" >/dev/null 2>&1
        before=() ; for pid in "${pids[@]}"; do before+=("$(stat_of "$pid")"); done
        t0=$(date +%s.%N)
        # perf counts the group's system calls (a tracepoint: no hardware counters needed) during the run.
        perf stat -x, -e raw_syscalls:sys_enter -p "$(IFS=,; echo "${pids[*]}")" -o "$WORK/perf" -- \
            taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$LOAD" "${WRK_REQUESTS[@]}" "$url" >"$WORK/wrk" 2>&1
        t1=$(date +%s.%N)
        used=0 vol=0 inv=0 per=""
        for i in "${!pids[@]}"; do
            read -r c v w <<<"$(stat_of "${pids[$i]}")"
            read -r c0 v0 w0 <<<"${before[$i]}"
            used=$((used + c - c0)); vol=$((vol + v - v0)); inv=$((inv + w - w0))
            per+="$(echo "scale=2; ($c - $c0) / $ticks" | bc) "
        done
        requests=$(awk '/requests in/ {print $1}' "$WORK/wrk")
        syscalls=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$WORK/perf")
        rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk")
        if grep -q "Non-2xx\|Socket errors" "$WORK/wrk"; then
            echo "$mode: errors: $(grep 'Non-2xx\|Socket errors' "$WORK/wrk")" >&2
        fi
        printf '%-16s %5s %9s %6s %5s %9s %9s %9s %10s  %s\n' "$mode" "$round" "$rps" \
            "$(echo "scale=2; $used / $ticks" | bc)" "$(echo "scale=2; $used / $ticks / ($t1 - $t0)" | bc)" \
            "$(echo "$requests * $ticks / $used" | bc)" "$(echo "$syscalls * 1000 / $requests" | bc)" \
            "$(echo "$vol * 1000 / $requests" | bc)" \
            "$(echo "$inv * 1000 / $requests" | bc)" "$per"
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
