#!/usr/bin/env bash
#SBATCH --job-name=dlgan_ffhq1024
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1            # one torchrun per node; it starts one training process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64            # the node's share for the processes and their data workers
#SBATCH --mem=0                        # all of the node's memory
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append             # a requeued job appends to the same log
#SBATCH --signal=B:USR1@900           # 15 min before the time limit: checkpoint, then requeue
#SBATCH --output=%x-%j.out
# DL-GAN on FFHQ 1024x1024 (deep encoder/decoder, attention, ZeRO-2): configs/dlgan_ffhq1024.yaml.
#   sbatch slurm/dlgan_ffhq1024.sh [section.key=value ...]        from the checkout; extra arguments are config overrides
#   sbatch --nodes=2 slurm/dlgan_ffhq1024.sh train.batch_size=...  more nodes (the batch must divide by all processes)
#   LASERS_DATA_DIR=/scratch/ffhq LASERS_RUN_DIR=runs/x sbatch slurm/dlgan_ffhq1024.sh
# Shards first: lasers-shard /path/to/ffhq data/ffhq1024 --kind ffhq --keep-size --format jpeg --quality 95
# Every variable, the requeue rules and the logs: slurm/run_job.sh and the README's "On a cluster".
# Slurm runs a copy of this file from its spool folder: find the checkout from the path sbatch was given.
script=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')}
script=${script:-$0}
[[ $script == /* ]] || script=${SLURM_SUBMIT_DIR:-$PWD}/$script
source "${LASERS_HOME:=$(cd "$(dirname "$script")/.." && pwd)}/slurm/run_job.sh"
lasers_job configs/dlgan_ffhq1024.yaml "$@"
