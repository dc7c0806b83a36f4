#!/usr/bin/env bash
# CPU time per new connection, kernel included, of nginx and rproxy (and a base tree): each proxy
# pinned to PROXY_CPU in front of the nginx origin, wrk (LOAD_CPU) opening a new connection per
# request (`Connection: close`, TLS for close-tls), the proxy's user + system CPU time (/proc; the
# nginx worker's) divided by the requests served. A busy shared machine lowers req/s far more than
# the CPU a connection takes, so the ratios of these figures hold better than req/s ratios there
# (they are the req/s ratios of a proxy that has a core to itself). Rounds are interleaved.
#   bench/conn_cpu.sh                             # TESTS="close-tls close" ROUNDS=3 LOAD=5s
#   BASE_DIR=/tmp/rproxy-base bench/conn_cpu.sh   # adds "base": rproxy from another source tree
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
TESTS=${TESTS:-"close-tls close"}
ROUNDS=${ROUNDS:-3}
LOAD=${LOAD:-5s}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-30}
BASE_DIR=${BASE_DIR:-}
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d /tmp/rproxy-conn-cpu.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
PROXIES="nginx rproxy${BASE_DIR:+ base}"
start_origin_1k
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/key.pem" \
    -out "$WORK/cert.pem" -days 30 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
CIPHERS="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
declare -A TLS_PORT=() CPU_PID=()
for p in $PROXIES; do
    read -r PORT[$p] TLS_PORT[$p] <<<"$(free_ports 2)"
    tmpl=$BENCH_DIR/h2/rproxy.toml.in
    [[ $p == nginx ]] && tmpl=$BENCH_DIR/h2/proxy-nginx.conf.in
    user=""
    [[ $EUID -eq 0 ]] && user="user root;"
    mkdir -p "$WORK/$p/tmp"
    sed -e "s|@DIR@|$WORK/$p|g" -e "s|@USER@|$user|g" -e "s|@PORT@|${PORT[$p]}|g" -e "s|@TLS_PORT@|${TLS_PORT[$p]}|g" \
        -e "s|@ORIGIN_PORT@|${PORT[origin]}|g" -e "s|@CERT@|$WORK/cert.pem|g" -e "s|@KEY@|$WORK/key.pem|g" \
        -e "s|@CIPHERS@|$CIPHERS|g" "$tmpl" >"$WORK/$p.conf"
    if [[ $p == nginx ]]; then
        start nginx "$PROXY_CPU" nginx -p "$WORK/nginx/" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
    else
        src=$REPO_ROOT
        [[ $p == base ]] && src=$BASE_DIR
        pushd "$src" >/dev/null   # python -c: this tree's rproxy_tw comes first on sys.path
        start "$p" "$PROXY_CPU" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= rproxy \
            --config "$WORK/$p.conf"
        popd >/dev/null
    fi
    wait_listening "$p" || { echo "$p did not start (see $WORK/$p.log)" >&2; exit 1; }
    CPU_PID[$p]=${PID[$p]}
    if [[ $p == nginx ]]; then
        CPU_PID[$p]=$(pgrep -P "${PID[$p]}" | head -1)   # the one worker does the work
    fi
done
ticks=$(getconf CLK_TCK)
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A SUM_REQ=() SUM_TICKS=()
for ((r = 1; r <= ROUNDS; r++)); do
    for t in $TESTS; do
        for p in $PROXIES; do
            url="http://127.0.0.1:${PORT[$p]}/1k.bin"
            [[ $t == close-tls ]] && url="https://127.0.0.1:${TLS_PORT[$p]}/1k.bin"
            taskset -c "$LOAD_CPU" wrk -t1 -c50 -d1s -H 'Connection: close' "$url" >/dev/null 2>&1
            before=$(awk '{print $14 + $15}' "/proc/${CPU_PID[$p]}/stat")
            taskset -c "$LOAD_CPU" wrk -t1 -c50 -d"$LOAD" -H 'Connection: close' "$url" >"$WORK/wrk.$t.$p.$r" 2>&1
            used=$(( $(awk '{print $14 + $15}' "/proc/${CPU_PID[$p]}/stat") - before ))
            requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.$t.$p.$r")
            SUM_REQ[$t.$p]=$(( ${SUM_REQ[$t.$p]:-0} + requests ))
            SUM_TICKS[$t.$p]=$(( ${SUM_TICKS[$t.$p]:-0} + used ))
            printf 'round %d %-10s %-7s %7d requests %6.2f CPU s %8.1f us/connection\n' "$r" "$t" "$p" "$requests" \
                "$(echo "$used / $ticks" | bc -l)" "$(echo "$used * 1000000 / $ticks / $requests" | bc -l)"
        done
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %-7s %18s %12s\n' test proxy "CPU us/connection" "nginx/this"
for t in $TESTS; do
    ngx=$(echo "${SUM_TICKS[$t.nginx]} * 1000000 / $ticks / ${SUM_REQ[$t.nginx]}" | bc -l)
    for p in $PROXIES; do
        us=$(echo "${SUM_TICKS[$t.$p]} * 1000000 / $ticks / ${SUM_REQ[$t.$p]}" | bc -l)
        printf '%-10s %-7s %18.1f %11.2fx\n' "$t" "$p" "$us" "$(echo "$ngx / $us" | bc -l)"
    done
done
