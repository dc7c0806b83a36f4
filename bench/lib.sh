# Shared by the bench scripts (sourced, not run): start pinned processes, wait for their
# ports, and stop everything on exit.  A script sets WORK, RUN_DIR and START_TIMEOUT first;
# it keeps the pids it starts in STARTED and the running load generator in LOAD_PID.

declare -a STARTED=()    # every pid we started, for cleanup
declare -A PID=() PORT=()
LOAD_PID=""              # the load generator running now, if any

cleanup() {
    local pid children=() i alive
    trap - EXIT INT TERM
    [[ -z $LOAD_PID ]] || kill -TERM "$LOAD_PID" 2>/dev/null || true
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
# $RUN_DIR/NAME.log. (taskset execs CMD, so $! is CMD's own pid.)
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$RUN_DIR/$name.log" 2>&1 &
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
