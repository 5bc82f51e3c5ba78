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
# CPU threads per process: yours when set, else this node's cores shared among the processes (set here, so
# torchrun does not pick 1 and print its banner).
cores=$(nproc)  # the cores this process may use (OMP_NUM_THREADS is unset when it counts)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  -m lasers_dist.cli.train --config "$config" "$@"
