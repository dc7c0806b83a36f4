#!/usr/bin/env bash
# HTTP/2 and connection-per-request benchmark (issue 16), in the same run as
# the HTTP/1.1 figures: rproxy next to nginx and HAProxy, each with a plain
# listener and a TLS one (ALPN h2 and http/1.1), all in front of the same
# static nginx origin, on 127.0.0.1 only. Proxies run on one core; the origin
# and the load tools on the other. With BASE_DIR set, a second rproxy ("base")
# runs from that source tree, for an A/B of two commits in one run. PROXIES may
# also name "floor" (bench/floor.py: the least a Python proxy with stdlib TLS
# does; HTTP/1.1 only, so for the h1, tls-1k and close tests).
#
#  h1-1k        GET /1k.bin, kept alive, plain: wrk -c50
#  h1-1m        GET /1m.bin, kept alive, plain: wrk -c8
#  tls-1k       GET /1k.bin, kept alive, HTTP/1.1 over TLS: wrk -c50
#  h2-1k-m10    GET /1k.bin over HTTP/2: h2load -c10 -m10 (10 streams per connection)
#  h2-1k-m1     GET /1k.bin over HTTP/2: h2load -c50 -m1
#  h2-100k-m10  GET /100k.bin over HTTP/2: h2load -c10 -m10
#  h2-100k-m1   GET /100k.bin over HTTP/2: h2load -c50 -m1
#  close        GET /1k.bin, a new connection per request, plain: wrk -c50 with "Connection: close"
#  close-tls    the same over TLS (full handshake each time; wrk does not resume)
#  hs           full TLS 1.2 handshakes: openssl s_time -new (handshake and close)
#
#   bench/h2.sh
#   DURATION=5s ROUNDS=2 TESTS="h2-1k-m10 tls-1k" bench/h2.sh
#   BASE_DIR=/tmp/rproxy-base bench/h2.sh        # adds "base" to PROXIES (given or default)
#   BASE_DIR=. BASE_PYTHON=/tmp/venv-deb/bin/python bench/h2.sh   # "base": this tree under another interpreter
#   PROXIES="nginx rproxy floor" TESTS="close close-tls" bench/h2.sh
#   PROFILE=1 PROXIES=rproxy TESTS=close ROUNDS=1 bench/h2.sh   # and a cProfile of rproxy: RUN_DIR/rproxy.prof
#   (PROFILE=base profiles the base instead: RUN_DIR/base.prof)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
HERE=$BENCH_DIR/h2
export PATH="$PATH:/usr/sbin:/sbin"

PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}   # made by check_setup when missing
BASE_DIR=${BASE_DIR:-}
BASE_PYTHON=${BASE_PYTHON:-$PYTHON}   # "base" may also be another interpreter (BASE_DIR=. for the same tree)
DEFAULT_PROXIES="nginx haproxy rproxy"
[[ -z $BASE_DIR ]] || DEFAULT_PROXIES="$DEFAULT_PROXIES base"
PROXIES=${PROXIES:-$DEFAULT_PROXIES}
# BASE_DIR asks for "base": a PROXIES given without it would silently drop the A/B.
[[ -z $BASE_DIR || " $PROXIES " == *" base "* ]] || PROXIES="$PROXIES base"
ALL_TESTS="h1-1k h1-1m tls-1k h2-1k-m10 h2-1k-m1 h2-100k-m10 h2-100k-m1 close close-tls hs"
TESTS=${TESTS:-$ALL_TESTS}
DURATION=${DURATION:-5s}        # measured part of each run
WARMUP=${WARMUP:-1s}            # unmeasured run just before it; 0 to skip
ROUNDS=${ROUNDS:-2}
PICK=${PICK:-best}              # best | median round per proxy and test
WRK_TIMEOUT=${WRK_TIMEOUT:-5s}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-20}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
CIPHERS="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"

log() { printf '[h2 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for p in $PROXIES; do
    case $p in
    nginx | haproxy | rproxy | floor) ;;
    base) [[ -n $BASE_DIR && -d $BASE_DIR/rproxy_tw ]] || die "base needs BASE_DIR, a source tree with rproxy_tw/" ;;
    *) die "unknown proxy '$p' in PROXIES (nginx haproxy rproxy base floor)" ;;
    esac
done
for t in $TESTS; do
    [[ " $ALL_TESTS " == *" $t "* ]] || die "unknown test '$t' in TESTS ($ALL_TESTS)"
done
SECS=${DURATION%s}
[[ $SECS =~ ^[0-9]+$ ]] || die "DURATION must be whole seconds (5 or 5s), not '$DURATION'"
WSECS=${WARMUP%s}
[[ $WSECS =~ ^[0-9]+$ ]] || die "WARMUP must be whole seconds, not '$WARMUP'"


LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
rev_of() {
    local rev
    if [[ -f $1/.rev ]]; then cat "$1/.rev"; return; fi  # a copy made with git archive
    rev=$(git -C "$1" rev-parse --short HEAD 2>/dev/null || echo '?')
    [[ -z $(git -C "$1" status --porcelain -- rproxy_tw 2>/dev/null) ]] || rev="$rev + uncommitted changes"
    echo "$rev"
}
REV=$(rev_of "$REPO_ROOT")
WORK=$(mktemp -d /tmp/rproxy-h2-bench.XXXXXX)
RUN_DIR=$RESULTS_DIR/h2-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
source "$BENCH_DIR/lib.sh"   # cleanup on exit, start, alive, wait_listening
check_setup "nginx haproxy wrk curl openssl h2load taskset" twisted,rproxy_tw
declare -A STATE=() REASON=() TLS_PORT=()


# render TEMPLATE OUT NAME
render() {
    local dir=$WORK/$3 user=""
    [[ $EUID -eq 0 ]] && user="user root;"
    mkdir -p "$dir/tmp"
    sed -e "s|@DIR@|$dir|g" -e "s|@WWW@|$WORK/www|g" -e "s|@USER@|$user|g" \
        -e "s|@PORT@|${PORT[$3]:-}|g" -e "s|@TLS_PORT@|${TLS_PORT[$3]:-}|g" -e "s|@ORIGIN_PORT@|${PORT[origin]}|g" \
        -e "s|@CERT@|$WORK/cert.pem|g" -e "s|@KEY@|$WORK/key.pem|g" -e "s|@PEM@|$WORK/haproxy.pem|g" \
        -e "s|@CIPHERS@|$CIPHERS|g" \
        "$1" >"$2"
}

# check_fetch NAME: each file comes back whole with a 200, plain, over TLS with HTTP/1.1 and over HTTP/2.
check_fetch() {
    local name=$1 file got url
    for file in 1k.bin:1024 100k.bin:102400 1m.bin:1048576; do
        for url in "http://127.0.0.1:${PORT[$name]}" "--http1.1 https://127.0.0.1:${TLS_PORT[$name]}" \
            "--http2 https://127.0.0.1:${TLS_PORT[$name]}"; do
            [[ $name == floor && $url == --http2* ]] && continue  # the floor speaks HTTP/1.1 only
            # shellcheck disable=SC2086
            got=$(curl --noproxy '*' -sS --max-time 10 --cacert "$WORK/cert.pem" -o /dev/null \
                -w '%{http_code} %{size_download} %{http_version}' ${url}/${file%:*} 2>&1) || true
            case $url in --http2*) expect="200 ${file#*:} 2" ;; --http1.1*) expect="200 ${file#*:} 1.1" ;; *) expect="200 ${file#*:} 1.1" ;; esac
            if [[ "$got" != "$expect" ]]; then
                echo "GET $url/${file%:*} gave '$got', expected '$expect'"
                return 1
            fi
        done
    done
}

# --- certificate, ports, origin --------------------------------------------

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/key.pem" \
    -out "$WORK/cert.pem" -days 30 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    2>"$RUN_DIR/openssl-req.log" || die "openssl req failed: $(tail -1 "$RUN_DIR/openssl-req.log")"
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/haproxy.pem"

read -r -a ports <<<"$("$PYTHON" - $((1 + 2 * $(wc -w <<<"$PROXIES"))) <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
PORT[origin]=${ports[0]}
i=1
for p in $PROXIES; do
    PORT[$p]=${ports[$i]}
    TLS_PORT[$p]=${ports[$((i + 1))]}
    i=$((i + 2))
done

mkdir -p "$WORK/www"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
head -c 102400 /dev/urandom >"$WORK/www/100k.bin"
head -c 1048576 /dev/urandom >"$WORK/www/1m.bin"
render "$BENCH_DIR/conf/origin-nginx.conf.in" "$WORK/origin.conf" origin
start origin "$LOAD_CPU" nginx -p "$WORK/origin/" -c "$WORK/origin.conf" -e "$WORK/origin/error.log"
wait_listening origin || die "origin nginx did not start"
log "origin nginx on 127.0.0.1:${PORT[origin]} (CPU $LOAD_CPU)"

# --- proxies ---------------------------------------------------------------

for p in $PROXIES; do
    case $p in
    nginx)
        render "$HERE/proxy-nginx.conf.in" "$WORK/nginx.conf" nginx
        start nginx "$PROXY_CPU" nginx -p "$WORK/nginx/" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
        ;;
    haproxy)
        render "$HERE/proxy-haproxy.cfg.in" "$WORK/haproxy.cfg" haproxy
        start haproxy "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg"
        ;;
    floor)
        start floor "$PROXY_CPU" "$PYTHON" "$BENCH_DIR/floor.py" "${PORT[floor]}" "${TLS_PORT[floor]}" \
            "${PORT[origin]}" "$WORK/cert.pem" "$WORK/key.pem"
        ;;
    rproxy | base)
        render "$HERE/rproxy.toml.in" "$WORK/$p.toml" "$p"
        # twistd in the foreground without a pidfile, from the source tree (as run.sh):
        # python -c puts the current directory first on sys.path, so that tree's rproxy_tw runs.
        src=$REPO_ROOT
        python=$PYTHON
        [[ $p == base ]] && src=$BASE_DIR python=$BASE_PYTHON
        pushd "$src" >/dev/null
        profile=()
        # PROFILE=rproxy (or 1) or base: twistd's cProfile of that one, saved when it stops (pstats file NAME.prof).
        want=${PROFILE:-}
        [[ $want != 1 ]] || want=rproxy
        [[ $want != "$p" ]] || profile=(--profile="$RUN_DIR/$p.prof" --profiler=cprofile --savestats)
        start "$p" "$PROXY_CPU" "$python" -c 'from twisted.scripts.twistd import run; run()' \
            -n --pidfile= "${profile[@]}" rproxy --config "$WORK/$p.toml"
        popd >/dev/null
        ;;
    esac
    STATE[$p]=ok
    REASON[$p]=""
done

for p in $PROXIES; do
    started "$p" || continue
    if why=$(check_fetch "$p"); then
        log "$p on 127.0.0.1:${PORT[$p]} and TLS :${TLS_PORT[$p]} (CPU $PROXY_CPU)"
    else
        fail "$p" "$why"
    fi
done

# --- load ------------------------------------------------------------------

load() {  # load OUT CMD...: pinned to LOAD_CPU, in the background plus wait (signals reach the trap)
    local out=$1 rc=0
    shift
    taskset -c "$LOAD_CPU" "$@" >"$out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    return $rc
}

now() { date +%s.%N; }

# measure OUT CMD...: the load, then a BENCH_RUN line with its wall-clock time.
measure() {
    local out=$1 t0 t1 rc=0
    shift
    t0=$(now)
    load "$out" "$@" || rc=$?
    t1=$(now)
    echo "BENCH_RUN wall_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') rc=$rc" >>"$out"
    return $rc
}

wrk_run() {  # wrk_run OUT URL CONNS [EXTRA...]
    local out=$1 url=$2 conns=$3
    shift 3
    if ((WSECS > 0)); then
        load "$out.warmup" wrk -t1 -c"$conns" -d"${WSECS}s" --timeout "$WRK_TIMEOUT" "$@" "$url" || true
    fi
    measure "$out" wrk -t1 -c"$conns" -d"${SECS}s" --timeout "$WRK_TIMEOUT" --latency \
        -s "$BENCH_DIR/wrk_report.lua" "$@" "$url" || log "wrk exited with an error (see $out)"
    grep -h '^Requests/sec\|Non-2xx\|Socket errors' "$out" | sed 's/^/    /' >&2 || true
}

h2load_run() {  # h2load_run OUT URL CONNS STREAMS
    local out=$1 url=$2 conns=$3 streams=$4
    measure "$out" h2load -t1 -c"$conns" -m"$streams" -D "$SECS" --warm-up-time="$WSECS" "$url" ||
        log "h2load exited with an error (see $out)"
    grep -h '^finished in\|^requests:' "$out" | sed 's/^/    /' >&2 || true
}

drive() {  # drive NAME TEST ROUND
    local name=$1 test=$2 round=$3 out plain tls
    out="$RUN_DIR/r$round-$test-$name"
    plain="http://127.0.0.1:${PORT[$name]}"
    tls="https://127.0.0.1:${TLS_PORT[$name]}"
    log "round $round/$ROUNDS, $test, $name"
    case $test in
    h1-1k) wrk_run "$out.wrk" "$plain/1k.bin" 50 ;;
    h1-1m) wrk_run "$out.wrk" "$plain/1m.bin" 8 ;;
    tls-1k) wrk_run "$out.wrk" "$tls/1k.bin" 50 ;;
    close) wrk_run "$out.wrk" "$plain/1k.bin" 50 -H 'Connection: close' ;;
    close-tls) wrk_run "$out.wrk" "$tls/1k.bin" 50 -H 'Connection: close' ;;
    h2-1k-m10) h2load_run "$out.h2load" "$tls/1k.bin" 10 10 ;;
    h2-1k-m1) h2load_run "$out.h2load" "$tls/1k.bin" 50 1 ;;
    h2-100k-m10) h2load_run "$out.h2load" "$tls/100k.bin" 10 10 ;;
    h2-100k-m1) h2load_run "$out.h2load" "$tls/100k.bin" 50 1 ;;
    hs)
        measure "$out.stime" openssl s_time -connect "127.0.0.1:${TLS_PORT[$name]}" -new -tls1_2 -time "$SECS" ||
            log "$name: s_time exited with an error (see $out.stime)"
        grep -h 'real seconds' "$out.stime" | sed 's/^/    /' >&2 || true
        ;;
    esac
}

run_rounds

# --- report ----------------------------------------------------------------

write_status

{
    echo "date=$(date '+%Y-%m-%d %H:%M %Z')"
    echo "machine=$(machine_line)"
    echo "pinning=proxies on CPU $PROXY_CPU; origin nginx and the load tools on CPU $LOAD_CPU"
    echo "load=load average $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    echo "runs=$ROUNDS round(s) x ${SECS}s per proxy and test after a ${WSECS}s warm-up, interleaved"
    echo "versions=$(nginx -v 2>&1 | sed 's/.*version: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(h2load --version | head -1), $(openssl version | cut -d' ' -f1-2), $("$PYTHON" -c 'import sys, twisted; print("Python %d.%d.%d" % sys.version_info[:3], "Twisted", twisted.__version__)')"
    echo "rproxy=$REV"
    echo "python=$(interpreter_line "$PYTHON")"
    [[ -z $BASE_DIR ]] || echo "base=$(rev_of "$BASE_DIR") ($BASE_DIR)"
    [[ -z $BASE_DIR || $BASE_PYTHON == "$PYTHON" ]] || echo "base_python=$(interpreter_line "$BASE_PYTHON")"
    echo "proxies=$PROXIES"
    echo "tests=$TESTS"
} >"$RUN_DIR/meta.txt"

"$PYTHON" "$HERE/report.py" "$RUN_DIR" --pick "$PICK" >"$RUN_DIR/summary.txt"
cp "$RUN_DIR/summary.txt" "$RESULTS_DIR/h2-latest.txt"
echo
cat "$RESULTS_DIR/h2-latest.txt"
log "raw output in $RUN_DIR; table in $RESULTS_DIR/h2-latest.txt"
