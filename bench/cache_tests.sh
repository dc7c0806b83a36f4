#!/usr/bin/env bash
# The HTTP cache-tests suite (https://cache-tests.fyi, npm package http-cache-tests) against
# rproxy's shared cache, and against nginx proxy_cache for comparison: the suite's Node
# origin on 127.0.0.1, each proxy in front of it on a route with cache = true, the suite's
# command-line client run against each proxy.  Prints pass/fail counts by result and by
# test kind, then every test that is not a pass.  Not part of pytest: it needs node and npm.
#
#   bench/cache_tests.sh                     # rproxy and nginx
#   ROWS=rproxy bench/cache_tests.sh
#   ROWS=rproxy TEST_ID=freshness-max-age bench/cache_tests.sh   # one test, with its exchanges
#
# The JSON results (the suite's own format, as cache-tests.fyi takes them) and the summaries
# are kept in bench/results/cache-tests-<date-time>/.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$BENCH_DIR")
export PATH="$PATH:/usr/sbin:/sbin"
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
CACHE_TESTS_DIR=${CACHE_TESTS_DIR:-$HOME/.cache/rproxy-cache-tests}
CACHE_TESTS_VERSION=${CACHE_TESTS_VERSION:-0.4.5}
ROWS=${ROWS:-"rproxy nginx"}
TEST_ID=${TEST_ID:-}
START_TIMEOUT=${START_TIMEOUT:-20}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}

log() { printf '[cache-tests %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
source "$BENCH_DIR/setup.sh"   # check_setup
tools="node npm"
[[ $ROWS != *nginx* ]] || tools="$tools nginx"
check_setup "$tools" twisted

SUITE=$CACHE_TESTS_DIR/node_modules/http-cache-tests
if [[ ! -f $SUITE/cli.mjs ]]; then
    log "installing http-cache-tests@$CACHE_TESTS_VERSION into $CACHE_TESTS_DIR"
    mkdir -p "$CACHE_TESTS_DIR"
    (cd "$CACHE_TESTS_DIR" && npm install --no-audit --no-fund "http-cache-tests@$CACHE_TESTS_VERSION" >&2)
fi
log "suite: http-cache-tests $(node -p "require('$SUITE/package.json').version")"

WORK=$(mktemp -d /tmp/rproxy-cache-tests.XXXXXX)
RUN_DIR=$RESULTS_DIR/cache-tests-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
source "$BENCH_DIR/lib.sh"
CPUS="0-$(($(nproc) - 1))"

read -r -a ports <<<"$("$PYTHON" - 3 <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
PORT[origin]=${ports[0]} PORT[rproxy]=${ports[1]} PORT[nginx]=${ports[2]}

render() {  # render TEMPLATE OUT NAME
    local dir=$WORK/$3 user=""
    [[ $EUID -eq 0 ]] && user="user root;"
    mkdir -p "$dir/tmp"
    sed -e "s|@DIR@|$dir|g" -e "s|@USER@|$user|g" -e "s|@PORT@|${PORT[$3]}|g" \
        -e "s|@ORIGIN_PORT@|${PORT[origin]}|g" "$1" >"$2"
}

# The suite's origin (what `npm run server` runs, in the foreground so that it is ours to stop).
pushd "$SUITE" >/dev/null
npm_config_protocol=http npm_config_port=${PORT[origin]} npm_config_pidfile=$WORK/origin.pid \
    start origin "$CPUS" node server/server.mjs
popd >/dev/null
wait_listening origin || die "the cache-tests origin did not start (see $RUN_DIR/origin.log)"

for name in $ROWS; do
    case $name in
    rproxy)
        render "$BENCH_DIR/cache_tests/rproxy.toml.in" "$WORK/rproxy.toml" rproxy
        pushd "$REPO_ROOT" >/dev/null
        start rproxy "$CPUS" "$PYTHON" -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= \
            rproxy --config "$WORK/rproxy.toml"
        popd >/dev/null
        ;;
    nginx)
        render "$BENCH_DIR/cache_tests/nginx.conf.in" "$WORK/nginx.conf" nginx
        start nginx "$CPUS" nginx -p "$WORK/nginx/" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
        ;;
    *) die "unknown row $name (rproxy, nginx)" ;;
    esac
    wait_listening "$name" || die "$name did not start (see $RUN_DIR/$name.log)"
done

status=0
for name in $ROWS; do
    base=http://127.0.0.1:${PORT[$name]}
    if [[ -n $TEST_ID ]]; then
        log "$name: $TEST_ID"
        (cd "$SUITE" && npm_package_config_id=$TEST_ID npm_config_base=$base node --no-warnings cli.mjs) \
            | tee "$RUN_DIR/$name-$TEST_ID.txt"
        continue
    fi
    log "$name: running the suite against $base"
    (cd "$SUITE" && npm_package_config_id= npm_config_base=$base node --no-warnings cli.mjs) \
        >"$RUN_DIR/$name.json" 2>"$RUN_DIR/$name-cli.log" || status=1
    CACHE_TESTS_SUITE=$SUITE node --no-warnings "$BENCH_DIR/cache_tests/summary.mjs" "$RUN_DIR/$name.json" \
        >"$RUN_DIR/$name-summary.txt" || status=1
    printf '== %s (%s)\n' "$name" "$RUN_DIR/$name.json"
    cat "$RUN_DIR/$name-summary.txt"
done
exit $status
