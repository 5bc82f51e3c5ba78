#!/usr/bin/env bash
# Verify a GPU machine in one command (about 10 minutes on one GPU once torch is installed):
#   bash launch/gpu_check.sh [OUT_DIR]          (default: bench_results/gpu_check-<date>-<time>)
# Installs what is missing (launch/setup.sh, and Triton if torch came without it), then on CUDA device 0 runs the
# CUDA-marked tests (the Triton kernel's agreement cases and self-check natively), `lasers-bench omp --backend all
# --grid --device cuda`, `lasers-bench step --device cuda` and a short single-GPU bf16 quickstart, and writes
# OUT_DIR/report.md and OUT_DIR/report.json (the card, the figures, what failed). A failing step does not stop
# the others. Exit code: 0 all passed, 1 something failed (see the report), 3 no CUDA device here.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
out=${1:-$repo/bench_results/gpu_check-$(date +%Y%m%d-%H%M%S)}

no_cuda() {
  echo "gpu_check: no CUDA device: $1. Nothing was run or installed; run this on a GPU node," \
       "e.g. srun --gpus=1 bash launch/gpu_check.sh" >&2
  exit 3
}

# Without a GPU there is nothing to verify: say so before installing anything (exit 4 below: torch is missing).
reason=$("$py" - <<'PY' 2>/dev/null
import sys
try:
    import torch
except ImportError:
    sys.exit(4)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no GPU")
    sys.exit(1)
PY
)
case $? in
  0) ;;
  4) nvidia-smi -L >/dev/null 2>&1 || no_cuda "nvidia-smi finds no GPU (and torch is not installed)" ;;
  *) no_cuda "${reason:-torch cannot use CUDA here}" ;;
esac

if ! bash "$repo/launch/setup.sh"; then
  echo "gpu_check: launch/setup.sh failed (see above): the package cannot be installed, so nothing was checked" >&2
  exit 1
fi
if ! "$py" -c "import triton" >/dev/null 2>&1; then
  echo "[gpu_check] installing triton (torch's CUDA wheels normally bring it)"
  "$py" -m pip install --quiet --root-user-action=ignore triton \
    || echo "[gpu_check] could not install triton: the Triton steps will fail and the report will say so" >&2
fi
cd "$repo" || exit 1
exec "$py" -m lasers_dist.kernels.gpu_check --out "$out"
