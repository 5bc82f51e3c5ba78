# shellcheck shell=bash
# The body of every slurm/*.sh batch script (sourced by them; not submitted itself). One task per node runs
# torchrun, which starts LASERS_NPROC_PER_NODE training processes on that node; the nodes meet through a c10d
# rendezvous on the first node. The batch shell stays in charge of preemption and requeue:
#
#   USR1 (sent by Slurm --signal=B:USR1@N before the time limit, or scancel --batch --signal=USR1)  ->  create the
#   run's stop file; every rank sees it at the next step boundary, they save one checkpoint together and exit
#   with status.json "stopped"  ->  scontrol requeue; the requeued job resumes with --resume auto.
#   TERM (scancel, preemption, the time limit itself) also creates the stop file, so the ranks checkpoint if
#   there is time, but the script never requeues then: that would undo a scancel, and Slurm requeues preempted
#   jobs itself. torchrun forwards TERM/USR1 to its workers and waits LASERS_SHUTDOWN_TIMEOUT s (not 30) for them.
#
# Requeue rules (out_dir/status.json, written by lasers-train), after anything but TERM: "finished" never;
# "stopped" when this script asked for the stop (USR1); "failed" with a "diverged" reason never; any other crash
# while SLURM_RESTART_COUNT is below LASERS_MAX_RESTARTS. A config that fails lasers-train's checks fails the
# job at once (exit 2), unrequeued.
#
# Variables (all optional):
#   LASERS_CONFIG           experiment config (default: the script's own, e.g. configs/dlgan_ffhq.yaml)
#   LASERS_DATA_DIR         folder with train-*.tar / val-*.tar (default: the config's data.*_shards)
#   LASERS_RUN_DIR          run directory, i.e. train.out_dir (default: the config's)
#   LASERS_NPROC_PER_NODE   processes per node (default: the node's GPUs, or 1 without GPUs)
#   LASERS_PYTHON           interpreter (default: PYTHON, else the active venv / conda env, else the
#                           checkout's .venv, else python3 on PATH; see launch/python_env.sh)
#   LASERS_MAX_RESTARTS     requeues after a crash (default 3; SLURM_RESTART_COUNT counts every requeue)
#   LASERS_RDZV_PORT        c10d rendezvous port on the first node (default 20000 + job id mod 20000)
#   LASERS_SHUTDOWN_TIMEOUT seconds torchrun gives the workers to checkpoint after a TERM (default 600)
#   OMP_NUM_THREADS         CPU threads per process (default: the task's CPUs / processes per node)
# Extra arguments are dotted config overrides for lasers-train (sbatch slurm/dlgan_ffhq.sh train.max_steps=1000).

lasers_log() { echo "[lasers-slurm $(date '+%F %T')] $*"; }

lasers_nproc_per_node() {
  if [[ -n ${LASERS_NPROC_PER_NODE:-} ]]; then
    echo "$LASERS_NPROC_PER_NODE"
  elif [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} -gt 0 ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null && [[ $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') -gt 0 ]]; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

# "state<TAB>reason<TAB>step" from status.json, or nothing when it is absent or unreadable.
lasers_status() {
  "$LASERS_PY" - "$1" 2>/dev/null <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(f"{s.get('state', '')}\t{s.get('reason', '')}\t{s.get('step', '')}")
except (OSError, ValueError):
    pass
PY
}

lasers_requeue() {
  lasers_log "requeueing job $SLURM_JOB_ID ($1); the next start resumes from the newest checkpoint"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  lasers_log "scontrol requeue failed (job cancelled, or not requeueable?): resubmit to continue, it resumes"
  exit 1
}

# USR1 / TERM: remember that this script asked for the stop, and create the stop file once its path is known.
lasers_on_signal() {
  LASERS_ASKED=$1
  lasers_log "$1: asking the ranks to checkpoint and stop"
  [[ -z ${LASERS_STOP_FILE:-} ]] || touch "$LASERS_STOP_FILE"
}

# lasers_job DEFAULT_CONFIG [section.key=value ...]
lasers_job() {
  set -uo pipefail  # no -e: the shell must outlive a failed training to decide about the requeue
  LASERS_ASKED="" LASERS_STOP_FILE=""
  trap 'lasers_on_signal USR1' USR1  # from the start: an untrapped USR1 would kill the shell
  trap 'lasers_on_signal TERM' TERM
  local config=${LASERS_CONFIG:-$1}
  shift
  # Relative paths (config, data, run directory) are the job's working directory's: where sbatch ran, or
  # --chdir. The script's own config is found in the checkout from anywhere.
  [[ -f $config || ! -f $LASERS_HOME/$config ]] || config=$LASERS_HOME/$config

  local overrides=()
  if [[ -n ${LASERS_DATA_DIR:-} ]]; then
    overrides+=("data.train_shards=$LASERS_DATA_DIR/train-*.tar" "data.val_shards=$LASERS_DATA_DIR/val-*.tar")
  fi
  [[ -z ${LASERS_RUN_DIR:-} ]] || overrides+=("train.out_dir=$LASERS_RUN_DIR")
  overrides+=("$@")  # the command line's own overrides come last and win

  source "$LASERS_HOME/launch/python_env.sh"
  PYTHON=${LASERS_PYTHON:-${PYTHON:-}} lasers_find_python "$LASERS_HOME"
  local procs nnodes head port restarts max_restarts
  procs=$(lasers_nproc_per_node)
  nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  head=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" 2>/dev/null | head -n 1)
  head=${head:-$(hostname -s)}
  port=${LASERS_RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
  restarts=${SLURM_RESTART_COUNT:-0}
  max_restarts=${LASERS_MAX_RESTARTS:-3}
  if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    # Set it ourselves: torchrun would otherwise pick 1 and print its banner on every start.
    OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}} / procs ))
    ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
  fi
  export OMP_NUM_THREADS NCCL_DEBUG=${NCCL_DEBUG:-WARN}

  lasers_log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-}${SLURM_ARRAY_TASK_ID:+, array ${SLURM_ARRAY_JOB_ID:-}_$SLURM_ARRAY_TASK_ID}), start $((restarts + 1)) (SLURM_RESTART_COUNT=$restarts)"
  lasers_log "nodes: ${SLURM_JOB_NODELIST:-$(hostname -s)} ($nnodes) x $procs process(es); rendezvous c10d $head:$port id ${SLURM_JOB_ID:-0}"
  lasers_log "checkout: $LASERS_HOME ($(git -C "$LASERS_HOME" describe --always --dirty 2>/dev/null || echo no git))"
  lasers_log "python: $LASERS_PY; OMP_NUM_THREADS=$OMP_NUM_THREADS; $(env | grep -E '^NCCL_' | sort | tr '\n' ' ')"
  lasers_log "config: $config ${overrides[*]+${overrides[*]}} --resume auto"

  # The checks lasers-train makes before any process group, for this job's world size: a bad config ends the
  # job here (never requeued), and the log shows the resolved config.
  local check
  check=$(RANK=0 WORLD_SIZE=$((nnodes * procs)) LOCAL_RANK=0 LOCAL_WORLD_SIZE=$procs MASTER_ADDR=$head \
    MASTER_PORT=$port "$LASERS_PY" -m lasers_dist.cli.train --config "$config" \
    ${overrides[@]+"${overrides[@]}"} --resume auto --check)
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    lasers_log "lasers-train --check failed (exit $rc): fix the config; not requeued"
    exit "$rc"
  fi
  echo "$check"
  local out_dir stop_file status_file
  out_dir=$(sed -n 's/^# out_dir: //p' <<<"$check")
  stop_file=$(sed -n 's/^# stop_file: //p' <<<"$check")
  status_file=$out_dir/status.json

  rm -f "$stop_file"  # a stale one (a stop that was never acted on) would stop this run at its first step
  LASERS_STOP_FILE=$stop_file
  [[ -z $LASERS_ASKED ]] || touch "$stop_file"  # the signal came during the checks
  local status_before
  status_before=$(stat -c %y "$status_file" 2>/dev/null)

  local torchrun=("$LASERS_PY" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$procs"
    --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="${SLURM_JOB_ID:-0}")
  local run_py  # torchrun's source, found without importing torch (seconds on a busy node)
  run_py=$("$LASERS_PY" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])' \
    2>/dev/null)/distributed/run.py
  if grep -q -- '--signals-to-handle' "$run_py" 2>/dev/null; then
    # shellcheck disable=SC2054  # one argument whose value is a comma-separated list
    torchrun+=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
      --shutdown-timeout="${LASERS_SHUTDOWN_TIMEOUT:-600}")
  else
    lasers_log "this torch's torchrun has no --signals-to-handle / --shutdown-timeout: it kills workers 30 s after a TERM; the stop file still works"
  fi
  lasers_log "launching: srun --ntasks-per-node=1 ${torchrun[*]} -m lasers_dist.cli.train ..."
  # --cpus-per-task explicitly: srun 22.05+ no longer takes it from sbatch, and the step would get 1 CPU per node.
  srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    "${torchrun[@]}" -m lasers_dist.cli.train --config "$config" ${overrides[@]+"${overrides[@]}"} \
    --resume auto &
  local pid=$!
  while :; do
    wait "$pid"
    rc=$?
    # wait returns early (status > 128) when a trapped signal arrives: keep waiting while training runs.
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    break
  done

  local state="" reason="" step=""
  if [[ $(stat -c %y "$status_file" 2>/dev/null) != "$status_before" ]]; then
    IFS=$'\t' read -r state reason step <<<"$(lasers_status "$status_file")"
  fi
  lasers_log "training exited $rc; status: ${state:-none written} ${reason:+($reason)} ${step:+at step $step}"
  if [[ $LASERS_ASKED == TERM ]]; then
    # scancel, preemption or the time limit: Slurm is ending the job. Requeueing it here would undo a scancel;
    # a preempted job is requeued by Slurm itself (PreemptMode=REQUEUE).
    lasers_log "Slurm is ending this job (TERM): not requeued by this script; resubmit to continue from the checkpoint"
    [[ $state == stopped ]] && exit 0
    exit "$rc"
  fi
  case $state in
    finished)
      lasers_log "run finished: $out_dir"
      exit 0 ;;
    stopped)
      if [[ -n $LASERS_ASKED ]]; then
        lasers_requeue "stopped on $LASERS_ASKED"
      fi
      lasers_log "stopped ($reason) without a request from this script: not requeued; resubmit to continue"
      exit 0 ;;
    failed)
      if [[ $reason == diverged* ]]; then
        lasers_log "training diverged: not requeued (see $out_dir and the reason above)"
        exit 3
      fi ;;
  esac
  if ((restarts < max_restarts)); then
    lasers_requeue "after a crash; SLURM_RESTART_COUNT=$restarts < LASERS_MAX_RESTARTS=$max_restarts"
  fi
  lasers_log "crashed and SLURM_RESTART_COUNT=$restarts reached LASERS_MAX_RESTARTS=$max_restarts: not requeued"
  exit $((rc == 0 ? 1 : rc))
}
