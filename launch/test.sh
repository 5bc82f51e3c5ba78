#!/usr/bin/env bash
# The README's test command: set up what is missing, then run the whole test suite.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/launch/setup.sh"
cd "$repo"
status=0
"${PYTHON:-python3}" -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "[test] pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit $status
