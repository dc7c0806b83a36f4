# Shared by the bench scripts (sourced, not run): start pinned processes, wait for their
# ports, and stop everything on exit.  A script sets WORK, RUN_DIR and START_TIMEOUT first;
# it keeps the pids it starts in STARTED and the running load generator(s) in LOAD_PID.

declare -a STARTED=()    # every pid we started, for cleanup
declare -A PID=() PORT=()
LOAD_PID=""              # the load generator(s) running now, if any (pids, space-separated)

# check_setup, install_tools, install_packages, install_python
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

cleanup() {
    local pid children=() i alive
    trap - EXIT INT TERM
    [[ -z $LOAD_PID ]] || kill -TERM $LOAD_PID 2>/dev/null || true   # one pid, or several
    for pid in "${STARTED[@]}"; do
        # nginx masters have workers; remember them in case TERM is not enough.
        children+=($(pgrep -P "$pid" 2>/dev/null || true))
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "${STARTED[@]}" "${children[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${STARTED[@]}" "${children[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CPU CMD...: run CMD in the background pinned to CPU, output in
# $RUN_DIR/NAME.log, or in START_OUT when set (`START_OUT=FILE start ...`, e.g. for a
# process whose standard output is an access log too big to keep).
# (taskset execs CMD, so $! is CMD's own pid.)
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"${START_OUT:-$RUN_DIR/$name.log}" 2>&1 &
    PID[$name]=$!
    STARTED+=("$!")
}

alive() { kill -0 "${PID[$1]}" 2>/dev/null; }

# wait_listening NAME: until PORT[NAME] accepts connections, or the process
# dies, or START_TIMEOUT passes.
wait_listening() {
    local name=$1 deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        alive "$name" || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/${PORT[$name]}") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# started NAME: wait_listening NAME, and if it does not listen, mark NAME failed with why
# (the last error in its log, or the timeout) and return 1.
started() {
    local name=$1
    wait_listening "$name" && return 0
    if alive "$name"; then
        fail "$name" "not listening after ${START_TIMEOUT}s (see $RUN_DIR/$name.log)"
    else
        fail "$name" "did not start: $(last_error "$RUN_DIR/$name.log") (see $RUN_DIR/$name.log)"
    fi
    return 1
}

last_error() {
    local line
    line=$(grep -E '^(Error|\[ALERT\]|nginx: \[emerg\]|[[:alnum:]_.]+(Error|Exception)\b|/.*: [a-z_.]+(\[[0-9]+\])?[a-z_.]*: )' "$1" \
        2>/dev/null | tail -n 1) ||
        line=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1) || true
    printf '%s' "${line:0:160}"
}

fail() {  # fail NAME REASON
    STATE[$1]=failed
    REASON[$1]=$2
    log "$1: FAILED: $2"
    if alive "$1"; then kill -TERM "${PID[$1]}" 2>/dev/null || true; fi
}

# The two below serve run.sh and scrub.sh (origin files 1k.bin and 1m.bin; templates in bench/conf);
# a script with other files or templates defines its own after sourcing this one.

# check_fetch PORT [FILE:SIZE...]: each file (default both, 1k.bin:1024 1m.bin:1048576) comes
# back whole with a 200.
check_fetch() {
    local port=$1 file expect got
    shift
    (($#)) || set -- 1k.bin:1024 1m.bin:1048576
    for file in "$@"; do
        expect="200 ${file#*:}"
        got=$(curl --noproxy '*' -sS --max-time 10 -o /dev/null \
            -w '%{http_code} %{size_download}' "http://127.0.0.1:$port/${file%:*}" 2>&1) || true
        if [[ "$got" != "$expect" ]]; then
            echo "GET /${file%:*} gave '$got', expected '$expect'"
            return 1
        fi
    done
}

# render TEMPLATE OUT NAME: fill in a config template from bench/conf.
render() {
    local dir=$WORK/$3 user=""
    # As root, nginx would switch its workers to a user who cannot read our
    # mktemp directory; stay root instead (loopback-only, throwaway config).
    [[ $EUID -eq 0 ]] && user="user root;"
    mkdir -p "$dir/tmp"
    sed -e "s|@DIR@|$dir|g" -e "s|@WWW@|$WORK/www|g" -e "s|@USER@|$user|g" \
        -e "s|@PORT@|${PORT[$3]}|g" -e "s|@ORIGIN_PORT@|${PORT[origin]}|g" \
        "$BENCH_DIR/conf/$1" >"$2"
}

# rproxy_args KIND NAME: into the array RPROXY_ARGS, the flags beyond --listen and --backend of
# an rproxy variant, by the name run.sh's PROXIES gives it.  The variants measure what operations
# cost (issue 12): rproxy (request ids on, access log off), rproxy-log (the access log to the file
# $WORK/access-NAME.log), rproxy-stdout (the access log to standard output: `-`),
# rproxy-metrics (the admin listener, every request counted), rproxy-ops (file log and metrics);
# rproxy-w1/-w2: one process, or a supervisor and two workers.
declare -a RPROXY_ARGS=()
rproxy_args() {
    case $1 in
    rproxy) RPROXY_ARGS=(--access-log off) ;;
    rproxy-log) RPROXY_ARGS=(--access-log "$WORK/access-$2.log") ;;
    rproxy-stdout) RPROXY_ARGS=(--access-log -) ;;
    rproxy-metrics) RPROXY_ARGS=(--access-log off --admin tcp:0:interface=127.0.0.1) ;;
    rproxy-ops) RPROXY_ARGS=(--access-log "$WORK/access-$2.log" --admin tcp:0:interface=127.0.0.1) ;;
    rproxy-w1 | rproxy-w2) RPROXY_ARGS=(--access-log off --workers "${1#rproxy-w}") ;;
    *) echo "rproxy_args: unknown variant '$1'" >&2; return 1 ;;
    esac
}

# start_rproxy NAME CPU SRC ARGS...: `twistd -n rproxy ARGS` (in the foreground, without a
# pidfile) through start, with SRC's rproxy_tw: python -c puts the working directory first on
# sys.path, so it runs from SRC (and twisted/plugins is found even before `pip install -e`).
# (`python -m twisted` is twist, which takes no -n/--pidfile=; twistd has no __main__.)
start_rproxy() {
    local name=$1 cpu=$2 src=$3
    shift 3
    pushd "$src" >/dev/null
    start "$name" "$cpu" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= rproxy "$@"
    popd >/dev/null
}

# free_ports N: N free TCP ports on 127.0.0.1, asked of the kernel all held open at once so they differ.
free_ports() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# round_order ROUND: PROXIES in the order they run in that round: as given in odd rounds, reversed
# in even ones. A proxy's place in a round moved its figure by 5-8% on the bench machine (the one
# right after nginx did worse), which a fixed order turns into a bias of every A/B.
round_order() {
    local p order=""
    if (( $1 % 2 )); then
        echo "$PROXIES"
        return
    fi
    for p in $PROXIES; do order="$p $order"; done
    echo "$order"
}

# run_rounds: ROUNDS rounds of every test of TESTS on every proxy of PROXIES still ok,
# interleaved (in round_order), each through the script's own drive PROXY TEST ROUND.
run_rounds() {
    local round test p
    for ((round = 1; round <= ROUNDS; round++)); do
        for test in $TESTS; do
            for p in $(round_order "$round"); do
                [[ ${STATE[$p]} == ok ]] || continue
                if ! alive "$p"; then
                    fail "$p" "died during the run (see $RUN_DIR/$p.log)"
                    continue
                fi
                drive "$p" "$test" "$round"
            done
        done
    done
}

# write_status: each proxy's state (ok or failed) and why, in $RUN_DIR/status.tsv for the report.
write_status() {
    local p
    for p in $PROXIES; do
        printf '%s\t%s\t%s\n' "$p" "${STATE[$p]}" "${REASON[$p]}"
    done >"$RUN_DIR/status.tsv"
}

# machine_line: this machine, for a report's header.
machine_line() {
    echo "$(uname -n), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)"
}

# interpreter_line PYTHON: the interpreter the proxy runs on, and how it was built (the build
# moves every figure: bench/README.md, "The interpreter").
interpreter_line() {
    "$1" - <<'EOF'
import os, platform, sys, sysconfig
with open("/proc/self/maps") as maps:
    shared = "libpython" in maps.read()
flags = [f for f in ("--enable-optimizations", "--with-lto") if f in (sysconfig.get_config_var("CONFIG_ARGS") or "")]
# (A distribution may optimize without these flags: Debian's packaging runs the PGO and LTO steps itself.)
print(f"{platform.python_implementation()} {platform.python_version()} {os.path.realpath(sys.executable)}"
      f" (libpython {'a shared library' if shared else 'in the executable'}{'; configure ' if flags else ''}{' '.join(flags)})")
EOF
}

# start_origin_1k: the nginx origin (conf/origin-nginx.conf.in) serving /1k.bin on a free
# port, PORT[origin], pinned to LOAD_CPU; exits if it does not start.
start_origin_1k() {
    local user=""
    PORT[origin]=$(free_ports 1)
    mkdir -p "$WORK/www" "$WORK/origin/tmp"
    head -c 1024 /dev/urandom >"$WORK/www/1k.bin"
    [[ $EUID -eq 0 ]] && user="user root;"
    sed -e "s|@DIR@|$WORK/origin|g" -e "s|@WWW@|$WORK/www|g" -e "s|@USER@|$user|g" -e "s|@PORT@|${PORT[origin]}|g" \
        "$BENCH_DIR/conf/origin-nginx.conf.in" >"$WORK/origin.conf"
    start origin "$LOAD_CPU" nginx -p "$WORK/origin/" -c "$WORK/origin.conf" -e "$WORK/origin/error.log"
    wait_listening origin || { echo "origin did not start" >&2; exit 1; }
}

# start_conn_proxies: the proxies of PROXIES (nginx; rproxy from REPO_ROOT; base from BASE_DIR,
# under BASE_PYTHON if that is set), each with a plain (PORT[p]) and a TLS listener (TLS_PORT[p],
# one P-256 certificate for all) in front of the origin (start_origin_1k first), pinned to
# PROXY_CPU; CPU_PID[p] is the process doing the work (nginx's worker).  For the per-connection
# scripts (conn_cpu.sh, conn_syscalls.sh, conn_client_cost.sh).
declare -A TLS_PORT=() CPU_PID=()
start_conn_proxies() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/key.pem" \
        -out "$WORK/cert.pem" -days 30 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
    CIPHERS="ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
    local p tmpl user src
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
            if [[ $p == base ]]; then
                PYTHON=${BASE_PYTHON:-$PYTHON} start_rproxy "$p" "$PROXY_CPU" "$BASE_DIR" --config "$WORK/$p.conf"
            else
                start_rproxy "$p" "$PROXY_CPU" "$REPO_ROOT" --config "$WORK/$p.conf"
            fi
        fi
        wait_listening "$p" || { echo "$p did not start (see $WORK/$p.log)" >&2; exit 1; }
        CPU_PID[$p]=${PID[$p]}
        if [[ $p == nginx ]]; then
            CPU_PID[$p]=$(pgrep -P "${PID[$p]}" | head -1)   # the one worker does the work
        fi
    done
}

# callgrind_total OUT: the instructions counted in callgrind's output files OUT* (one per dump).
callgrind_total() {
    local f c ir=0
    for f in "$1"*; do
        c=$(grep -m1 '^totals:' "$f" | awk '{print $2}')
        ir=$((ir + ${c:-0}))
    done
    echo "$ir"
}
