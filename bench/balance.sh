#!/usr/bin/env bash
# Balancing and failover benchmark (issue 5): rproxy and HAProxy in front of
# three static nginx origins, on 127.0.0.1 only.
#
#  1. requests/s for each balancing rule (rproxy's round_robin, least_conn,
#     random2, hash:client_ip, hash:header:X-User, cookie:srv, next to
#     HAProxy's roundrobin, leastconn, random(2), source, hdr(X-User) and
#     cookie insert), with how the requests spread over the origins;
#  2. a failover run: wrk for FAIL_SECONDS while origin o2 is killed (SIGKILL)
#     at FAIL_STOP_AT and started again at FAIL_START_AT: non-2xx responses,
#     socket errors and p99, per proxy.
#
# Proxies run on PROXY_CPU, origins and wrk on LOAD_CPU. Both proxies get the
# same active health checks (HTTP GET /healthz every HEALTH_INTERVAL_MS,
# HEALTH_TIMEOUT_MS timeout, rise HEALTH_RISE, fall HEALTH_FALL).
# See "Balancing and failover" in bench/README.md.
#
#   bench/balance.sh
#   RULES="round_robin cookie:srv" DURATION=5s FAILOVER=0 bench/balance.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
HERE=$BENCH_DIR/balance
export PATH="$PATH:/usr/sbin:/sbin"

PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}   # made by check_setup when missing
RULES=${RULES-"round_robin least_conn random2 hash:client_ip hash:header:X-User cookie:srv"}
PROXIES=${PROXIES:-"rproxy haproxy"}
DURATION=${DURATION:-10s}        # measured part of each rule's wrk run
WARMUP=${WARMUP:-2s}             # unmeasured run just before it; 0 to skip
ROUNDS=${ROUNDS:-1}
PICK=${PICK:-best}               # best | median round per proxy and rule
CONNS=${CONNS:-50}               # wrk connections (1 thread)
USERS=${USERS:-256}              # distinct X-User values for hash:header
WRK_TIMEOUT=${WRK_TIMEOUT:-5s}
FILE=${FILE:-1k.bin}             # 1k.bin (1 KiB) is what each request fetches
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
START_TIMEOUT=${START_TIMEOUT:-20}
HEALTH_INTERVAL_MS=${HEALTH_INTERVAL_MS:-500}
HEALTH_TIMEOUT_MS=${HEALTH_TIMEOUT_MS:-500}
HEALTH_RISE=${HEALTH_RISE:-2}
HEALTH_FALL=${HEALTH_FALL:-2}
FAILOVER=${FAILOVER:-1}          # 0 to skip the failover runs
FAIL_SECONDS=${FAIL_SECONDS:-10}
FAIL_STOP_AT=${FAIL_STOP_AT:-3}
FAIL_START_AT=${FAIL_START_AT:-6}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}

log() { printf '[balance %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for p in $PROXIES; do
    [[ $p == rproxy || $p == haproxy ]] || die "unknown proxy '$p' in PROXIES (rproxy haproxy)"
done
for r in $RULES; do
    case $r in
    round_robin | least_conn | random2 | hash:client_ip | hash:header:?* | cookie:?*) ;;
    *) die "unknown rule '$r' in RULES" ;;
    esac
done
((FAIL_STOP_AT < FAIL_START_AT && FAIL_START_AT < FAIL_SECONDS)) ||
    die "need FAIL_STOP_AT < FAIL_START_AT < FAIL_SECONDS"

# --- tools -----------------------------------------------------------------

source "$BENCH_DIR/setup.sh"   # check_setup
check_setup "nginx haproxy wrk curl taskset" rproxy_tw

# --- processes, cleanup ----------------------------------------------------

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
COMMIT_AT_START=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO_ROOT" diff --quiet HEAD -- rproxy_tw 2>/dev/null || COMMIT_AT_START+=" (rproxy_tw modified)"
WORK=$(mktemp -d /tmp/rproxy-balance.XXXXXX)
RUN_DIR=$RESULTS_DIR/balance-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
declare -A LIVE=()       # pid -> name, of every process we started and have not reaped
declare -A PID=() PORT=()
LOAD_PID=""              # the wrk running now, if any
KILLER_PID=""            # the failover timeline subshell, if any

cleanup() {
    local pid children=() i alive
    trap - EXIT INT TERM
    [[ -z $KILLER_PID ]] || kill -TERM "$KILLER_PID" 2>/dev/null || true
    [[ -z $LOAD_PID ]] || kill -TERM "$LOAD_PID" 2>/dev/null || true
    for pid in "${!LIVE[@]}"; do
        children+=($(pgrep -P "$pid" 2>/dev/null || true))
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "${!LIVE[@]}" "${children[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${!LIVE[@]}" "${children[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CPU LOG CMD...: CMD in the background, pinned to CPU.
start() {
    local name=$1 cpu=$2 out=$3
    shift 3
    taskset -c "$cpu" "$@" >>"$out" 2>&1 &
    PID[$name]=$!
    LIVE[$!]=$name
}

# stop NAME [SIGNAL]: signal the process (nginx: and its workers), reap it.
stop() {
    local name=$1 sig=${2:-TERM} pid=${PID[$1]} i kids
    kids=$(pgrep -P "$pid" 2>/dev/null || true)
    kill "-$sig" "$pid" $kids 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" $kids 2>/dev/null || true
    { wait "$pid"; } 2>/dev/null || true
    unset "LIVE[$pid]"
}

alive() { kill -0 "${PID[$1]}" 2>/dev/null; }

wait_listening() {  # NAME
    local name=$1 deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        alive "$name" || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/${PORT[$name]}") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# served PORT: "o1 o2 o3 ..." origins seen in 12 GETs (X-Origin), sorted, unique.
served() {
    local i
    for ((i = 0; i < 12; i++)); do
        curl --noproxy '*' -s --max-time 5 -o /dev/null -D - "http://127.0.0.1:$1/$FILE" |
            tr -d '\r' | awk 'tolower($1) == "x-origin:" { print $2 }'
    done | sort -u | tr '\n' ' '
}

# wait_all_origins PORT: until round-robin GETs reach all three origins.
wait_all_origins() {
    local deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        [[ $(served "$1") == "o1 o2 o3 " ]] && return 0
        sleep 0.2
    done
    return 1
}

# counts: "o1=N o2=N o3=N", requests each origin has served (stub_status).
counts() {
    local o n out=()
    for o in o1 o2 o3; do
        n=$(curl --noproxy '*' -s --max-time 5 "http://127.0.0.1:${PORT[$o]}/nginx-status" |
            awk 'NR == 3 { print $3 }') || true
        out+=("$o=${n:-0}")
    done
    echo "${out[*]}"
}

render_origin() {  # NAME
    local dir=$WORK/$1 user=""
    [[ $EUID -eq 0 ]] && user="user root;"
    mkdir -p "$dir/tmp"
    sed -e "s|@DIR@|$dir|g" -e "s|@WWW@|$WORK/www|g" -e "s|@USER@|$user|g" \
        -e "s|@PORT@|${PORT[$1]}|g" -e "s|@NAME@|$1|g" \
        "$HERE/origin-nginx.conf.in" >"$WORK/$1.conf"
}

start_origin() {  # NAME
    start "$1" "$LOAD_CPU" "$RUN_DIR/$1.log" nginx -p "$WORK/$1/" -c "$WORK/$1.conf" -e "$WORK/$1/error.log"
}

seconds() { awk -v ms="$1" 'BEGIN { printf "%g", ms / 1000 }'; }

# rproxy_config RULE FILE [PASSIVE]: PASSIVE "off" disables passive outlier
# detection (HAProxy has none unless configured); otherwise its defaults.
rproxy_config() {
    cat >"$2" <<EOF
# Generated by bench/balance.sh
[server]
access_log = "off"

[[listen]]
endpoint = "tcp:${PORT[rproxy]}:interface=127.0.0.1"

[[route]]
path = "/"
pool = "web"

[pool.web]
backends = ["tcp:127.0.0.1:${PORT[o1]}", "tcp:127.0.0.1:${PORT[o2]}", "tcp:127.0.0.1:${PORT[o3]}"]
balance = "$1"

[pool.web.health]
type = "http"
path = "/healthz"
interval = $(seconds "$HEALTH_INTERVAL_MS")
timeout = $(seconds "$HEALTH_TIMEOUT_MS")
rise = $HEALTH_RISE
fall = $HEALTH_FALL
EOF
    if [[ ${3:-on} == off ]]; then
        printf '\n[pool.web.passive]\nenabled = false\n' >>"$2"
    fi
}

# haproxy_config RULE FILE: the HAProxy equivalent of an rproxy rule.
haproxy_config() {
    local balance hash="" cookie="" o
    case $1 in
    round_robin) balance=roundrobin ;;
    least_conn) balance=leastconn ;;
    random2) balance="random(2)" ;;
    hash:client_ip) balance=source hash="hash-type consistent" ;;
    hash:header:*) balance="hdr(${1#hash:header:})" hash="hash-type consistent" ;;
    cookie:*) balance=roundrobin cookie="cookie ${1#cookie:} insert indirect nocache" ;;
    esac
    {
        cat <<EOF
# Generated by bench/balance.sh. One thread; no "log" line, so nothing is
# logged but server state changes on stderr.
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    timeout check ${HEALTH_TIMEOUT_MS}ms
    http-reuse always
    # As rproxy: retry a failed connection, or an idempotent request that got
    # no answer, on another server (rproxy: retries = 2).
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response response-timeout

frontend bench
    bind 127.0.0.1:${PORT[haproxy]}
    default_backend web

backend web
    balance $balance
    $hash
    $cookie
    option httpchk GET /healthz
    default-server check inter ${HEALTH_INTERVAL_MS}ms rise $HEALTH_RISE fall $HEALTH_FALL
EOF
        for o in o1 o2 o3; do
            if [[ -n $cookie ]]; then
                echo "    server $o 127.0.0.1:${PORT[$o]} cookie $o"
            else
                echo "    server $o 127.0.0.1:${PORT[$o]}"
            fi
        done
    } >"$2"
}

# start_proxy PROXY RULE LOG [PASSIVE]: start it with the rule, wait until
# all origins answer.
start_proxy() {
    local p=$1 rule=$2 out=$3 slug=${2//:/-}
    case $p in
    rproxy)
        rproxy_config "$rule" "$WORK/rproxy-$slug.toml" "${4:-on}"
        # twist (python -m twisted) runs in the foreground with no pidfile.
        pushd "$REPO_ROOT" >/dev/null
        start rproxy "$PROXY_CPU" "$out" "$PYTHON" -m twisted --log-format text rproxy --config "$WORK/rproxy-$slug.toml"
        popd >/dev/null
        ;;
    haproxy)
        haproxy_config "$rule" "$WORK/haproxy-$slug.cfg"
        start haproxy "$PROXY_CPU" "$out" haproxy -db -f "$WORK/haproxy-$slug.cfg"
        ;;
    esac
    wait_listening "$p" || { log "$p ($rule) did not start: see $out"; return 1; }
    # The cookie rule sends cookie-less requests round robin, so this check
    # works for it too; hash rules send one client to one origin, so they
    # only need an answer.
    case $rule in
    hash:*)
        [[ -n $(served "${PORT[$p]}") ]] || { log "$p ($rule) does not answer: see $out"; return 1; } ;;
    *)
        wait_all_origins "${PORT[$p]}" || { log "$p ($rule) does not reach all origins: see $out"; return 1; } ;;
    esac
}

# load OUT WRK_ARGS...: wrk pinned to LOAD_CPU, interruptible.
load() {
    local out=$1 rc=0
    shift
    taskset -c "$LOAD_CPU" wrk "$@" >"$out" 2>&1 &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    return $rc
}

# wrk_args RULE PORT: the script arguments that make the traffic fit the rule.
script_args() {
    local rule=$1 port=$2 name values
    case $rule in
    hash:header:*) echo "users $USERS" ;;
    cookie:*)
        # Learn each origin's sticky cookie from cookie-less requests, then
        # send every request with one of them, in turn (returning visitors).
        name=${rule#cookie:}
        values=$(for ((i = 0; i < 12; i++)); do
            curl --noproxy '*' -s --max-time 5 -o /dev/null -D - "http://127.0.0.1:$port/$FILE" |
                tr -d '\r' | sed -n "s/^[Ss]et-[Cc]ookie: *$name=\([^;]*\).*/\1/p"
        done | sort -u | tr '\n' ' ')
        echo "cookies $name $values"
        ;;
    *) echo "plain" ;;
    esac
}

# --- ports, origins ----------------------------------------------------------

read -r -a ports <<<"$("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
PORT[o1]=${ports[0]} PORT[o2]=${ports[1]} PORT[o3]=${ports[2]}
PORT[rproxy]=${ports[3]} PORT[haproxy]=${ports[4]}

mkdir -p "$WORK/www"
head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
echo ok >"$WORK/www/healthz"
for o in o1 o2 o3; do
    render_origin "$o"
    start_origin "$o"
    wait_listening "$o" || die "origin $o did not start: $(tail -3 "$RUN_DIR/$o.log" "$WORK/$o/error.log" 2>/dev/null)"
done
log "origins o1 o2 o3 on 127.0.0.1:${PORT[o1]} ${PORT[o2]} ${PORT[o3]} (CPU $LOAD_CPU)"

# --- 1. each rule ------------------------------------------------------------

for ((round = 1; round <= ROUNDS; round++)); do
    for rule in $RULES; do
        slug=${rule//:/-}
        for p in $PROXIES; do
            base=$RUN_DIR/r$round-$slug-$p
            if ! start_proxy "$p" "$rule" "$base.log"; then
                echo "FAILED" >"$base.wrk"
                stop "$p"
                continue
            fi
            url="http://127.0.0.1:${PORT[$p]}/$FILE"
            read -r -a sargs <<<"$(script_args "$rule" "${PORT[$p]}")"
            if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
                load "$base.warmup" -t1 -c"$CONNS" -d"$WARMUP" --timeout "$WRK_TIMEOUT" \
                    -s "$HERE/wrk.lua" "$url" -- "${sargs[@]}" || true
            fi
            before=$(counts)
            log "round $round/$ROUNDS, $rule, $p: wrk -c$CONNS -d$DURATION ${sargs[*]}"
            load "$base.wrk" -t1 -c"$CONNS" -d"$DURATION" --timeout "$WRK_TIMEOUT" --latency \
                -s "$HERE/wrk.lua" "$url" -- "${sargs[@]}" || log "$p: wrk failed (see $base.wrk)"
            echo "before $before" >"$base.dist"
            echo "after $(counts)" >>"$base.dist"
            grep -h '^Requests/sec\|Non-2xx\|Socket errors' "$base.wrk" | sed 's/^/    /' >&2 || true
            stop "$p"
        done
    done
done

# --- 2. failover ---------------------------------------------------------------

# rproxy runs twice: with its defaults (passive outlier detection on: five
# failures in a row eject a backend for 10 s) and with passive detection off,
# as HAProxy has none unless configured.
if ((FAILOVER)); then
    runs=()
    for p in $PROXIES; do
        [[ $p == rproxy ]] && runs+=(rproxy rproxy-nopassive) || runs+=("$p")
    done
    for label in "${runs[@]}"; do
        p=${label%-nopassive}
        passive=on
        [[ $label == *-nopassive ]] && passive=off
        base=$RUN_DIR/failover-$label
        if ! start_proxy "$p" round_robin "$base.log" "$passive"; then
            echo "FAILED" >"$base.wrk"
            stop "$p"
            continue
        fi
        url="http://127.0.0.1:${PORT[$p]}/$FILE"
        log "failover, $label: wrk -c$CONNS -d${FAIL_SECONDS}s; o2 killed at ${FAIL_STOP_AT}s, started at ${FAIL_START_AT}s"
        echo "before $(counts)" >"$base.dist"
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${FAIL_SECONDS}s" --timeout "$WRK_TIMEOUT" --latency \
            -s "$HERE/wrk.lua" "$url" >"$base.wrk" 2>&1 &
        LOAD_PID=$!
        t0=$SECONDS
        sleep "$FAIL_STOP_AT"
        stop o2 KILL
        echo "o2 killed at $((SECONDS - t0))s" >"$base.events"
        sleep "$((FAIL_START_AT - FAIL_STOP_AT))"
        start_origin o2
        wait_listening o2 || log "o2 did not restart"
        echo "o2 started at $((SECONDS - t0))s" >>"$base.events"
        wait "$LOAD_PID" || log "$p: wrk failed (see $base.wrk)"
        LOAD_PID=""
        # The restarted o2 counts from zero: what it served after its return.
        echo "after $(counts)" >>"$base.dist"
        grep -h '^Requests/sec\|Non-2xx\|Socket errors' "$base.wrk" | sed 's/^/    /' >&2 || true
        stop "$p"
        grep -iE 'of pool web (down|up)|is (DOWN|UP)' "$base.log" | sed 's/^/    /' >&2 || true
    done
fi

# --- report --------------------------------------------------------------------

{
    echo "date=$(date '+%Y-%m-%d %H:%M %Z')"
    echo "commit=$COMMIT_AT_START"
    echo "machine=$(uname -n), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)"
    echo "pinning=proxy on CPU $PROXY_CPU; three origin nginx and wrk on CPU $LOAD_CPU"
    echo "load=load average $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    echo "runs=$ROUNDS round(s) x $DURATION per proxy and rule (warm-up $WARMUP), wrk -t1 -c$CONNS GET /$FILE"
    echo "health=GET /healthz every ${HEALTH_INTERVAL_MS}ms, timeout ${HEALTH_TIMEOUT_MS}ms, rise $HEALTH_RISE, fall $HEALTH_FALL"
    echo "failover=${FAIL_SECONDS}s run, o2 SIGKILLed at ${FAIL_STOP_AT}s and started at ${FAIL_START_AT}s"
    echo "versions=$(nginx -v 2>&1 | sed 's/.*version: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $("$PYTHON" -c 'import sys, twisted; print("Python %d.%d.%d" % sys.version_info[:3], "Twisted", twisted.__version__)')"
} >"$RUN_DIR/meta.txt"

"$PYTHON" "$HERE/report.py" "$RUN_DIR" --pick "$PICK" >"$RUN_DIR/summary.txt"
cp "$RUN_DIR/summary.txt" "$RESULTS_DIR/balance-latest.txt"
echo
cat "$RUN_DIR/summary.txt"
log "raw output in $RUN_DIR; table in $RESULTS_DIR/balance-latest.txt"
