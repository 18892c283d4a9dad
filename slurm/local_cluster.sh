#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the tests (Debian's slurm-wlm and munge; run as root).
#   slurm/local_cluster.sh start   # idempotent: reuses daemons that already answer
#   slurm/local_cluster.sh stop
# Everything lives in $DDPM_SLURM_DIR (default /tmp/ddpm-slurm); clients need SLURM_CONF=$DDPM_SLURM_DIR/slurm.conf.
set -euo pipefail
DIR=${DDPM_SLURM_DIR:-/tmp/ddpm-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  chown -R slurm:slurm "$DIR/state" 2>/dev/null || true
  cat > "$CONF" <<CONF
ClusterName=ddpm-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=5
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

up() { timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

start() {
  if up; then echo "slurm: already up"; return 0; fi
  write_conf
  if ! timeout 5 munge -n </dev/null >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    mkdir -p /run/munge && chown munge:munge /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged || /usr/sbin/munged --force
  fi
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -f "$CONF"
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd -f "$CONF"
  for _ in $(seq 60); do
    if up; then echo "slurm: up"; return 0; fi
    timeout 5 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm: did not come up; see $DIR/log" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

stop() {
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
