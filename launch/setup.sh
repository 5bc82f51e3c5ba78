#!/usr/bin/env bash
# Install whatever this checkout needs and is missing; safe to run again (it does nothing when all is there).
#   PYTHON       interpreter to install into (default: the active venv / conda env, else the checkout's .venv,
#                else python3; an "externally managed" system Python gets a new .venv instead: see python_env.sh)
#   TORCH_SPEC   how to get torch when it is absent (default: the release this project is tested with;
#                on a GPU cluster, install your own CUDA build of torch first and this step is skipped)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/python_env.sh"
lasers_resolve_python "$repo"
py=$LASERS_PY
torch_spec=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $torch_spec"
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet --root-user-action=ignore $torch_spec
fi

# The editable install must point at THIS checkout (CI clones into a new folder) and every dependency must import.
installed_from=$("$py" - "$repo/pyproject.toml" <<'PY' 2>/dev/null || true
# Every requirement of pyproject.toml (dependencies and the dev extra) must be installed at an accepted version,
# so that a dependency added since the last install triggers a new one.
import importlib.metadata as md, importlib.util, pathlib, re, sys
text = pathlib.Path(sys.argv[1]).read_text()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
block += re.search(r"^dev = \[(.*?)^\]", text, re.S | re.M).group(1)
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
for spec in re.findall(r'"([^"]+)"', block):
    if Requirement is None:
        md.version(re.split(r"[<>=!~\[; ]", spec)[0])
        continue
    req = Requirement(spec)
    if req.marker is None or req.marker.evaluate():
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            sys.exit(f"{req.name} {md.version(req.name)} does not satisfy {spec}")
spec = importlib.util.find_spec("lasers_dist.kernels")
print(pathlib.Path(spec.origin).resolve().parent.parent)
PY
)
installed_from=${installed_from##*$'\n'}  # last line only: deepspeed logs to stdout on import
if [[ "$installed_from" != "$repo" ]]; then
  echo "[setup] installing lasers_dist (editable, with the dev extra) from $repo"
  # DS_BUILD_OPS=0: DeepSpeed installs from source without compiling its CUDA/C++ ops (JIT-built if ever used).
  (cd "$repo" && DS_BUILD_OPS=0 "$py" -m pip install --quiet --root-user-action=ignore -e ".[dev]")
fi
echo "[setup] ready: $py | $("$py" -c 'import torch, deepspeed; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null | tail -n 1)"
