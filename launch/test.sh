#!/usr/bin/env bash
# The README's test command: set up what is missing, then run the whole test suite.
# The Slurm tests (marker `slurm`) start a one-node cluster with launch/local_slurm.sh; as root on Debian/Ubuntu
# they first install slurm-wlm and munge when missing, and they skip with the reason when not root.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/launch/python_env.sh"
lasers_setup "$repo"
cd "$repo"
status=0
"$LASERS_PY" -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "[test] pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit $status
