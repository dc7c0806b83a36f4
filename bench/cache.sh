#!/usr/bin/env bash
# Cache benchmark (issue 14): requests/s on cache hits, rproxy's memory and disk stores
# next to nginx proxy_cache, and the same proxies uncached; then a memory-bound run that
# stores ten times [cache] max_bytes of distinct objects and reports rproxy's peak RSS.
# Proxies on one core, origin nginx and wrk on the other, 127.0.0.1 only.
#
#   flock /work/notes/bench.lock env DURATION=5s ROUNDS=2 bench/cache.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
export PATH="$PATH:/usr/sbin:/sbin"
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-20}
MEM_MAX_BYTES=${MEM_MAX_BYTES:-16777216}   # max_bytes of the memory-bound run
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
ROWS=${ROWS:-"nginx-cache nginx-proxy rproxy-memory rproxy-disk rproxy-proxy"}
TESTS=${TESTS:-"1k 100k"}
BOUND=${BOUND:-1}                          # 0: skip the memory-bound run

log() { printf '[cache-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d /tmp/rproxy-cache-bench.XXXXXX)
RUN_DIR=$RESULTS_DIR/cache-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk curl taskset" twisted

render() {  # render TEMPLATE OUT NAME [STORE CACHE MAX_BYTES]
    local dir=$WORK/$3 user=""
    [[ $EUID -eq 0 ]] && user="user root;"
    mkdir -p "$dir/tmp"
    sed -e "s|@DIR@|$dir|g" -e "s|@WWW@|$WORK/www|g" -e "s|@USER@|$user|g" \
        -e "s|@PORT@|${PORT[$3]}|g" -e "s|@ORIGIN_PORT@|${PORT[origin]}|g" \
        -e "s|@STORE@|${4:-memory}|g" -e "s|@CACHE@|${5:-true}|g" -e "s|@MAX_BYTES@|${6:-268435456}|g" \
        "$1" >"$2"
}

read -r -a ports <<<"$("$PYTHON" - 7 <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
i=0
for name in origin nginx-cache nginx-proxy rproxy-memory rproxy-disk rproxy-proxy rproxy-bound; do PORT[$name]=${ports[$i]}; i=$((i + 1)); done

mkdir -p "$WORK/www"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
head -c 102400 /dev/urandom >"$WORK/www/100k.bin"
render "$BENCH_DIR/conf/origin-cache-nginx.conf.in" "$WORK/origin.conf" origin
start origin "$LOAD_CPU" nginx -p "$WORK/origin/" -c "$WORK/origin.conf" -e "$WORK/origin/error.log"
wait_listening origin || die "origin did not start"

rproxy() {  # rproxy NAME STORE CACHE MAX_BYTES
    render "$BENCH_DIR/cache/rproxy.toml.in" "$WORK/$1.toml" "$1" "$2" "$3" "$4"
    pushd "$REPO_ROOT" >/dev/null
    start "$1" "$PROXY_CPU" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= \
        rproxy --config "$WORK/$1.toml"
    popd >/dev/null
}
for name in $ROWS; do
    case $name in
    nginx-cache | nginx-proxy)
        [[ $name == nginx-cache ]] && conf=proxy-cache-nginx.conf.in || conf=proxy-nginx.conf.in
        render "$BENCH_DIR/conf/$conf" "$WORK/$name.conf" "$name"
        start "$name" "$PROXY_CPU" nginx -p "$WORK/$name/" -c "$WORK/$name.conf" -e "$WORK/$name/error.log"
        ;;
    rproxy-memory) rproxy rproxy-memory memory true 268435456 ;;
    rproxy-disk) rproxy rproxy-disk disk true 268435456 ;;
    rproxy-proxy) rproxy rproxy-proxy memory false 268435456 ;;
    *) die "unknown row $name" ;;
    esac
done
for name in $ROWS; do
    wait_listening "$name" || die "$name did not start (see $RUN_DIR/$name.log)"
    for f in 1k 100k; do  # fill the caches; the second fetch must be a hit
        curl -sS -o /dev/null "http://127.0.0.1:${PORT[$name]}/$f.bin"
        curl -sS -o /dev/null "http://127.0.0.1:${PORT[$name]}/$f.bin"
    done
    log "$name on 127.0.0.1:${PORT[$name]}: $(curl -sS -D - -o /dev/null "http://127.0.0.1:${PORT[$name]}/1k.bin" | grep -i '^cache-status' | tr -d '\r' || echo 'no Cache-Status')"
done
sleep 1  # the disk store's writes are queued in its thread pool

load() {
    local out=$1 rc=0
    shift
    taskset -c "$LOAD_CPU" wrk "$@" >"$out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    return $rc
}

for ((round = 1; round <= ROUNDS; round++)); do
    for test in $TESTS; do
        for name in $ROWS; do
            url="http://127.0.0.1:${PORT[$name]}/$test.bin"
            load /dev/null -t1 -c"$CONNS" -d"$WARMUP" "$url" || true
            load "$RUN_DIR/r$round-$test-$name.wrk" -t1 -c"$CONNS" -d"$DURATION" "$url" || true
            log "round $round $test $name: $(grep '^Requests/sec' "$RUN_DIR/r$round-$test-$name.wrk")"
        done
    done
done

# The memory bound: 100 KiB distinct objects, until ten times max_bytes went through the cache.
stored=0 rss_start=0 rss_end=0 hwm=0
if ((BOUND)); then
rproxy rproxy-bound memory true "$MEM_MAX_BYTES"
wait_listening rproxy-bound || die "rproxy-bound did not start"
curl -sS -o /dev/null "http://127.0.0.1:${PORT[rproxy-bound]}/1k.bin"
rss_start=$(awk '/VmRSS/ {print $2}' "/proc/${PID[rproxy-bound]}/status")
need=$((10 * MEM_MAX_BYTES / 102400 + 1))
stored=0
while ((stored < need)); do
    load "$RUN_DIR/bound.wrk" -t1 -c8 -d2s -s "$BENCH_DIR/cache/distinct.lua" "http://127.0.0.1:${PORT[rproxy-bound]}" || true
    done_now=$(awk '/requests in/ {print $1}' "$RUN_DIR/bound.wrk")
    stored=$((stored + done_now))
    log "distinct objects so far: $stored of $need"
    [[ $done_now -gt 0 ]] || die "no progress (see $RUN_DIR/bound.wrk)"
done
hwm=$(awk '/VmHWM/ {print $2}' "/proc/${PID[rproxy-bound]}/status")
rss_end=$(awk '/VmRSS/ {print $2}' "/proc/${PID[rproxy-bound]}/status")
fi

{
    echo "date=$(date '+%Y-%m-%d %H:%M %Z'); load average $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    echo "proxies on CPU $PROXY_CPU, origin nginx and wrk on CPU $LOAD_CPU; wrk -t1 -c$CONNS -d$DURATION after $WARMUP warm-up, best of $ROUNDS"
    printf '%-15s %12s %12s %10s %10s\n' proxy "1k req/s" "100k req/s" "1k/nginx" "100k/nginx"
    best() { grep -h '^Requests/sec' "$RUN_DIR"/r*-"$1"-"$2".wrk 2>/dev/null | awk '{print $2}' | sort -g | tail -1; }
    n1=$(best 1k nginx-cache); n100=$(best 100k nginx-cache)
    n1=${n1:-1}; n100=${n100:-1}
    for name in $ROWS; do
        a=$(best 1k "$name"); b=$(best 100k "$name")
        printf '%-15s %12s %12s %10s %10s\n' "$name" "$a" "$b" "$(awk -v x="$a" -v y="$n1" 'BEGIN{printf "%.2fx", x/y}')" \
            "$(awk -v x="$b" -v y="$n100" 'BEGIN{printf "%.2fx", x/y}')"
    done
    if ((BOUND)); then
        echo "memory bound: max_bytes=$((MEM_MAX_BYTES / 1048576)) MiB, $stored distinct 100 KiB objects stored ($((stored * 100 / 1024)) MiB);" \
            "rproxy RSS $((rss_start / 1024)) MiB before, $((rss_end / 1024)) MiB after, peak $((hwm / 1024)) MiB"
    fi
} | tee "$RUN_DIR/summary.txt"
