#!/usr/bin/env bash
# The whole collector in the foreground under honcho, for `make run`, `make demo` and `make stop`.
#
#   scripts/stack.sh run    live Binance; local Redis/PostgreSQL in var/ unless REDIS_URL /
#                           DATABASE_URL are set (environment or .env); Procfile
#   scripts/stack.sh demo   the fake exchange on 127.0.0.1:19443; always the local servers in var/,
#                           with its own Redis database (1) and PostgreSQL database (collector_demo)
#                           so it never mixes with a live run; Procfile.demo
#   scripts/stack.sh stop   stop a running run/demo, then the local servers
#
# Each process's output also goes to var/log/<process>.log (make demo: var/log/demo/), rotated. A start
# that fails before honcho runs stops the local servers it started itself.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"
export PATH="$VENV/bin:$PATH"
VAR=var
# honcho sends SIGTERM to every process, then SIGKILL after this many seconds (its default is 5).
# worker-ingest finishes its running drain first (DRAIN_RUN_MAX_S, 20 s by default).
STOP_GRACE_S=${STOP_GRACE_S:-30}
# Every process's output also goes to $VAR/log/<process>.log (scripts/run_procfile.py), the demo's to
# $VAR/log/demo/ (both may run at once, with the same process names), rotated past this size and kept
# in this many older files each: at most 6 x 10 MiB per process by default.
STACK_LOG_MAX_BYTES=${STACK_LOG_MAX_BYTES:-10485760}
STACK_LOG_BACKUPS=${STACK_LOG_BACKUPS:-5}
DEMO_EXCHANGE_PORT=19443 # also written in Procfile.demo

mkdir -p "$VAR"

configured() { # true when variable $1 is set in the environment or in .env
    [[ -n "${!1:-}" ]] && return 0
    [[ -f .env ]] && grep -Eq "^[[:space:]]*(export[[:space:]]+)?$1=" .env
}

refuse_if_running() { # refuse_if_running PIDFILE
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        echo "already running (pid $pid, $1); stop it with: make stop" >&2
        exit 1
    fi
}

# The env file is written under a scratch name and takes its own only once `collector init-db` has
# accepted the settings: a start that fails (a bad variable, a server down) leaves the last good one.
STAGED=
# The local servers this start started (redis,postgresql): a start that fails before honcho runs
# stops them again, so nothing it started outlives it. Servers that already ran (another stack's,
# or a `make services-up`) are left alone.
STARTED=

end_of_failed_start() { # the EXIT trap: runs on every exit before honcho replaces this shell
    local status=$?
    [[ -z "$STAGED" ]] || rm -f "$STAGED"
    if ((status != 0)) && [[ -n "$STARTED" ]]; then
        local what="the start failed"
        ((status != 130 && status != 143)) || what="the start was interrupted"
        if LOCAL_SERVICES=$STARTED collector services down --dir "$VAR" 2>/dev/null; then
            echo "make $MODE: $what; stopped the local ${STARTED/,/ and } it had started" >&2
        else
            echo "make $MODE: $what, and stopping the local $STARTED failed too; try: make stop" >&2
        fi
    fi
    exit "$status"
}
trap end_of_failed_start EXIT
# Ctrl-C or `make stop` during the start: exit through the trap above (bash skips it when killed).
trap 'exit 130' INT
trap 'exit 143' TERM

start_local_services() { # start_local_services NAMES: their URLs into $STAGED; those started in $STARTED
    local log status=0
    log=$(LOCAL_SERVICES=$1 collector services up --dir "$VAR" 2>&1 >"$STAGED") || status=$?
    [[ -z "$log" ]] || printf '%s\n' "$log" >&2
    # `collector services up` says `NAME: started on ...` for each server it started (and stops
    # them again itself when it fails).
    STARTED=$(sed -nE 's/^(redis|postgresql): started on .*/\1/p' <<<"$log" | paste -sd, -)
    return "$status"
}

stage_envfile() { # stage_envfile ENVFILE: a scratch file beside it, named in $STAGED
    STAGED=$(mktemp "$1.XXXXXX")
}

load_and_check() { # load_and_check ENVFILE: $STAGED's settings into this shell, init-db, then keep it
    set -a
    # shellcheck disable=SC1090
    . "$STAGED"
    set +a
    collector init-db
    mv -f "$STAGED" "$1"
    STAGED=
}

honcho_start() { # honcho_start PROCFILE ENVFILE PIDFILE LOGDIR: honcho replaces this shell (pid in PIDFILE)
    local logs=$4
    echo $$ >"$3"
    echo "logs: $logs/<process>.log, rotated at $STACK_LOG_MAX_BYTES bytes, $STACK_LOG_BACKUPS older files kept" >&2
    # The env file comes after .env, so its values win over .env's in every process.
    exec python scripts/run_procfile.py --kill-wait "$STOP_GRACE_S" --log-dir "$logs" \
        --log-max-bytes "$STACK_LOG_MAX_BYTES" --log-backups "$STACK_LOG_BACKUPS" \
        -- start -f "$1" -e ".env,$2"
}

run() {
    local envfile="$VAR/run.env" need=()
    refuse_if_running "$VAR/run.pid"
    configured REDIS_URL || need+=(redis)
    configured DATABASE_URL || need+=(postgresql)
    stage_envfile "$envfile"
    if ((${#need[@]})); then
        start_local_services "$(
            IFS=,
            echo "${need[*]}"
        )"
    fi
    load_and_check "$envfile"
    echo "starting streams, worker-ingest and worker-rest (Celery pools), beat, web (:${WEB_PORT:-8000}) and flower (:${FLOWER_PORT:-5555}); Ctrl-C stops them" >&2
    honcho_start Procfile "$envfile" "$VAR/run.pid" "$VAR/log"
}

demo() {
    local envfile="$VAR/demo.env"
    refuse_if_running "$VAR/demo.pid"
    stage_envfile "$envfile"
    LOCAL_REDIS_DB=1 LOCAL_DATABASE_NAME=collector_demo start_local_services redis,postgresql
    cat >>"$STAGED" <<EOF
SPOT_SYMBOLS=BTCUSDT,ETHUSDT
FUTURES_SYMBOLS=BTCUSDT,ETHUSDT
BINANCE_SPOT_WS_URL=ws://127.0.0.1:$DEMO_EXCHANGE_PORT/spot
BINANCE_FUTURES_WS_URL=ws://127.0.0.1:$DEMO_EXCHANGE_PORT/futures
BINANCE_SPOT_REST_URL=http://127.0.0.1:$DEMO_EXCHANGE_PORT/spot
BINANCE_FUTURES_REST_URL=http://127.0.0.1:$DEMO_EXCHANGE_PORT/futures
OPEN_INTEREST_INTERVAL_S=5
DEPTH_SNAPSHOT_INTERVAL_S=30
ALERT_MIN_NOTIONAL_USD=1000
ALERT_WINDOW_S=60
ALERT_WINDOW_NOTIONAL_USD=5000
ALERT_COOLDOWN_S=30
ALERT_LOG=$VAR/demo-alert.log
WEB_PORT=8001
FLOWER_PORT=5556
EOF
    load_and_check "$envfile"
    echo "demo: fake exchange on :$DEMO_EXCHANGE_PORT, web on :8001, flower on :5556, alerts in $VAR/demo-alert.log; Ctrl-C stops it" >&2
    honcho_start Procfile.demo "$envfile" "$VAR/demo.pid" "$VAR/log/demo"
}

stop() {
    local pidfile pid
    for pidfile in "$VAR/run.pid" "$VAR/demo.pid"; do
        [[ -f "$pidfile" ]] || continue
        pid=$(<"$pidfile")
        if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            echo "stopping ${pidfile##*/} (pid $pid)" >&2
            kill -TERM "$pid"
            for _ in $(seq $((STOP_GRACE_S + 10))); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 1
            done
        fi
        rm -f "$pidfile"
    done
    LOCAL_SERVICES=redis,postgresql collector services down --dir "$VAR"
}

MODE=${1:-}
case "$MODE" in
run | demo | stop) "$1" ;;
*)
    echo "usage: $0 run|demo|stop" >&2
    exit 2
    ;;
esac
