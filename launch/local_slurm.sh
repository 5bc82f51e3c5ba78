#!/usr/bin/env bash
# A one-node Slurm cluster on this machine: for the tests (tests/test_slurm.py) and for trying the slurm/ scripts
# on a workstation before a real cluster. Everything it writes lives in DIR (config, munge key and socket, state,
# logs, pid files); nothing under /etc is touched and a system Slurm or munge, if any, is left alone.
#
#   bash launch/local_slurm.sh install      as root on Debian/Ubuntu: apt-get install slurm-wlm munge when missing
#   bash launch/local_slurm.sh start DIR    munged + slurmctld + slurmd (as root); then: export SLURM_CONF=DIR/slurm.conf
#   bash launch/local_slurm.sh stop DIR     cancel DIR's jobs, stop exactly the daemons `start DIR` started
#
# The node is declared with what `slurmd -C` finds (all CPUs, real memory). AuthInfo=cred_expire=5 lets a requeued
# job start again ~6 s after it ends (Slurm holds it for cred_expire + 1 s, 121 s by default), and sched_interval=1
# makes the scheduler look at it then, instead of at its next minute.
set -euo pipefail

usage() { echo "usage: bash launch/local_slurm.sh install | start DIR | stop DIR" >&2; exit 2; }
log() { echo "[local-slurm] $*" >&2; }

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (slurmd starts jobs as any user and munged guards the credentials)"
    exit 3
  fi
}

cmd_install() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  need_root
  if ! command -v apt-get >/dev/null; then
    log "Slurm is not installed and this is not a Debian/Ubuntu system: install slurm-wlm and munge by hand"
    exit 3
  fi
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; then
    apt-get update -q >/dev/null  # a fresh image may have no package lists yet
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

write_conf() {
  local dir=$1 host node
  host=$(hostname -s)
  # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  node=$(slurmd -C | head -n 1)
  cat >"$dir/slurm.conf" <<EOF
# Written by launch/local_slurm.sh for a one-node test cluster; all state in $dir.
ClusterName=lasers-local
SlurmctldHost=$host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
InactiveLimit=0
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local dir=$1
  mkdir -p "$dir/munge"
  chmod 700 "$dir/munge"
  if [[ ! -f $dir/munge/munge.key ]]; then
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
  fi
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "timed out waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

node_idle() { [[ $(sinfo -h -N -o %T 2>/dev/null | head -n 1) == idle ]]; }

cmd_start() {
  local dir
  need_root
  mkdir -p "$1"
  dir=$(cd "$1" && pwd)
  mkdir -p "$dir/state" "$dir/spool"
  write_conf "$dir"
  export SLURM_CONF=$dir/slurm.conf
  start_munge "$dir"
  slurmctld -c -f "$SLURM_CONF"  # -c: no state from an earlier cluster in this folder
  slurmd -f "$SLURM_CONF"
  if ! wait_for 60 "the node to become idle" node_idle; then
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
    cmd_stop "$dir"
    exit 1
  fi
  log "up: $(sinfo -h -N -o '%N %c CPUs %m MB %T'); export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile FILE: TERM the daemon whose pid FILE holds, KILL it after 20 s
  local pid
  [[ -f $1 ]] || return 0
  pid=$(cat "$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  wait_for 20 "pid $pid to exit" bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
}

no_jobs() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }

# The slurmstepd processes of this cluster's jobs (they inherit its SLURM_CONF from slurmd).
our_stepds() {
  local pid
  for pid in $(pgrep -x slurmstepd); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF"; then
      echo "$pid"
    fi
  done
}
no_stepds() { [[ -z $(our_stepds) ]]; }

cmd_stop() {
  local dir
  dir=$(cd "$1" && pwd)
  export SLURM_CONF=$dir/slurm.conf
  # Jobs first: their slurmstepd processes would outlive slurmd.
  if [[ -f $dir/slurmctld.pid ]] && ! no_jobs; then
    # shellcheck disable=SC2046  # one argument per job id
    scancel --full --quiet $(squeue -h -o %i) 2>/dev/null || true
    wait_for 60 "the jobs to end" no_jobs || true
  fi
  # A job's slurmstepd reports its end to slurmctld, retrying for ever if that is gone: let it finish first.
  wait_for 30 "the jobs' slurmstepd processes to end" no_stepds || true
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  local pid
  for pid in $(our_stepds); do
    log "killing slurmstepd $pid, left over by a job of this cluster"
    kill -KILL "$pid" 2>/dev/null || true
  done
  log "stopped the daemons of $dir"
}

case ${1:-} in
  install) cmd_install ;;
  start) [[ $# -eq 2 ]] || usage; cmd_start "$2" ;;
  stop) [[ $# -eq 2 ]] || usage; cmd_stop "$2" ;;
  *) usage ;;
esac
