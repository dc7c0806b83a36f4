# What a bench script needs before it starts anything (sourced, not run; lib.sh sources it): its
# tools, installed from Debian's packages when missing, and PYTHON, the project's .venv made when
# missing, so that each script runs on a fresh machine as the README's first command does.  The
# script sets REPO_ROOT and PYTHON (and PROXY_CPU, LOAD_CPU if it pins), and may define its own log
# and die.

declare -F log >/dev/null || log() { printf '[%s %s] %s\n' "$(basename "$0" .sh)" "$(date +%H:%M:%S)" "$*" >&2; }
declare -F die >/dev/null || die() { log "error: $*"; exit 1; }

# Debian's package for each tool a bench script runs (a tool not named here is its own package).
declare -A TOOL_PACKAGE=(
    [h2load]=nghttp2-client [taskset]=util-linux [perf]=linux-perf [ss]=iproute2 [nstat]=iproute2 [node]=nodejs
    [redis-cli]=redis-tools
)

# install_packages PACKAGE...: as root, apt-get installs them; else the script's die names them.
install_packages() {
    [[ $EUID -eq 0 ]] || die "missing $* (Debian packages): run as root, or install them"
    log "installing $*"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || die "could not install $*"
}

# install_tools TOOL...: every tool on PATH, the Debian packages of the missing ones installed.
install_tools() {
    local tool missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null || missing+=("${TOOL_PACKAGE[$tool]:-$tool}")
    done
    ((${#missing[@]} == 0)) && return 0
    install_packages "${missing[@]}"
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool still missing after installing ${TOOL_PACKAGE[$tool]:-$tool}"
    done
}

# install_python: PYTHON runs; the project's .venv (PYTHON's default) is made when there is none,
# as the README's first command makes it (python3 -m venv, pip install of this tree).
install_python() {
    if [[ ! -x $PYTHON && $PYTHON == "$REPO_ROOT/.venv/bin/python" ]]; then
        log "making $REPO_ROOT/.venv (python3 -m venv; pip install $REPO_ROOT)"
        python3 -m venv "$REPO_ROOT/.venv" >&2 || die "python3 -m venv $REPO_ROOT/.venv failed"
        "$PYTHON" -m pip install -q "$REPO_ROOT" >&2 || die "pip install $REPO_ROOT failed"
    fi
    [[ -x $PYTHON ]] || die "PYTHON=$PYTHON is not an executable"
}

# check_setup "TOOL..." [MODULES]: the tools are on PATH (installed if missing, see install_tools),
# PYTHON runs (see install_python) and imports MODULES (comma-separated), and PROXY_CPU and
# LOAD_CPU, where set, can be pinned to; else the script's die names what is missing.
check_setup() {
    # shellcheck disable=SC2086
    install_tools $1
    install_python
    [[ -z ${2:-} ]] || "$PYTHON" -c "import $2" 2>/dev/null || die "$PYTHON cannot import $2"
    [[ -z ${PROXY_CPU:-} ]] || taskset -c "$PROXY_CPU" true 2>/dev/null || die "cannot pin to CPU $PROXY_CPU"
    [[ -z ${LOAD_CPU:-} ]] || taskset -c "$LOAD_CPU" true 2>/dev/null || die "cannot pin to CPU $LOAD_CPU (set LOAD_CPU)"
}
