#!/usr/bin/env bash
# Train on one node with torchrun, one process per GPU (NPROC overrides; CPU-only machines default to 1).
#   bash launch/train_node.sh CONFIG [section.key=value ...] [--resume auto]
set -euo pipefail
if [[ $# -lt 1 || ! -f $1 ]]; then
  echo "usage: bash launch/train_node.sh CONFIG.yaml [section.key=value ...] [--resume auto]" >&2
  exit 2
fi
config=$1
shift
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
lasers_find_python "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py=$LASERS_PY
nproc=${NPROC:-$("$py" -c 'import torch; print(torch.cuda.device_count() or 1)')}
lasers_export_threads "$nproc"
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  -m lasers_dist.cli.train --config "$config" "$@"
