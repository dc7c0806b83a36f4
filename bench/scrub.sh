#!/usr/bin/env bash
# Scrubbing benchmark (issue 13): what the WAF (default rules) and rate
# limiting cost per request. rproxy four times -- plain, with [waf], with
# [rate_limit], with both -- next to nginx, all in front of the same static
# nginx origin, in ONE run (interleaved rounds), so the ratios compare rows
# measured under the same machine load. Same machinery as bench/run.sh.
#
#  1k   GET /1k.bin?q=..., keep-alive, CONNS_1K connections: the cost per request
#       (the query and a browser-like User-Agent give the rules something to read)
#
#   bench/scrub.sh                                  # 2 rounds of 10 s
#   DURATION=5s ROUNDS=2 flock /work/notes/bench.lock bench/scrub.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
export PATH="$PATH:/usr/sbin:/sbin"

PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}   # made by check_setup when missing
PROXIES=${PROXIES:-"nginx rproxy rproxy-waf rproxy-rl rproxy-waf-rl"}
TESTS=${TESTS:-"1k"}
DURATION=${DURATION:-10s}       # measured part of each wrk run
WARMUP=${WARMUP:-2s}            # unmeasured wrk run just before it; 0 to skip
ROUNDS=${ROUNDS:-2}
PICK=${PICK:-best}              # best | median round per proxy and test
CONNS_1K=${CONNS_1K:-50}
CONNS_1M=${CONNS_1M:-8}
WRK_TIMEOUT=${WRK_TIMEOUT:-5s}
PROXY_CPU=${PROXY_CPU:-0}       # the proxies
LOAD_CPU=${LOAD_CPU:-1}         # origin and wrk
START_TIMEOUT=${START_TIMEOUT:-20}  # seconds for a process to start listening
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
QUERY=${QUERY:-"?q=red+shoes&page=2"}

log() { printf '[scrub %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for p in $PROXIES; do
    case $p in
    nginx | rproxy | rproxy-waf | rproxy-rl | rproxy-waf-rl) ;;
    *) die "unknown proxy '$p' in PROXIES (nginx rproxy rproxy-waf rproxy-rl rproxy-waf-rl)" ;;
    esac
done

# --- processes, cleanup ----------------------------------------------------

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d /tmp/rproxy-bench.XXXXXX)
RUN_DIR=$RESULTS_DIR/scrub-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
source "$BENCH_DIR/lib.sh"   # cleanup on exit, start, alive, wait_listening, fail, render, free_ports
check_setup "nginx wrk curl taskset" twisted
declare -A STATE=() REASON=()


# --- ports -----------------------------------------------------------------

read -r -a ports <<<"$(free_ports $((1 + $(wc -w <<<"$PROXIES"))))"
PORT[origin]=${ports[0]}
i=1
for p in $PROXIES; do
    PORT[$p]=${ports[$i]}
    i=$((i + 1))
done

# --- origin ----------------------------------------------------------------

mkdir -p "$WORK/www"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
head -c 1048576 /dev/urandom >"$WORK/www/1m.bin"
render origin-nginx.conf.in "$WORK/origin.conf" origin
start origin "$LOAD_CPU" nginx -p "$WORK/origin/" -c "$WORK/origin.conf" -e "$WORK/origin/error.log"
wait_listening origin || die "origin nginx did not start: $(tail -5 "$RUN_DIR/origin.log" "$WORK/origin/error.log" 2>/dev/null)"
why=$(check_fetch "${PORT[origin]}") || die "origin nginx: $why"
log "origin nginx on 127.0.0.1:${PORT[origin]} (CPU $LOAD_CPU)"

# --- proxies ---------------------------------------------------------------

for p in $PROXIES; do
    case $p in
    nginx)
        render proxy-nginx.conf.in "$WORK/nginx.conf" nginx
        start nginx "$PROXY_CPU" nginx -p "$WORK/nginx/" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
        ;;
    rproxy*)
        config=$WORK/$p.toml
        sed -e "s|@PORT@|${PORT[$p]}|g" -e "s|@ORIGIN_PORT@|${PORT[origin]}|g" \
            "$BENCH_DIR/scrub/rproxy.toml.in" >"$config"
        # The WAF with the bundled rules, blocking; a rate limit wrk never reaches
        # (it measures the check, not refusals).
        [[ $p == *waf* ]] && printf '\n[waf]\nmode = "block"\nrules = "default"\n' >>"$config"
        [[ $p == *rl* ]] && printf '\n[rate_limit]\nrequests = 10000000\nper = 1.0\nburst = 10000000\n' >>"$config"
        pushd "$REPO_ROOT" >/dev/null
        start "$p" "$PROXY_CPU" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' \
            -n --pidfile= rproxy --config "$config"
        popd >/dev/null
        ;;
    esac
    STATE[$p]=ok
    REASON[$p]=""
done

for p in $PROXIES; do
    started "$p" || continue
    if why=$(check_fetch "${PORT[$p]}"); then
        log "$p on 127.0.0.1:${PORT[$p]} (CPU $PROXY_CPU)"
    else
        fail "$p" "$why"
    fi
done

# --- load ------------------------------------------------------------------

# load OUT WRK_ARGS...: wrk pinned to LOAD_CPU. In the background plus wait,
# so that a signal reaches our trap at once rather than after the run.
load() {
    local out=$1 rc=0
    shift
    taskset -c "$LOAD_CPU" wrk "$@" >"$out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    return $rc
}

# drive NAME TEST ROUND: one warm-up run, then the measured one.
drive() {
    local name=$1 test=$2 round=$3 conns
    local url="http://127.0.0.1:${PORT[$name]}/$test.bin$QUERY"
    local ua="User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
    local out="$RUN_DIR/r$round-$test-$name.wrk"
    [[ $test == 1k ]] && conns=$CONNS_1K || conns=$CONNS_1M
    if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
        load "$RUN_DIR/r$round-$test-$name.warmup" \
            -t1 -c"$conns" -d"$WARMUP" --timeout "$WRK_TIMEOUT" -H "$ua" "$url" || true
    fi
    log "round $round/$ROUNDS, $test, $name: wrk -c$conns -d$DURATION"
    load "$out" -t1 -c"$conns" -d"$DURATION" --timeout "$WRK_TIMEOUT" -H "$ua" \
        --latency -s "$BENCH_DIR/wrk_report.lua" "$url" ||
        log "$name: wrk exited with an error (see $out)"
    grep -h '^Requests/sec\|^Transfer/sec\|Non-2xx\|Socket errors' "$out" | sed 's/^/    /' >&2 || true
}

run_rounds

# --- report ----------------------------------------------------------------

write_status

{
    echo "date=$(date '+%Y-%m-%d %H:%M %Z')"
    echo "machine=$(machine_line)"
    echo "pinning=proxies on CPU $PROXY_CPU; origin nginx and wrk on CPU $LOAD_CPU"
    echo "load=load average $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    warm="after a $WARMUP warm-up"
    [[ $WARMUP == 0 || $WARMUP == 0s ]] && warm="no warm-up"
    echo "runs=$ROUNDS round(s) x $DURATION per proxy and test, $warm, interleaved"
    echo "versions=$(nginx -v 2>&1 | sed 's/.*version: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $("$PYTHON" -c 'import sys, twisted; print("Python %d.%d.%d" % sys.version_info[:3], "Twisted", twisted.__version__)')"
    echo "proxies=$PROXIES"
    echo "conns_1k=$CONNS_1K"
    echo "conns_1m=$CONNS_1M"
} >"$RUN_DIR/meta.txt"

"$PYTHON" "$BENCH_DIR/report.py" "$RUN_DIR" --pick "$PICK" >"$RUN_DIR/summary.txt"
cp "$RUN_DIR/summary.txt" "$RESULTS_DIR/latest-scrub.txt"
echo
cat "$RESULTS_DIR/latest-scrub.txt"
log "raw output in $RUN_DIR; table in $RESULTS_DIR/latest-scrub.txt"
