#!/usr/bin/env bash
# Stop the single-node Grid Engine started by start_sge.sh: deletes its jobs,
# then stops sge_execd and sge_qmaster using the pid files in $SGE_LAB_DIR.
# Never kills by process name.
# Idempotent: stopping a stopped cluster only says so and exits 0.
set -uo pipefail
LAB=${SGE_LAB_DIR:-/tmp/sge-lab}
log() { echo "stop_sge.sh: $*" >&2; }

stop_pidfile() {   # name pidfile
    local name=$1 pf=$2 pid
    [ -s "$pf" ] || { log "$name: not running (no pid file)"; return 0; }
    pid=$(cat "$pf")
    if ! kill -0 "$pid" 2>/dev/null; then log "$name: not running"; rm -f "$pf"; return 0; fi
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
        [ -r "/proc/$pid/stat" ] && ! awk '{exit !($3=="Z")}' "/proc/$pid/stat" || break
        sleep 0.1
    done
    if [ -r "/proc/$pid/stat" ] && ! awk '{exit !($3=="Z")}' "/proc/$pid/stat"; then
        log "$name ($pid) ignored SIGTERM for 30s, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pf"; log "$name ($pid) stopped"
}

if [ -s "$LAB/qmaster.pid" ] && kill -0 "$(cat "$LAB/qmaster.pid")" 2>/dev/null; then
    if [ -n "$(qstat -u '*' 2>/dev/null)" ]; then
        qdel -f -u '*' >/dev/null 2>&1 || true
        for _ in $(seq 1 50); do [ -z "$(qstat -u '*' 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi
stop_pidfile sge_execd   "$LAB/execd.pid"
stop_pidfile sge_qmaster "$LAB/qmaster.pid"
exit 0
