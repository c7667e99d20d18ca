# Shared by the bench/*/run drivers (sourced, not run): free ports, readiness,
# background processes that are cleaned up on exit.
#
# The sourcing script sets RUN_DIR (where each process's log goes) before
# calling `start`, and calls `bench_cleanup` (or relies on the EXIT trap set
# by `bench_traps`).

log() { printf '[%s %s] %s\n' "${BENCH_NAME:-bench}" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 is needed (free ports, readiness, summaries)"

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
now_ms() { python3 -c 'import time;print(int(time.time()*1000))'; }

http_ok() { # url
    python3 - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(0 if opener.open(sys.argv[1], timeout=1).status == 200 else 1)
PY
}

wait_ready() { # name url pid
    local i
    for ((i = 0; i < 600; i++)); do
        http_ok "$2" && return 0
        kill -0 "$3" 2>/dev/null || die "$1 exited during startup (see $RUN_DIR/$1.log)"
        sleep 0.1
    done
    die "$1 not ready within 60 s ($2)"
}

wait_port() { # port
    local i
    for ((i = 0; i < 100; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$1"
}

BENCH_PIDS=()
bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${BENCH_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    BENCH_PIDS=()
}
bench_traps() {
    trap bench_cleanup EXIT
    trap 'log "interrupted"; exit 130' INT TERM
}

# start NAME [VAR=value…] COMMAND [ARGS…]: runs in the background with its
# output in $RUN_DIR/NAME.log; its pid is in STARTED.
start() {
    local name="$1"
    shift
    env "$@" >>"$RUN_DIR/$name.log" 2>&1 &
    STARTED=$!
    BENCH_PIDS+=("$STARTED")
}
