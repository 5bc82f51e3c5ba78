# shellcheck shell=bash
# Which Python the launch and Slurm scripts use (sourced by setup.sh, test.sh, quickstart.sh, train_node.sh,
# compare_cpu.sh and slurm/run_job.sh), and how many CPU threads their training processes get. The Python:
#   1. PYTHON, when set;
#   2. an active virtual environment or conda env, as it is (on a cluster: your own env with your CUDA torch);
#   3. this checkout's .venv, when it exists;
#   4. python3 on PATH.
# Set-up (lasers_resolve_python) adds one rule: when 4. is "externally managed" (PEP 668: Debian's and Ubuntu's
# system Python refuse pip installs), it creates a virtual environment in the checkout's .venv and uses that.

# lasers_find_python REPO: sets LASERS_PY (and LASERS_PY_FROM: python|venv|conda|checkout|path).
lasers_find_python() {
  local repo=$1
  if [[ -n ${PYTHON:-} ]]; then
    LASERS_PY=$PYTHON LASERS_PY_FROM=python
  elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    LASERS_PY=$VIRTUAL_ENV/bin/python LASERS_PY_FROM=venv
  elif [[ -n ${CONDA_PREFIX:-} && -x $CONDA_PREFIX/bin/python ]]; then
    LASERS_PY=$CONDA_PREFIX/bin/python LASERS_PY_FROM=conda
  elif [[ -x $repo/.venv/bin/python ]]; then
    LASERS_PY=$repo/.venv/bin/python LASERS_PY_FROM=checkout
  else
    LASERS_PY=$(command -v python3 || echo python3) LASERS_PY_FROM=path
  fi
}

# lasers_resolve_python REPO: lasers_find_python, creating REPO/.venv in place of an externally managed python3.
lasers_resolve_python() {
  local repo=$1
  lasers_find_python "$repo"
  [[ $LASERS_PY_FROM == path ]] || return 0
  if ! command -v "$LASERS_PY" >/dev/null; then
    echo "[setup] no python3 on PATH: install Python >= 3.10" >&2
    return 1
  fi
  "$LASERS_PY" -c 'import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.isfile(marker) and sys.prefix == sys.base_prefix else 1)' || return 0
  echo "[setup] $LASERS_PY is externally managed (PEP 668: pip may not install into it): creating a virtual" \
    "environment in $repo/.venv and using it (to use it yourself: source $repo/.venv/bin/activate)" >&2
  if ! "$LASERS_PY" -m venv --system-site-packages "$repo/.venv"; then
    echo "[setup] could not create $repo/.venv: install Python's venv module (Debian/Ubuntu: apt install" \
      "python3-venv), or activate an environment of your own, or set PYTHON" >&2
    rm -rf "$repo/.venv"
    return 1
  fi
  LASERS_PY=$repo/.venv/bin/python LASERS_PY_FROM=checkout
}

# lasers_export_threads NPROC: OMP_NUM_THREADS for NPROC training processes on this machine: yours when set,
# else this machine's cores shared among them. Set before torchrun, which otherwise picks 1 and prints a banner.
lasers_export_threads() {
  local procs=$1 cores
  cores=$(nproc)  # the cores this process may use (GNU nproc honours OMP_NUM_THREADS, which is unset here)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / procs > 0 ? cores / procs : 1 ))}
}

# lasers_setup REPO: install what REPO needs and is missing (launch/setup.sh), then set LASERS_PY to the
# interpreter set-up installed into (the same rules, so a .venv created for an externally managed Python is used).
lasers_setup() {
  local repo=$1
  bash "$repo/launch/setup.sh"
  lasers_resolve_python "$repo"
}
