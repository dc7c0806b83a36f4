#!/usr/bin/env bash
# Raw TCP benchmark (issue 4): MiB/s of one 1 GiB stream through rproxy's
# `protocol = "tcp"` listener, HAProxy `mode tcp`, the nginx `stream` module
# and twisted.protocols.portforward, plain both ways and TLS-terminated, on
# 127.0.0.1 only. Proxies run on one core, the load generator and backend
# (bench/tcp/load.py) on the other. See "Raw TCP" in bench/README.md.
#
#   bench/tcp.sh                                    # all proxies and cases, 3 rounds
#   PROXIES="rproxy haproxy" CASES="up down" ROUNDS=1 bench/tcp.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
HERE=$BENCH_DIR/tcp
export PATH="$PATH:/usr/sbin:/sbin"

PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}   # made by check_setup when missing
PROXIES=${PROXIES:-"haproxy nginx portforward rproxy"}
CASES=${CASES:-"up down tls-up tls-down"}
ROUNDS=${ROUNDS:-3}
BYTES=${BYTES:-1073741824}      # per run: 1 GiB
DIRECT=${DIRECT:-1}             # 0: no direct-to-backend baseline rows
PROXY_CPU=${PROXY_CPU:-0}       # the proxies
LOAD_CPU=${LOAD_CPU:-1}         # load generator and backend
START_TIMEOUT=${START_TIMEOUT:-20}  # seconds for a process to start listening
RUN_TIMEOUT=${RUN_TIMEOUT:-60}  # seconds a run may go without progress
PAUSE=${PAUSE:-0.5}             # seconds of rest before each run
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}

log() { printf '[tcp-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for p in $PROXIES; do
    case $p in
    haproxy | nginx | portforward | rproxy) ;;
    *) die "unknown proxy '$p' in PROXIES (haproxy nginx portforward rproxy)" ;;
    esac
done
for c in $CASES; do
    case $c in
    up | down | tls-up | tls-down) ;;
    *) die "unknown case '$c' in CASES (up down tls-up tls-down)" ;;
    esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $BYTES =~ ^[1-9][0-9]*$ ]] || die "BYTES must be a positive integer"

# --- processes, cleanup ----------------------------------------------------

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d /tmp/rproxy-tcpbench.XXXXXX)
RUN_DIR=$RESULTS_DIR/tcp-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
source "$BENCH_DIR/lib.sh"   # cleanup on exit, start, alive, wait_listening
check_setup "haproxy nginx openssl taskset" twisted
# Debian's nginx builds the stream module as a separate package.
[[ -e $NGINX_STREAM_MODULE ]] || install_packages libnginx-mod-stream
[[ -e $NGINX_STREAM_MODULE ]] || die "no $NGINX_STREAM_MODULE after installing libnginx-mod-stream (set NGINX_STREAM_MODULE)"
declare -A STATE=() REASON=() WATCH=()


# proc_kib PID FIELD: a field of /proc/PID/status (VmRSS, VmHWM) in KiB.
proc_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

# --- which instances -------------------------------------------------------

# Each proxy runs as two instances: NAME for the plain cases and NAME-tls for
# the TLS ones, so that the plain instance's peak RSS (VmHWM) covers plain
# traffic only. portforward has no TLS.
want_plain=0 want_tls=0
for c in $CASES; do
    [[ $c == tls-* ]] && want_tls=1 || want_plain=1
done
INSTANCES=()
for p in $PROXIES; do
    ((want_plain)) && INSTANCES+=("$p")
    ((want_tls)) && [[ $p != portforward ]] && INSTANCES+=("$p-tls")
done
((${#INSTANCES[@]})) || die "nothing to run: no proxy serves the cases in CASES"

# Free ports from the kernel, all held open at once so they differ.
read -r -a ports <<<"$("$PYTHON" - "${#INSTANCES[@]}" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
for i in "${!INSTANCES[@]}"; do
    PORT[${INSTANCES[$i]}]=${ports[$i]}
done

# --- certificate and backend -----------------------------------------------

# One self-signed P-256 certificate for localhost and 127.0.0.1, used by every
# TLS listener; the client trusts it as its CA.
CERT=$WORK/cert.pem KEY=$WORK/key.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$KEY" -out "$CERT" >"$RUN_DIR/openssl.log" 2>&1 ||
    die "openssl could not make a certificate: $(tail -3 "$RUN_DIR/openssl.log")"
cat "$CERT" "$KEY" >"$WORK/cert+key.pem"   # HAProxy wants both in one file

start backend "$LOAD_CPU" "$PYTHON" "$HERE/load.py" serve --port-file "$WORK/backend.ports" \
    --tls-cert "$CERT" --tls-key "$KEY"
for ((i = 0; i < START_TIMEOUT * 10; i++)); do
    [[ -s $WORK/backend.ports ]] && break
    alive backend || break
    sleep 0.1
done
[[ -s $WORK/backend.ports ]] || die "backend did not start: $(last_error "$RUN_DIR/backend.log")"
read -r SINK SINK_TLS <"$WORK/backend.ports"
log "backend on 127.0.0.1:$SINK (plain) and :$SINK_TLS (TLS, for the direct-tls baseline), CPU $LOAD_CPU"

# --- proxies ---------------------------------------------------------------

rproxy_config() {  # INSTANCE FILE
    {
        echo "# Generated by bench/tcp.sh"
        echo "[server]"
        echo 'access_log = "off"'
        echo
        echo "[[listen]]"
        echo "endpoint = \"tcp:${PORT[$1]}:interface=127.0.0.1\""
        echo 'protocol = "tcp"'
        echo 'pool = "p"'
        [[ $1 == *-tls ]] && echo 'tls = "t"'
        echo
        echo "[pool.p]"
        echo "backends = [\"tcp:127.0.0.1:$SINK\"]"
        if [[ $1 == *-tls ]]; then
            echo
            echo "[tls.t]"
            echo "certificates = [{ cert = \"$CERT\", key = \"$KEY\" }]"
        fi
    } >"$2"
}

# One thread, no log line, HAProxy's defaults otherwise (16 KiB buffers, no
# splice).
haproxy_config() {  # INSTANCE FILE
    local ssl=""
    [[ $1 == *-tls ]] && ssl=" ssl crt $WORK/cert+key.pem"
    cat >"$2" <<EOF
# Generated by bench/tcp.sh
global
    nbthread 1
    maxconn 1024

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bench
    bind 127.0.0.1:${PORT[$1]}$ssl
    default_backend sink

backend sink
    server sink 127.0.0.1:$SINK
EOF
}

# One worker, the stream module's defaults otherwise (16 KiB proxy buffer),
# but TLS 1.3 allowed as in the others.
nginx_config() {  # INSTANCE FILE
    local dir=$WORK/$1 user="" ssl="" certs=""
    mkdir -p "$dir"
    # As root, nginx would switch its worker to a user who cannot read our
    # mktemp directory; stay root instead (loopback-only, throwaway config).
    [[ $EUID -eq 0 ]] && user="user root;"
    if [[ $1 == *-tls ]]; then
        ssl=" ssl"
        # nginx 1.22 offers only up to TLS 1.2 unless told; the others use 1.3.
        certs="ssl_certificate $CERT; ssl_certificate_key $KEY; ssl_protocols TLSv1.2 TLSv1.3;"
    fi
    cat >"$2" <<EOF
# Generated by bench/tcp.sh
load_module $NGINX_STREAM_MODULE;
$user
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;

events {
    worker_connections 1024;
}

stream {
    server {
        listen 127.0.0.1:${PORT[$1]}$ssl;
        $certs
        proxy_pass 127.0.0.1:$SINK;
    }
}
EOF
}

for inst in "${INSTANCES[@]}"; do
    case $inst in
    rproxy | rproxy-tls)
        rproxy_config "$inst" "$WORK/$inst.toml"
        # twistd in the foreground, without a pidfile, from the repo root so
        # that twisted/plugins is found even before `pip install -e`.
        pushd "$REPO_ROOT" >/dev/null
        start "$inst" "$PROXY_CPU" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' \
            -n --pidfile= rproxy --config "$WORK/$inst.toml"
        popd >/dev/null
        ;;
    haproxy | haproxy-tls)
        haproxy_config "$inst" "$WORK/$inst.cfg"
        start "$inst" "$PROXY_CPU" haproxy -db -f "$WORK/$inst.cfg"
        ;;
    nginx | nginx-tls)
        nginx_config "$inst" "$WORK/$inst.conf"
        start "$inst" "$PROXY_CPU" nginx -p "$WORK/$inst/" -c "$WORK/$inst.conf" -e "$WORK/$inst/error.log"
        ;;
    portforward)
        start "$inst" "$PROXY_CPU" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' \
            -n --pidfile= portforward -p "tcp:${PORT[$inst]}:interface=127.0.0.1" \
            -h 127.0.0.1 -d "$SINK"
        ;;
    esac
    STATE[$inst]=ok
    REASON[$inst]=""
done

# client OUT PORT DIR BYTES TLS WATCH_PID: one load.py run pinned to LOAD_CPU.
# In the background plus wait, so that a signal reaches our trap at once.
client() {
    local out=$1 port=$2 dir=$3 bytes=$4 tls=$5 watch=$6 rc=0
    local args=(run --port "$port" --dir "$dir" --bytes "$bytes" --timeout "$RUN_TIMEOUT")
    [[ $tls == 1 ]] && args+=(--tls --cafile "$CERT")
    [[ -n $watch ]] && args+=(--watch-pid "$watch")
    args+=(--core "$PROXY_CPU" --core "$LOAD_CPU")
    taskset -c "$LOAD_CPU" "$PYTHON" "$HERE/load.py" "${args[@]}" >"$out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    return $rc
}

for inst in "${INSTANCES[@]}"; do
    started "$inst" || continue
    # The process that moves the bytes: nginx's worker, not its master.
    WATCH[$inst]=${PID[$inst]}
    if [[ $inst == nginx* ]]; then
        WATCH[$inst]=$(pgrep -P "${PID[$inst]}" | head -n 1 || true)
        [[ -n ${WATCH[$inst]} ]] || { fail "$inst" "no worker process"; continue; }
    fi
    # A 1 MiB check each way before anything is measured.
    tls=0
    [[ $inst == *-tls ]] && tls=1
    for dir in up down; do
        if ! client "$RUN_DIR/check-$inst-$dir.out" "${PORT[$inst]}" "$dir" 1048576 "$tls" ""; then
            fail "$inst" "1 MiB $dir check: $(tail -n 1 "$RUN_DIR/check-$inst-$dir.out")"
            continue 2
        fi
    done
    log "$inst on 127.0.0.1:${PORT[$inst]} (CPU $PROXY_CPU, pid ${WATCH[$inst]})"
done

# RSS of each plain instance once it has served the checks, before the runs.
for inst in "${INSTANCES[@]}"; do
    [[ $inst != *-tls && ${STATE[$inst]} == ok ]] || continue
    printf '%s\t%s\n' "$inst" "$(proc_kib "${WATCH[$inst]}" VmRSS)" >>"$RUN_DIR/rss-idle.tsv"
done

# --- runs ------------------------------------------------------------------

# Interleaved: round 1 runs every case through every proxy, then round 2...
printf 'round\tcase\tproxy\tmibps\tseconds\tcpu\tbusy\tcipher\n' >"$RUN_DIR/runs.tsv"
for ((round = 1; round <= ROUNDS; round++)); do
    for c in $CASES; do
        dir=${c#tls-}
        tls=0
        [[ $c == tls-* ]] && tls=1
        rows=()
        ((DIRECT)) && rows+=(direct)
        rows+=($PROXIES)
        for p in "${rows[@]}"; do
            if [[ $p == direct ]]; then
                inst=direct port=$SINK watch=""
                ((tls)) && port=$SINK_TLS
            else
                inst=$p
                ((tls)) && inst=$p-tls
                [[ -n ${STATE[$inst]:-} ]] || continue   # portforward has no TLS
                [[ ${STATE[$inst]} == ok ]] || continue
                if ! alive "$inst"; then
                    fail "$inst" "died during the run (see $RUN_DIR/$inst.log)"
                    continue
                fi
                port=${PORT[$inst]} watch=${WATCH[$inst]}
            fi
            out=$RUN_DIR/r$round-$c-$p.out
            sleep "$PAUSE"
            if client "$out" "$port" "$dir" "$BYTES" "$tls" "$watch"; then
                line=$(grep '^RESULT' "$out")
                get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$c" "$p" "$(get mibps)" \
                    "$(get seconds)" "$(get cpu)" "$(get busy)" "$(get cipher)" >>"$RUN_DIR/runs.tsv"
                log "round $round/$ROUNDS, $c, $p: $(get mibps) MiB/s (proxy CPU $(get cpu)%, cores busy $(get busy)%)"
            else
                printf '%s\t%s\t%s\terror\t-\t-\t-\t-\n' "$round" "$c" "$p" >>"$RUN_DIR/runs.tsv"
                log "round $round/$ROUNDS, $c, $p: ERROR: $(tail -n 1 "$out")"
            fi
        done
    done
done

# Peak RSS of each plain instance: VmHWM, which covers the plain runs only.
for inst in "${INSTANCES[@]}"; do
    [[ $inst != *-tls && ${STATE[$inst]} == ok ]] && alive "$inst" || continue
    printf '%s\t%s\t%s\n' "$inst" "$(proc_kib "${WATCH[$inst]}" VmHWM)" \
        "$(proc_kib "${WATCH[$inst]}" VmRSS)" >>"$RUN_DIR/rss-peak.tsv"
done

# --- report ----------------------------------------------------------------

for inst in "${INSTANCES[@]}"; do
    printf '%s\t%s\t%s\n' "$inst" "${STATE[$inst]}" "${REASON[$inst]}"
done >"$RUN_DIR/status.tsv"

{
    echo "date=$(date '+%Y-%m-%d %H:%M %Z')"
    echo "machine=$(uname -n), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)"
    echo "load_start=$LOAD_AT_START"
    echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "haproxy=$(haproxy -v 2>/dev/null | head -n 1 | awk '{print $3}')"
    echo "nginx=$(nginx -v 2>&1 | sed 's|.*nginx/||')"
    echo "python=$("$PYTHON" -c 'import platform; print(platform.python_version())')"
    echo "twisted=$("$PYTHON" -c 'import twisted; print(twisted.__version__)')"
    echo "bytes=$BYTES"
    echo "rounds=$ROUNDS"
    echo "proxy_cpu=$PROXY_CPU"
    echo "load_cpu=$LOAD_CPU"
} >"$RUN_DIR/meta.txt"

"$PYTHON" "$HERE/report.py" "$RUN_DIR" | tee "$RUN_DIR/summary.txt"
cp "$RUN_DIR/summary.txt" "$RESULTS_DIR/tcp-latest.txt"
log "results in $RUN_DIR (table also in $RESULTS_DIR/tcp-latest.txt)"
