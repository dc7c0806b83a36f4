#!/usr/bin/env bash
# Instructions per new connection in the real proxy process: `twistd rproxy` under callgrind, in
# front of an nginx origin, wrk opening a new connection for every request (`Connection: close`,
# plain or TLS; wrk never resumes a TLS session). Counting starts once the proxy listens and has
# answered a first request, and stops when wrk ends: the proxy's own instructions in user space
# (OpenSSL's handshake, the reactor's accept, reads, writes and close, the HTTP layer) divided by
# the requests wrk completed. The kernel's share is not counted. Load-independent, so source trees
# can be compared one after the other. Two connections at a time and a long timeout: under valgrind a
# queue of handshakes would time out in wrk, work done for no counted request.
#
#   bench/conn_cost_live.sh                              # this tree, TESTS="close close-tls"
#   bench/conn_cost_live.sh /tmp/tls-base .              # two trees, in that order
#   TESTS=close-tls LOAD=10s bench/conn_cost_live.sh
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
TESTS=${TESTS:-"close close-tls"}
LOAD=${LOAD:-8s}
START_TIMEOUT=${START_TIMEOUT:-120}
LOAD_CPU=${LOAD_CPU:-1}
export PATH="$PATH:/usr/sbin:/sbin" PYTHONHASHSEED=0
WORK=$(mktemp -d /tmp/rproxy-conn-live.XXXXXX)
RUN_DIR=$WORK
source "$BENCH_DIR/lib.sh"
check_setup "nginx wrk taskset valgrind" twisted
(($#)) || set -- "$REPO_ROOT"
start_origin_1k
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/key.pem" \
    -out "$WORK/cert.pem" -days 30 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null

printf '%-10s %-28s %12s %9s\n' test source "Ir/conn" requests
n=0
for src in "$@"; do
    src=$(cd "$src" && pwd)
    for t in $TESTS; do
        n=$((n + 1))
        v=p$n
        PORT[$v]=$(free_ports 1)
        tls="" scheme=http
        if [[ $t == close-tls ]]; then
            tls='tls = "bench"' scheme=https
        fi
        cat >"$WORK/$v.toml" <<EOF
[server]
access_log = "off"

[[listen]]
endpoint = "tcp:${PORT[$v]}:interface=127.0.0.1"
$tls

[tls.bench]
certificates = [{ cert = "$WORK/cert.pem", key = "$WORK/key.pem" }]

[[route]]
pool = "origin"

[pool.origin]
backends = ["tcp:127.0.0.1:${PORT[origin]}"]
EOF
        out=$WORK/cg.$v
        pushd "$src" >/dev/null   # python -c: this tree's rproxy_tw comes first on sys.path
        start "$v" 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
            "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= rproxy --config "$WORK/$v.toml"
        popd >/dev/null
        wait_listening "$v" || { echo "$v did not start (see $WORK/$v.log)" >&2; exit 1; }
        url="$scheme://127.0.0.1:${PORT[$v]}/1k.bin"
        curl -sk -o /dev/null -H 'Connection: close' "$url"   # first request: imports, the origin connection
        callgrind_control -i on "${PID[$v]}" >/dev/null 2>&1
        taskset -c "$LOAD_CPU" wrk -t1 -c2 --timeout 60s -d"$LOAD" -H 'Connection: close' "$url" >"$WORK/wrk.$v" 2>&1
        callgrind_control -i off "${PID[$v]}" >/dev/null 2>&1
        callgrind_control -d "${PID[$v]}" >/dev/null 2>&1
        kill -TERM "${PID[$v]}"
        wait "${PID[$v]}" 2>/dev/null || true
        requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.$v")
        ir=$(callgrind_total "$out")
        rev=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || cat "$src/.rev" 2>/dev/null || echo "?")
        printf '%-10s %-28s %12d %9d\n' "$t" "$(basename "$src")@$rev" "$((ir / requests))" "$requests"
    done
done
