#!/usr/bin/env bash
# TLS benchmark (issue 3): rproxy next to nginx and HAProxy as TLS
# terminators, all in front of the same static nginx origin, on 127.0.0.1
# only. Proxies run on one core; the origin and the load tools on the other.
#
#  ka      1 KiB GETs over kept-alive TLS connections: wrk, CONNS connections
#  new     full handshakes/s: openssl s_time -new (never resumes a session)
#  reuse   resumed handshakes/s: openssl s_time -reuse (one full handshake,
#          then every connection resumes that session)
#
# With STIME_TLS=1.2 (the default) s_time only handshakes and closes: it
# measures TLS, not HTTP. s_time cannot resume a TLS 1.3 session that way (it
# never reads, so never sees the session ticket, which TLS 1.3 sends after the
# handshake), so STIME_TLS=1.3 adds "-www /1k.bin": one GET per connection.
# See "TLS termination" in bench/README.md.
#
#   bench/tls.sh                                # all proxies, 2 rounds
#   PROXIES="nginx rproxy" DURATION=5s STIME=5 ROUNDS=1 bench/tls.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
HERE=$BENCH_DIR/tls
export PATH="$PATH:/usr/sbin:/sbin"

PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}   # made by check_setup when missing
PROXIES=${PROXIES:-"nginx haproxy rproxy"}
TESTS=${TESTS:-"ka new reuse"}
DURATION=${DURATION:-10s}       # measured part of each wrk run
WARMUP=${WARMUP:-2s}            # unmeasured wrk run just before it; 0 to skip
STIME=${STIME:-10}              # seconds of each openssl s_time run
ROUNDS=${ROUNDS:-2}
PICK=${PICK:-best}              # best | median round per proxy and test
CONNS=${CONNS:-50}              # wrk connections (1 thread)
STIME_TLS=${STIME_TLS:-1.2}     # s_time's TLS version: 1.2 (handshakes only) | 1.3 (one GET each)
KEY_TYPE=${KEY_TYPE:-ec}        # ec (P-256) | rsa (2048-bit): the certificate's key
WRK_TIMEOUT=${WRK_TIMEOUT:-5s}
PROXY_CPU=${PROXY_CPU:-0}       # the proxies
LOAD_CPU=${LOAD_CPU:-1}         # origin, wrk and s_time
START_TIMEOUT=${START_TIMEOUT:-20}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}

# Mozilla "intermediate" TLS 1.2 ciphers (ECDHE with AEAD): what rproxy
# offers, given to nginx and HAProxy too. TLS 1.3 suites are OpenSSL's defaults.
CIPHERS="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"

log() { printf '[tls %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for p in $PROXIES; do
    case $p in
    nginx | haproxy | rproxy) ;;
    *) die "unknown proxy '$p' in PROXIES (nginx haproxy rproxy)" ;;
    esac
done
for t in $TESTS; do
    case $t in
    ka | new | reuse) ;;
    *) die "unknown test '$t' in TESTS (ka new reuse)" ;;
    esac
done
case $KEY_TYPE in
ec) KEY_ARGS=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
rsa) KEY_ARGS=(-newkey rsa:2048) ;;
*) die "KEY_TYPE must be ec or rsa, not '$KEY_TYPE'" ;;
esac
[[ $STIME =~ ^[0-9]+$ ]] || die "STIME must be whole seconds, not '$STIME'"
case $STIME_TLS in
1.2) STIME_ARGS=(-tls1_2) ;;
1.3) STIME_ARGS=(-tls1_3 -www /1k.bin) ;;
*) die "STIME_TLS must be 1.2 or 1.3, not '$STIME_TLS'" ;;
esac

# --- processes, cleanup ----------------------------------------------------

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
# The code under test: the commit, and whether rproxy_tw had uncommitted changes when it started.
REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
[[ -z $(git -C "$REPO_ROOT" status --porcelain -- rproxy_tw 2>/dev/null) ]] || REV="$REV + uncommitted changes"
WORK=$(mktemp -d /tmp/rproxy-tls-bench.XXXXXX)
RUN_DIR=$RESULTS_DIR/tls-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
source "$BENCH_DIR/lib.sh"   # cleanup on exit, start, alive, wait_listening
check_setup "nginx haproxy wrk curl openssl taskset" twisted,rproxy_tw
declare -A STATE=() REASON=()

# check_fetch SCHEME PORT: /1k.bin comes back whole with a 200, over TLS
# verified against our certificate for https.
check_fetch() {
    local got
    got=$(curl --noproxy '*' -sS --max-time 10 --cacert "$WORK/cert.pem" -o /dev/null \
        -w '%{http_code} %{size_download}' "$1://127.0.0.1:$2/1k.bin" 2>&1) || true
    if [[ "$got" != "200 1024" ]]; then
        echo "GET $1://127.0.0.1:$2/1k.bin gave '$got', expected '200 1024'"
        return 1
    fi
}


# render TEMPLATE OUT NAME: fill in a config template (bench/conf or bench/tls).
render() {
    local dir=$WORK/$3 user=""
    # As root, nginx would switch its workers to a user who cannot read our
    # mktemp directory; stay root instead (loopback-only, throwaway config).
    [[ $EUID -eq 0 ]] && user="user root;"
    mkdir -p "$dir/tmp"
    sed -e "s|@DIR@|$dir|g" -e "s|@WWW@|$WORK/www|g" -e "s|@USER@|$user|g" \
        -e "s|@PORT@|${PORT[$3]}|g" -e "s|@ORIGIN_PORT@|${PORT[origin]}|g" \
        -e "s|@CERT@|$WORK/cert.pem|g" -e "s|@KEY@|$WORK/key.pem|g" -e "s|@PEM@|$WORK/haproxy.pem|g" \
        -e "s|@CIPHERS@|$CIPHERS|g" \
        "$1" >"$2"
}

# cpu_ticks NAME: CPU time (user + system, clock ticks) used so far by a
# process and its children (an nginx master and its worker).
cpu_ticks() {
    local pid total=0 stat
    for pid in "${PID[$1]}" $(pgrep -P "${PID[$1]}" 2>/dev/null || true); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }  # the fields after "(comm)"
        read -r -a f <<<"$stat"
        total=$((total + f[11] + f[12]))  # utime, stime (fields 14 and 15)
    done
    echo "$total"
}

now() { date +%s.%N; }

# --- certificate -------------------------------------------------------------

openssl req -x509 "${KEY_ARGS[@]}" -nodes -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 30 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>"$RUN_DIR/openssl-req.log" ||
    die "openssl req failed: $(tail -1 "$RUN_DIR/openssl-req.log")"
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/haproxy.pem"
log "certificate: self-signed, $KEY_TYPE key, for localhost and 127.0.0.1"

# --- ports -----------------------------------------------------------------

read -r -a ports <<<"$("$PYTHON" - $((1 + $(wc -w <<<"$PROXIES"))) <<'EOF'
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
    i=$((i + 1))
done

# --- origin ----------------------------------------------------------------

mkdir -p "$WORK/www"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
render "$BENCH_DIR/conf/origin-nginx.conf.in" "$WORK/origin.conf" origin
start origin "$LOAD_CPU" nginx -p "$WORK/origin/" -c "$WORK/origin.conf" -e "$WORK/origin/error.log"
wait_listening origin || die "origin nginx did not start: $(tail -5 "$RUN_DIR/origin.log" "$WORK/origin/error.log" 2>/dev/null)"
why=$(check_fetch http "${PORT[origin]}") || die "origin nginx: $why"
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
    rproxy)
        render "$HERE/rproxy.toml.in" "$WORK/rproxy.toml" rproxy
        cp "$WORK/rproxy.toml" "$RUN_DIR/rproxy.toml"
        # twistd in the foreground without a pidfile, from the repo root (as run.sh).
        pushd "$REPO_ROOT" >/dev/null
        start rproxy "$PROXY_CPU" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' \
            -n --pidfile= rproxy --config "$WORK/rproxy.toml"
        popd >/dev/null
        ;;
    esac
    STATE[$p]=ok
    REASON[$p]=""
done

for p in $PROXIES; do
    started "$p" || continue
    if why=$(check_fetch https "${PORT[$p]}"); then
        log "$p on 127.0.0.1:${PORT[$p]} (CPU $PROXY_CPU)"
    else
        fail "$p" "$why"
    fi
done

# --- load ------------------------------------------------------------------

# load OUT CMD...: CMD pinned to LOAD_CPU. In the background plus wait, so
# that a signal reaches our trap at once rather than after the run.
load() {
    local out=$1 rc=0
    shift
    taskset -c "$LOAD_CPU" "$@" >"$out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    return $rc
}

# measure NAME OUT CMD...: run the load, then append the wall-clock time and
# the proxy's CPU time over it as a BENCH_RUN line (report.py reads both).
measure() {
    local name=$1 out=$2 t0 t1 c0 c1 rc=0
    shift 2
    c0=$(cpu_ticks "$name")
    t0=$(now)
    load "$out" "$@" || rc=$?
    t1=$(now)
    c1=$(cpu_ticks "$name")
    echo "BENCH_RUN wall_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" \
        "proxy_cpu_s=$(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }')" \
        "rc=$rc" >>"$out"
    return $rc
}

drive() {  # drive NAME TEST ROUND
    local name=$1 test=$2 round=$3 out url
    out="$RUN_DIR/r$round-$test-$name"
    url="https://127.0.0.1:${PORT[$name]}/1k.bin"
    case $test in
    ka)
        if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
            load "$out.warmup" wrk -t1 -c"$CONNS" -d"$WARMUP" --timeout "$WRK_TIMEOUT" "$url" || true
        fi
        log "round $round/$ROUNDS, $name: wrk -c$CONNS -d$DURATION over kept-alive TLS"
        measure "$name" "$out.wrk" wrk -t1 -c"$CONNS" -d"$DURATION" --timeout "$WRK_TIMEOUT" \
            --latency -s "$BENCH_DIR/wrk_report.lua" "$url" || log "$name: wrk exited with an error (see $out.wrk)"
        grep -h '^Requests/sec\|Non-2xx\|Socket errors' "$out.wrk" | sed 's/^/    /' >&2 || true
        ;;
    new | reuse)
        log "round $round/$ROUNDS, $name: openssl s_time -$test ${STIME_ARGS[*]} -time $STIME"
        measure "$name" "$out.stime" openssl s_time -connect "127.0.0.1:${PORT[$name]}" "-$test" \
            "${STIME_ARGS[@]}" -time "$STIME" ||
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
    echo "pinning=proxies on CPU $PROXY_CPU; origin nginx, wrk and openssl s_time on CPU $LOAD_CPU"
    echo "load=load average $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    warm="after a $WARMUP warm-up"
    [[ $WARMUP == 0 || $WARMUP == 0s ]] && warm="no warm-up"
    echo "runs=$ROUNDS round(s): wrk $DURATION ($warm), s_time ${STIME}s, per proxy and test, interleaved"
    echo "stime=openssl s_time ${STIME_ARGS[*]}: TLS $STIME_TLS$([[ $STIME_TLS == 1.3 ]] && echo ", one GET /1k.bin per connection" || echo ", handshake and close")"
    echo "certificate=self-signed, $([[ $KEY_TYPE == ec ]] && echo "ECDSA P-256" || echo "RSA 2048") key"
    echo "versions=$(nginx -v 2>&1 | sed 's/.*version: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(openssl version | cut -d' ' -f1-2), $("$PYTHON" -c 'import sys, twisted; print("Python %d.%d.%d" % sys.version_info[:3], "Twisted", twisted.__version__)'), rproxy at $REV"
    echo "proxies=$PROXIES"
    echo "tests=$TESTS"
    echo "conns=$CONNS"
    echo "stime_tls=$STIME_TLS"
} >"$RUN_DIR/meta.txt"

"$PYTHON" "$HERE/report.py" "$RUN_DIR" --pick "$PICK" >"$RUN_DIR/summary.txt"
cp "$RUN_DIR/summary.txt" "$RESULTS_DIR/tls-latest.txt"
echo
cat "$RESULTS_DIR/tls-latest.txt"
log "raw output in $RUN_DIR; table in $RESULTS_DIR/tls-latest.txt"
