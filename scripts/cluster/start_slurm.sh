#!/usr/bin/env bash
# Start a single-node SLURM (munged + slurmctld + slurmd) on this machine, without
# systemd, so that blmm's SLURM engine can be tested for real (tests/engine/test_engine_cluster.py).
# Idempotent: if the cluster already answers, it only prints the partition name.
# Must run as root.  Installs the Debian packages (slurmctld slurmd slurm-client munge)
# when missing.  Not meant for a production cluster: one node, no accounting, no cgroups.
#
#   bash scripts/cluster/start_slurm.sh   -> prints the partition name on stdout (last line)
#
# Env knobs:
#   SLURM_LAB_DIR   state/log/pid dir        (default /tmp/slurm-lab)
#   SLURM_LAB_PART  partition name           (default debug)
#   SLURM_LAB_MEM   RealMemory in MB         (default: 75% of MemTotal, max 16000)
#   SLURM_LAB_FORCE=1  overwrite an /etc/slurm/slurm.conf not written by this script
set -euo pipefail

LAB=${SLURM_LAB_DIR:-/tmp/slurm-lab}
PART=${SLURM_LAB_PART:-debug}
CONF=/etc/slurm/slurm.conf
MARK="# written by start_slurm.sh (single-node test cluster)"

die() { echo "start_slurm.sh: ERROR: $*" >&2; exit 1; }
log() { echo "start_slurm.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as the submitting user; munged/slurm need root to set up)"

pid_alive() {  # pidfile ; a zombie (PID 1 here reaps late) does not count
    [ -s "$1" ] || return 1
    local p; p=$(cat "$1")
    [ -r "/proc/$p/stat" ] && ! awk '{exit !($3=="Z")}' "/proc/$p/stat"
}

cluster_up() {
    # exit 0 if the controller answers and the node is usable
    local st
    st=$(timeout 10 sinfo -h -p "$PART" -o '%T' 2>/dev/null | head -1) || return 1
    case "$st" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac
}

if command -v sinfo >/dev/null 2>&1 && pid_alive "$LAB/run/slurmctld.pid" \
   && pid_alive "$LAB/run/slurmd.pid" && cluster_up; then
    log "already running"
    echo "$PART"
    exit 0
fi

# ---- 1. packages (only when missing) ------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null \
        || die "SLURM is not installed and apt-get is missing (not Debian/Ubuntu): install slurmctld, slurmd, slurm-client and munge yourself"
    log "installing slurmctld slurmd slurm-client munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    # start_sge.sh may run apt at the same time: serialise on one lock file
    exec 9>/var/lock/blmm-cluster-apt.lock; flock -w 900 9 || die "timed out waiting for /var/lock/blmm-cluster-apt.lock"
    apt-get update -qq >/dev/null || die "apt-get update failed (no network or no package mirror?)"
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
    exec 9>&-
fi

# ---- 2. config ----------------------------------------------------------------------
HOST=$(hostname -s)
mkdir -p "$LAB"/{state,spool,log,run} /etc/slurm
CPUS=$(nproc --all)  # --all: OMP_NUM_THREADS (set by dask for its workers) must not shrink the node
if [ -n "${SLURM_LAB_MEM:-}" ]; then
    MEM=$SLURM_LAB_MEM
else
    MEM=$(awk '/MemTotal/ {m=int($2/1024*0.75); if (m>16000) m=16000; print m}' /proc/meminfo)
fi

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${SLURM_LAB_FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script (set SLURM_LAB_FORCE=1 to overwrite)"
fi
cat > "$CONF" <<EOF
$MARK
ClusterName=lab
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
ReturnToService=2
SlurmdTimeout=60
StateSaveLocation=$LAB/state
SlurmdSpoolDir=$LAB/spool
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ---- 3. munge -----------------------------------------------------------------------

mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
chmod 0755 /run/munge
chmod 0700 /etc/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "generating munge key"
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    # stale socket/pid from a previous run would make munged refuse to start
    if ! pid_alive /run/munge/munged.pid; then rm -f /run/munge/munged.pid /run/munge/munge.socket.2*; fi
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munge round-trip failed (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$LAB/run/munged.pid" 2>/dev/null || pgrep -u munge -x munged | head -1 > "$LAB/run/munged.pid"
    touch "$LAB/run/munged.started-by-us"
fi

# ---- 4. slurmctld + slurmd ----------------------------------------------------------
if ! pid_alive "$LAB/run/slurmctld.pid"; then
    rm -f "$LAB/run/slurmctld.pid"
    /usr/sbin/slurmctld -c -f "$CONF" || die "slurmctld failed to start (see $LAB/log/slurmctld.log)"
fi
if ! pid_alive "$LAB/run/slurmd.pid"; then
    rm -f "$LAB/run/slurmd.pid"
    /usr/sbin/slurmd -f "$CONF" || die "slurmd failed to start (see $LAB/log/slurmd.log)"
fi

# ---- 5. wait for the node to be idle ------------------------------------------------
for _ in $(seq 1 120); do
    cluster_up && break
    sleep 0.5
done
if ! cluster_up; then
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    sleep 1
fi
cluster_up || {
    sinfo -N -l >&2 || true
    tail -n 20 "$LAB/log/slurmctld.log" "$LAB/log/slurmd.log" >&2 || true
    die "SLURM did not become ready (node not idle)"
}
log "SLURM up: partition '$PART', node $HOST, $CPUS CPUs, ${MEM}MB; logs in $LAB/log"
echo "$PART"
