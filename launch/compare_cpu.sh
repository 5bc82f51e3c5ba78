#!/usr/bin/env bash
# A CPU-sized DL-vs-VQ comparison on the built-in photos (64x64), at equal bits: NOT the paper's setting.
# Trains one DL-VAE and VQ-VAEs with several codebook sizes (same encoder/decoder, same steps, MSE only, 2 CPU
# processes), evaluates the DL model at several (sparsity, coefficient bits) points (one model, one RD curve)
# and each VQ model once (one point each, together the VQ curve), then runs lasers-compare. Every model revives
# its dead atoms / codes (model.revive_dead_every), the usual practice for VQ baselines, which collapse to a few
# codes without it. About 10 minutes on a quiet 2-core machine with the defaults.
#   bash launch/compare_cpu.sh
#   STEPS=20 VQ_SIZES="16 64 256 1024" DL_POINTS="1:2 1:4 2:4 3:4" LIMIT=24 OUT=runs/compare_try bash launch/compare_cpu.sh
# Results: $OUT/compare/comparison.md (the table and BD-rate), $OUT/compare/rate_distortion.png, and the DL and
# VQ reconstruction figures copied to $OUT/readme/.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/python_env.sh"
lasers_setup "$repo"
py=$LASERS_PY
cd "$repo"

data=${DATA_DIR:-data/photos}
out=${OUT:-runs/compare_cpu}
steps=${STEPS:-1000}
nproc=${NPROC:-2}
lasers_export_threads "$nproc"
vq_sizes=${VQ_SIZES:-64 256 1024 4096}
# S:B = code with S atoms and B-bit coefficients. S = 1 at 2-4 bits spends what VQ with K = 1,024-4,096 spends
# (log2 256 + B vs log2 K bits per latent), so the two curves overlap there.
dl_points=${DL_POINTS:-1:2 1:3 1:4 1:6 2:6 3:6 4:6 5:6}
limit=(${LIMIT:+--limit "$LIMIT"})
start=$(date +%s)

echo "[compare] built-in photo shards in $data (skipped when complete)"
"$py" -m lasers_dist.cli.shard --builtin photos "$data" --size 64 --no-progress

# The quickstart's model and schedule, as a VAE (no discriminator) trained on MSE alone for both families.
common=("data.train_shards=$data/train-*.tar" "data.val_shards=$data/val-*.tar" "model.discriminator=false"
        "loss.perceptual_weight=0" "train.max_steps=$steps" "train.checkpoint_every=$steps"
        "train.val_every=0" "train.sample_every=0" "train.keep_checkpoints=1" "model.revive_dead_every=100" "optim.warmup_steps=$((steps / 40))")
train() {  # name, overrides...
  local name=$1
  shift
  if [[ -f "$out/$name/status.json" ]] && grep -q '"finished"' "$out/$name/status.json"; then
    echo "[compare] $name already trained"
    return
  fi
  echo "[compare] training $name ($steps steps, $nproc processes)"
  "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m lasers_dist.cli.train \
    --config configs/quickstart_cpu.yaml "${common[@]}" "train.out_dir=$out/$name" "$@" >"$out/$name.log" 2>&1 \
    || { echo "[compare] training $name failed; see $out/$name.log" >&2; tail -n 20 "$out/$name.log" >&2; exit 1; }
}
evaluate() {  # run name, eval name, options...
  local run=$1 name=$2
  shift 2
  echo "[compare] evaluating $run ($name)"
  "$py" -m lasers_dist.cli.eval "$out/$run" --shards "$data/val-*.tar" --out "$out/$run/eval/$name" \
    --no-progress --no-rfid "${limit[@]}" "$@" >"$out/$run/eval-$name.log" 2>&1 \
    || { echo "[compare] evaluation failed; see $out/$run/eval-$name.log" >&2; tail -n 20 "$out/$run/eval-$name.log" >&2; exit 1; }
}

mkdir -p "$out"
train dl_vae model.bottleneck=dictionary model.num_atoms=256 model.sparsity=5
for k in $vq_sizes; do
  train "vq_vae_k$k" model.bottleneck=vq "model.num_atoms=$k"
done

evaluate dl_vae float32                      # the trained S = 5, float coefficients
for point in $dl_points; do
  s=${point%%:*} b=${point##*:}
  evaluate dl_vae "s${s}_b${b}" --sparsity "$s" --coeff-bits "$b"
done
for k in $vq_sizes; do
  evaluate "vq_vae_k$k" default
done

vq_runs=()
for k in $vq_sizes; do vq_runs+=("$out/vq_vae_k$k"); done
"$py" -m lasers_dist.cli.compare "$out/dl_vae" "${vq_runs[@]}" --group kind --out "$out/compare"
mkdir -p "$out/readme"
cp "$out/compare/comparison.md" "$out/compare/rate_distortion.png" "$out/readme/"
cp "$out/dl_vae/eval/float32/reconstructions.png" "$out/readme/dl_vae_reconstructions.png"
largest=${vq_sizes##* }
cp "$out/vq_vae_k$largest/eval/default/reconstructions.png" "$out/readme/vq_vae_k${largest}_reconstructions.png"
echo "[compare] done in $(( $(date +%s) - start )) s; README material in $out/readme/"
