#!/usr/bin/env bash
# Paired, interleaved A/B wall clock (issue 12): what metrics and the access log cost on the
# 1 KiB keep-alive figure, resolved to a few percent on a machine whose rounds of one variant move
# by 25-40%.  Every variant runs at once, a long-running `twistd rproxy` each on its own port, all
# pinned to PROXY_CPU, in front of one nginx origin serving /1k.bin; the origin and wrk on
# LOAD_CPU.  In each of BLOCKS blocks every variant gets one BURST of wrk (CONNS connections), in
# an order shuffled per block; req/s per (block, variant) go to paired.csv in the run directory.
# A slow spell of the machine that spans a block hits all of its variants, so the ratio
# variant/ids within a block keeps less of it: the report is the median over blocks of those
# ratios, with a 95% bootstrap confidence interval (bench/paired_report.py), and ids2, a second
# plain rproxy, against ids as the method's own noise (A/A).  On this VM most of the noise changes
# from one burst to the next, and blocks leave an A/A interval some 15 points wide.  MODE=pairs
# runs ids and one variant at the same time on the one core (a wrk on each), so that what slows
# the core slows both: the A/A interval falls to 1-2 points (bench/README.md, issue 12).  Warm-up:
# one unmeasured WARMUP run per variant before block 1 only; the connections' set-up is inside
# every burst alike.
#
#   bench/paired.sh                          # MODE=pairs (the default): 5 pairs x 30 blocks x 2 s
#   MODE=sequential bench/paired.sh          # 6 variants x 30 blocks x 2 s, one at a time
#   BLOCKS=3 BURST=1s bench/paired.sh        # a smoke test
#   VARIANTS="ids ids2 metrics" BLOCKS=40 bench/paired.sh
#   .venv/bin/python bench/paired_report.py bench/results/paired-<date-time>   # the table again
#
# Variants (lib.sh's rproxy_args): ids and ids2 = plain rproxy (request ids on, access log off),
# metrics (the admin listener: every request counted), log (the access log to a file), stdout
# (the access log `-`, standard output to a file), ops (file log and metrics).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
export PATH="$PATH:/usr/sbin:/sbin"

if [[ -z "${PYTHON:-}" ]]; then
    # This tree's venv, else (in a git worktree) the main worktree's: the proxies still run this
    # tree's rproxy_tw (start_rproxy runs them from REPO_ROOT).
    PYTHON=$REPO_ROOT/.venv/bin/python
    if [[ ! -x $PYTHON ]]; then
        main_tree=$(git -C "$REPO_ROOT" worktree list --porcelain 2>/dev/null | sed -n '1s/^worktree //p')
        PYTHON=${main_tree:-$REPO_ROOT}/.venv/bin/python
    fi
fi
VARIANTS=${VARIANTS:-"ids ids2 metrics log stdout ops"}   # ids, the reference, is always run
BLOCKS=${BLOCKS:-30}            # blocks; each visits every variant once
BURST=${BURST:-2s}              # measured wrk run per (block, variant); whole seconds (wrk's -d)
WARMUP=${WARMUP:-2s}            # one unmeasured wrk run per variant before block 1; 0 to skip
CONNS=${CONNS:-50}              # wrk connections (one thread), per wrk
MODE=${MODE:-pairs}             # pairs: ids and one other at once; sequential: one variant at a time
SEED=${SEED:-1}                 # for the block orders and the bootstrap
WRK_TIMEOUT=${WRK_TIMEOUT:-5s}
PROXY_CPU=${PROXY_CPU:-0}       # every variant
LOAD_CPU=${LOAD_CPU:-1}         # origin and wrk
START_TIMEOUT=${START_TIMEOUT:-60}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}

log() { printf '[paired %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ " $VARIANTS " == *" ids "* ]] || VARIANTS="ids $VARIANTS"
declare -A KIND=() ARGS=()
for v in $VARIANTS; do
    case $v in
    ids | ids2) KIND[$v]=rproxy ;;
    metrics | log | stdout | ops) KIND[$v]=rproxy-$v ;;
    *) die "unknown variant '$v' in VARIANTS (ids ids2 metrics log stdout ops)" ;;
    esac
done
[[ $BLOCKS =~ ^[1-9][0-9]*$ ]] || die "BLOCKS=$BLOCKS is not a positive number"
[[ $MODE == sequential || $MODE == pairs ]] || die "MODE=$MODE: sequential or pairs"

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED_AT=$(date -u '+%Y-%m-%d %H:%M')
WORK=$(mktemp -d /tmp/rproxy-paired.XXXXXX)
RUN_DIR=$RESULTS_DIR/paired-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
source "$BENCH_DIR/lib.sh"   # cleanup on exit, start, start_rproxy, rproxy_args, wait_listening, fail, ...
check_setup "nginx wrk curl taskset" twisted
declare -A STATE=() REASON=()

# --- origin and proxies ------------------------------------------------------

start_origin_1k
why=$(check_fetch "${PORT[origin]}" 1k.bin:1024) || die "origin nginx: $why"
log "origin nginx on 127.0.0.1:${PORT[origin]} (CPU $LOAD_CPU)"

read -r -a ports <<<"$(free_ports "$(wc -w <<<"$VARIANTS")")"
i=0
for v in $VARIANTS; do
    PORT[$v]=${ports[$i]}
    i=$((i + 1))
    rproxy_args "${KIND[$v]}" "$v"
    ARGS[$v]="${RPROXY_ARGS[*]}"
    out=""
    # stdout's standard output is its access log (tens of MB): kept in WORK, not in the results.
    [[ $v == stdout ]] && out=$WORK/stdout.out
    START_OUT=$out start_rproxy "$v" "$PROXY_CPU" "$REPO_ROOT" \
        --listen "tcp:${PORT[$v]}:interface=127.0.0.1" --backend "tcp:127.0.0.1:${PORT[origin]}" "${RPROXY_ARGS[@]}"
    STATE[$v]=ok
    REASON[$v]=""
done
for v in $VARIANTS; do
    # (fail's messages name $RUN_DIR/$v.log, also for stdout: its first lines are copied there at the end.)
    started "$v" || continue
    if why=$(check_fetch "${PORT[$v]}" 1k.bin:1024); then
        log "$v (${ARGS[$v]}) on 127.0.0.1:${PORT[$v]} (CPU $PROXY_CPU), pid ${PID[$v]}"
    else
        fail "$v" "$why"
    fi
done
[[ ${STATE[ids]} == ok ]] || die "the reference variant ids did not start"

# --- load ----------------------------------------------------------------------

# load DURATION OUT PORT [OUT PORT...]: one wrk per port at once, each pinned to LOAD_CPU, in the
# background plus wait so that a signal reaches our trap at once (LOAD_PID: all of them).
load() {
    local duration=$1 rc=0 pid
    shift
    LOAD_PID=""
    while (($#)); do
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$duration" --timeout "$WRK_TIMEOUT" \
            "http://127.0.0.1:$2/1k.bin" >"$1" 2>&1 &
        LOAD_PID+="$! "
        shift 2
    done
    for pid in $LOAD_PID; do
        wait "$pid" || rc=$?
    done
    LOAD_PID=""
    return $rc
}

# wrk_fields FILE: "req/s requests errors" from a wrk output (errors: non-2xx responses plus
# socket errors).
wrk_fields() {
    awk '/^Requests\/sec:/ { rps = $2 }
         / requests in / { n = $1 }
         /Non-2xx or 3xx responses:/ { err += $NF }
         /Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
         END { printf "%s %s %d\n", (rps == "" ? "NA" : rps), (n == "" ? "NA" : n), err }' "$1"
}

# schedstat PID: "on-CPU ns, runqueue-wait ns" of PID so far (/proc/PID/schedstat): how much CPU
# the proxy got, and how long it waited for CPU behind other processes (another load on PROXY_CPU).
schedstat() {
    local run wait _
    { read -r run wait _ <"/proc/$1/schedstat"; } 2>/dev/null || { echo "NA NA"; return 0; }
    echo "$run $wait"
}

# delta_ms NS0 NS1: (NS1 - NS0) in whole ms, or NA if either is not a number.
delta_ms() {
    [[ $1 =~ ^[0-9]+$ && $2 =~ ^[0-9]+$ ]] && echo $((($2 - $1) / 1000000)) || echo NA
}

if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
    for v in $VARIANTS; do
        [[ ${STATE[$v]} == ok ]] || continue
        log "warm-up, $v: wrk -c$CONNS -d$WARMUP"
        load "$WARMUP" "$RUN_DIR/warmup-$v.wrk" "${PORT[$v]}" || true
    done
fi

# The block orders, shuffled with a fixed seed: one line per block (pairs: ids is in every pair).
others=$VARIANTS
[[ $MODE == pairs ]] && others=$(tr ' ' '\n' <<<"$VARIANTS" | grep -vx ids | xargs)
"$PYTHON" - "$SEED" "$BLOCKS" $others >"$RUN_DIR/order.txt" <<'EOF'
import random, sys
rng = random.Random(int(sys.argv[1]))
variants = sys.argv[3:]
for _ in range(int(sys.argv[2])):
    rng.shuffle(variants)
    print(" ".join(variants))
EOF

# measure BLOCK POSITION GROUP NAME...: one BURST on each NAME at once (one wrk each), a CSV row
# each; GROUP is what a ratio to ids compares within (the block, or the pair).
CSV=$RUN_DIR/paired.csv
echo "block,position,group,variant,req_per_s,requests,errors,cpu_ms,wait_ms" >"$CSV"
measure() {
    local block=$1 pos=$2 group=$3 v rps requests errors run1 wait1 targets=()
    local -A run0=() wait0=()
    shift 3
    for v in "$@"; do
        targets+=("$RUN_DIR/b$block-$pos-$v.wrk" "${PORT[$v]}")
    done
    for v in "$@"; do
        read -r "run0[$v]" "wait0[$v]" <<<"$(schedstat "${PID[$v]}")"
    done
    load "$BURST" "${targets[@]}" || log "$*: wrk exited with an error (see $RUN_DIR/b$block-$pos-*.wrk)"
    for v in "$@"; do
        read -r run1 wait1 <<<"$(schedstat "${PID[$v]}")"
        read -r rps requests errors <<<"$(wrk_fields "$RUN_DIR/b$block-$pos-$v.wrk")"
        echo "$block,$pos,$group,$v,$rps,$requests,$errors,$(delta_ms "${run0[$v]}" "$run1"),$(delta_ms "${wait0[$v]}" "$wait1")" >>"$CSV"
    done
}

# usable NAME: NAME is still ok and running (else it is marked failed).
usable() {
    [[ ${STATE[$1]} == ok ]] || return 1
    alive "$1" && return 0
    fail "$1" "died during the run (see $RUN_DIR/$1.log)"
    return 1
}

block=0
while read -r -a order; do
    block=$((block + 1))
    pos=0
    for v in "${order[@]}"; do
        pos=$((pos + 1))
        usable "$v" || continue
        if [[ $MODE == pairs ]]; then
            usable ids || break
            measure "$block" "$pos" "$block.$pos" ids "$v"
        else
            measure "$block" "$pos" "$block" "$v"
        fi
    done
    log "block $block/$BLOCKS: $(awk -F, -v b="$block" '$1 == b { printf "%s %s  ", $4, $5 }' "$CSV")"
done <"$RUN_DIR/order.txt"
[[ ${STATE[ids]} == ok ]] || die "the reference variant ids failed: ${REASON[ids]}"

# --- report ----------------------------------------------------------------------

[[ -f $WORK/stdout.out ]] && head -c 65536 "$WORK/stdout.out" >"$RUN_DIR/stdout.log"
for v in $VARIANTS; do
    printf '%s\t%s\t%s\n' "$v" "${STATE[$v]}" "${REASON[$v]}"
done >"$RUN_DIR/status.tsv"
{
    echo "date=$STARTED_AT-$(date -u '+%H:%M') UTC"
    echo "machine=$(machine_line)"
    echo "pinning=every variant on CPU $PROXY_CPU; origin nginx and wrk on CPU $LOAD_CPU"
    echo "load=load average $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    warm="a $WARMUP warm-up per variant before block 1"
    [[ $WARMUP == 0 || $WARMUP == 0s ]] && warm="no warm-up"
    if [[ $MODE == pairs ]]; then
        echo "runs=$BLOCKS blocks x one $BURST burst per variant at once with ids (a wrk -t1 -c$CONNS on each, 1 KiB keep-alive), order shuffled per block (seed $SEED), $warm"
    else
        echo "runs=$BLOCKS blocks x one $BURST burst per variant (wrk -t1 -c$CONNS, 1 KiB keep-alive), order shuffled per block (seed $SEED), $warm"
    fi
    echo "mode=$MODE"
    echo "source=$REPO_ROOT at $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO_ROOT" diff --quiet HEAD -- rproxy_tw twisted 2>/dev/null || echo ' (uncommitted changes in rproxy_tw)')"
    echo "versions=$(nginx -v 2>&1 | sed 's/.*version: //'), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $("$PYTHON" -c 'import sys, twisted; print("Python %d.%d.%d" % sys.version_info[:3], "Twisted", twisted.__version__)')"
    echo "variants=$VARIANTS"
    echo "seed=$SEED"
} >"$RUN_DIR/meta.txt"

"$PYTHON" "$BENCH_DIR/paired_report.py" "$RUN_DIR" >"$RUN_DIR/summary.txt"
cp "$RUN_DIR/summary.txt" "$RESULTS_DIR/paired-latest.txt"
echo
cat "$RESULTS_DIR/paired-latest.txt"
log "raw output in $RUN_DIR; table in $RESULTS_DIR/paired-latest.txt"
