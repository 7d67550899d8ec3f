#!/usr/bin/env bash
# Stop the single-node SLURM started by start_slurm.sh: cancels its jobs, then
# stops slurmd, slurmctld and (only if start_slurm.sh started it) munged, using
# the pid files under $SLURM_LAB_DIR/run.  Never kills by process name.
# Idempotent: stopping a stopped cluster only says so and exits 0.
set -uo pipefail

LAB=${SLURM_LAB_DIR:-/tmp/slurm-lab}
RUN=$LAB/run
log() { echo "stop_slurm.sh: $*" >&2; }

alive() {  # a zombie does not count as alive
    [ -r "/proc/$1/stat" ] && ! awk '{exit !($3=="Z")}' "/proc/$1/stat"
}

stop_pidfile() {   # name pidfile
    local name=$1 pf=$2 pid
    [ -f "$pf" ] || { log "$name: not running (no pid file)"; return 0; }
    pid=$(cat "$pf")
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        log "$name: not running"; rm -f "$pf"; return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        log "$name ($pid) ignored SIGTERM for 10s, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pf"
    log "$name ($pid) stopped"
}

if [ -f "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
    # cancel what is still queued/running so no slurmstepd is left behind
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        scancel --full $(squeue -h -o %i) 2>/dev/null || true
        for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi
stop_pidfile slurmd    "$RUN/slurmd.pid"
stop_pidfile slurmctld "$RUN/slurmctld.pid"
if [ -f "$RUN/munged.started-by-us" ]; then
    stop_pidfile munged "$RUN/munged.pid"
    rm -f "$RUN/munged.started-by-us"
else
    log "munged: not started by start_slurm.sh, left alone"
fi
exit 0
