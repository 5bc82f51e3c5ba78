#!/usr/bin/env bash
# The README's main job. On a fresh machine: install what is missing, build the built-in photo shards
# (scikit-image's photographs + LFW faces, offline), train a small DL-GAN with 2 processes under torchrun
# (gloo on CPU, NCCL when GPUs are present), validate on the val shards and print what it achieved.
#   bash launch/quickstart.sh [section.key=value ...]      e.g. train.max_steps=100 for a shorter try
#   NPROC=4 RUN_DIR=runs/qs2 DATA_DIR=data/photos bash launch/quickstart.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/python_env.sh"
lasers_setup "$repo"
py=$LASERS_PY
cd "$repo"

data=${DATA_DIR:-data/photos}
run=${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}  # a new folder: earlier runs are kept
nproc=${NPROC:-2}
lasers_export_threads "$nproc"

echo "[quickstart] building the built-in photo shards in $data (skipped when complete)"
"$py" -m lasers_dist.cli.shard --builtin photos "$data" --size 64 --no-progress

overrides=("data.train_shards=$data/train-*.tar" "data.val_shards=$data/val-*.tar" "train.out_dir=$run")
# Real LPIPS needs AlexNet's weights in the torch cache; offline, train on MSE alone and say so.
if ! "$py" -c "from lasers_dist.losses.reconstruction import backbone_weights_path as p; import sys; sys.exit(not p('alex').is_file())" 2>/dev/null; then
  echo "[quickstart] LPIPS backbone weights are not in the torch cache: training with loss.perceptual_weight=0 (MSE only)"
  overrides+=("loss.perceptual_weight=0")
fi

echo "[quickstart] training: $nproc processes, config configs/quickstart_cpu.yaml, run directory $run"
"$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  -m lasers_dist.cli.train --config configs/quickstart_cpu.yaml "${overrides[@]}" "$@"

echo "[quickstart] result"
"$py" -m lasers_dist.cli.summary "$run"

echo "[quickstart] evaluation of the final checkpoint on the val shards (lasers-eval)"
"$py" -m lasers_dist.cli.eval "$run" --shards "$data/val-*.tar" --out "$run/eval" --no-progress
echo "[quickstart] the report with every picture: $run/eval/report.md"
