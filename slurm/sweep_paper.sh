#!/usr/bin/env bash
#SBATCH --job-name=lasers_paper
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --output=%x-%A_%a.out
# The paper-table runs as one job array: one array task per config in configs/paper/ (sorted by name), each
# training into its own run directory runs/paper/<config name> and requeued on its own like any slurm/ job.
#   bash slurm/sweep_paper.sh [section.key=value ...]     submits the array (sbatch --array=0-<N-1> this file)
#   bash slurm/sweep_paper.sh -p gpu --time=8:00:00 -- train.max_steps=1000     sbatch options before a "--"
#   sbatch --array=0-3%2 slurm/sweep_paper.sh              by hand (here: the first 4 configs, 2 at a time)
# Variables: LASERS_SWEEP_CONFIGS (glob, relative to the checkout; default configs/paper/*.yaml), LASERS_RUN_ROOT (default runs/paper),
# and those of slurm/run_job.sh (LASERS_DATA_DIR, LASERS_NPROC_PER_NODE, ...). The config list is fixed when
# the array is submitted with bash (LASERS_SWEEP_LIST), so adding a config later does not shift the tasks.
script=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')}
script=${script:-$0}
[[ $script == /* ]] || script=${SLURM_SUBMIT_DIR:-$PWD}/$script
source "${LASERS_HOME:=$(cd "$(dirname "$script")/.." && pwd)}/slurm/run_job.sh"

if [[ -n ${LASERS_SWEEP_LIST:-} ]]; then
  IFS=: read -r -a configs <<<"$LASERS_SWEEP_LIST"
else
  pattern=${LASERS_SWEEP_CONFIGS:-configs/paper/*.yaml}
  [[ $pattern == /* ]] || pattern=$LASERS_HOME/$pattern  # relative to the checkout
  # shellcheck disable=SC2206  # the glob is meant to expand (sorted by name)
  configs=($pattern)
fi
if [[ ! -f ${configs[0]} ]]; then
  lasers_log "no config matches ${pattern:-$LASERS_SWEEP_LIST}"
  exit 2
fi

# Run with bash (not by Slurm, whose copy of a batch script is named slurm_script): submit the array.
if [[ -z ${SLURM_ARRAY_TASK_ID:-} && ${0##*/} != slurm_script ]]; then
  sbatch_options=()
  if [[ " $* " == *" -- "* ]]; then  # sbatch options -- overrides
    while [[ $1 != -- ]]; do sbatch_options+=("$1"); shift; done
    shift
  fi
  lasers_log "submitting ${#configs[@]} array tasks: ${configs[*]##*/}"
  LASERS_SWEEP_LIST=$(IFS=:; echo "${configs[*]}") LASERS_HOME=$LASERS_HOME \
    exec sbatch --array="0-$((${#configs[@]} - 1))" ${sbatch_options[@]+"${sbatch_options[@]}"} "$script" "$@"
fi
task=${SLURM_ARRAY_TASK_ID:-}
if [[ -z $task || $task -ge ${#configs[@]} ]]; then
  lasers_log "array task '${task}' has no config (${#configs[@]} configs): submit with bash slurm/sweep_paper.sh"
  exit 2
fi
name=$(basename "${configs[$task]}" .yaml)
LASERS_CONFIG=${configs[$task]} LASERS_RUN_DIR=${LASERS_RUN_ROOT:-runs/paper}/$name lasers_job "${configs[$task]}" "$@"
