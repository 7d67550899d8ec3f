#!/usr/bin/env bash
# Start a single-node Son of Grid Engine 8.1.9 (Debian "gridengine-*" packages):
# sge_qmaster + sge_execd, without systemd, so that blmm's SGE engine can be tested
# for real (tests/engine/test_engine_cluster.py).  Idempotent: if the cluster already
# answers, it only prints the queue name.  Must run as root.  Installs the Debian
# packages (gridengine-master gridengine-exec gridengine-client) when missing.
#
#   bash scripts/cluster/start_sge.sh   -> prints the queue name on stdout (last line)
#
# Env knobs:
#   SGE_LAB_DIR    where pid copies go   (default /tmp/sge-lab)
#   SGE_LAB_QUEUE  queue name            (default all.q)
set -euo pipefail

LAB=${SGE_LAB_DIR:-/tmp/sge-lab}
QUEUE=${SGE_LAB_QUEUE:-all.q}
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
COMMON=$SGE_ROOT/$SGE_CELL/common

die() { echo "start_sge.sh: ERROR: $*" >&2; exit 1; }
log() { echo "start_sge.sh: $*" >&2; }
pid_alive() {  # pidfile ; a zombie does not count
    [ -s "$1" ] || return 1
    local p; p=$(cat "$1")
    [ -r "/proc/$p/stat" ] && ! awk '{exit !($3=="Z")}' "/proc/$p/stat"
}

[ "$(id -u)" = 0 ] || die "must run as root"

cluster_up() {
    timeout 10 qstat -f -q "$QUEUE" 2>/dev/null | grep -q "^$QUEUE@" || return 1
    # queue instance must not be in state u (unknown = execd not reporting)
    ! timeout 10 qstat -f -q "$QUEUE" 2>/dev/null | awk -v q="$QUEUE@" 'index($1,q)==1 {print $6}' | grep -q '[uEd]'
}

if command -v qstat >/dev/null 2>&1 && pid_alive "$LAB/qmaster.pid" && pid_alive "$LAB/execd.pid" && cluster_up; then
    log "already running"; echo "$QUEUE"; exit 0
fi

# ---- 1. packages ------------------------------------------------------------------
if ! command -v sge_qmaster >/dev/null || ! command -v sge_execd >/dev/null || ! command -v qsub >/dev/null; then
    command -v apt-get >/dev/null \
        || die "Grid Engine is not installed and apt-get is missing (not Debian/Ubuntu): install it yourself"
    log "installing gridengine-master gridengine-exec gridengine-client (apt)"
    export DEBIAN_FRONTEND=noninteractive
    # start_slurm.sh may run apt at the same time: serialise on one lock file
    exec 9>/var/lock/blmm-cluster-apt.lock; flock -w 900 9 || die "timed out waiting for /var/lock/blmm-cluster-apt.lock"
    apt-get update -qq >/dev/null || die "apt-get update failed (no network or no package mirror?)"
    # with the noninteractive frontend, the master's postinst creates the 'default' cell
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends \
        gridengine-master gridengine-exec gridengine-client >/dev/null \
        || die "apt-get install gridengine-* failed"
    exec 9>&-
fi
[ -f "$COMMON/bootstrap" ] || die "$COMMON/bootstrap missing: the cell was not created by the package postinst (debconf shared/gridengineconfig must be true)"

# ---- 2. host naming ---------------------------------------------------------------
HOST=$(hostname)
getent hosts "$HOST" >/dev/null || die "hostname '$HOST' does not resolve (add it to /etc/hosts)"
echo "$HOST" > "$COMMON/act_qmaster"          # empty after a noninteractive install
# 127.0.0.1 reverse-resolves to "localhost" while gethostname() says $HOST; without
# an alias qmaster refuses every client: "access denied (client IP resolved to host
# name "localhost". This is not identical to clients host name ...)"
echo "$HOST localhost" > "$COMMON/host_aliases"
chown sgeadmin:sgeadmin "$COMMON/act_qmaster" "$COMMON/host_aliases"
mkdir -p "$LAB" /var/run/gridengine
chown sgeadmin:sgeadmin /var/run/gridengine

# ---- 3. qmaster -------------------------------------------------------------------
if ! pid_alive "$LAB/qmaster.pid"; then
    rm -f /var/spool/gridengine/qmaster/qmaster.pid /var/spool/gridengine/qmaster/lock
    /usr/sbin/sge_qmaster || die "sge_qmaster failed (see /var/spool/gridengine/qmaster/messages)"
    for _ in $(seq 1 100); do
        [ -s /var/spool/gridengine/qmaster/qmaster.pid ] && qconf -sh >/dev/null 2>&1 && break
        sleep 0.1
    done
    qconf -sh >/dev/null 2>&1 || { tail -n 20 /var/spool/gridengine/qmaster/messages >&2; die "qmaster does not answer"; }
    cp /var/spool/gridengine/qmaster/qmaster.pid "$LAB/qmaster.pid"
fi

# ---- 4. one-time cluster config (each step skipped when already done) -------------
T=$(mktemp -d)
qconf -sh  2>/dev/null | grep -qx "$HOST" || qconf -ah "$HOST" >/dev/null
qconf -ss  2>/dev/null | grep -qx "$HOST" || qconf -as "$HOST" >/dev/null
# root (uid 0) jobs are rejected with the default min_uid/min_gid 1000
qconf -sconf global | grep -v '^#' > "$T/global"
sed -i -e 's/^min_uid .*/min_uid                      0/' -e 's/^min_gid .*/min_gid                      0/' "$T/global"
qconf -Mconf "$T/global" >/dev/null
# default schedule_interval is 15 s: every job would wait up to 15 s
qconf -ssconf > "$T/sched"
sed -i -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' \
       -e 's/^flush_submit_sec .*/flush_submit_sec                  1/' \
       -e 's/^flush_finish_sec .*/flush_finish_sec                  1/' "$T/sched"
qconf -Msconf "$T/sched" >/dev/null
if ! qconf -sel 2>/dev/null | grep -qx "$HOST"; then
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$HOST" > "$T/exec"
    qconf -Ae "$T/exec" >/dev/null
fi
if ! qconf -shgrpl 2>/dev/null | grep -qx '@allhosts'; then
    printf 'group_name @allhosts\nhostlist %s\n' "$HOST" > "$T/hgrp"
    qconf -Ahgrp "$T/hgrp" >/dev/null
fi
SLOTS=$(nproc --all)  # --all: OMP_NUM_THREADS (set by dask for its workers) must not shrink the queue
cat > "$T/q" <<EOF
qname                 $QUEUE
hostlist              @allhosts
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               NONE
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      unix_behavior
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
if qconf -sql 2>/dev/null | grep -qx "$QUEUE"; then qconf -Mq "$T/q" >/dev/null; else qconf -Aq "$T/q" >/dev/null; fi
rm -rf "$T"

# ---- 5. execd -----------------------------------------------------------------------
if ! pid_alive "$LAB/execd.pid"; then
    rm -f /var/run/gridengine/execd.pid
    SGE_EXECD_PIDFILE=/var/run/gridengine/execd.pid /usr/sbin/sge_execd \
        || die "sge_execd failed (see /var/spool/gridengine/execd/*/messages)"
    for _ in $(seq 1 50); do [ -s /var/run/gridengine/execd.pid ] && break; sleep 0.1; done
    cp /var/run/gridengine/execd.pid "$LAB/execd.pid" || die "sge_execd wrote no pid file"
fi

# ---- 6. wait until the queue instance is usable -------------------------------------
for _ in $(seq 1 120); do cluster_up && break; sleep 0.5; done
cluster_up || { qstat -f >&2 || true; die "queue $QUEUE@$HOST not usable (execd not reporting?)"; }
qmod -c "$QUEUE" >/dev/null 2>&1 || true   # clear a stale error state, if any
log "SGE up: queue '$QUEUE' on $HOST, $SLOTS slots"
echo "$QUEUE"
