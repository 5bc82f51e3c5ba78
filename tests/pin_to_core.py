"""Test helper (not collected by pytest): pin this process to one CPU core, its global RANK modulo the cores it
may use, then run a module as `python -m` would.

    torchrun --nproc_per_node=2 ... tests/pin_to_core.py -m lasers_dist.cli.train --config CFG ...

Results of CPU training are bit-identical across launch layouts only when every process runs the same number
of threads; pinning each process to its own core also keeps two processes from sharing one.
"""

from __future__ import annotations

import os
import runpy
import sys

if __name__ == "__main__":
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ.get("RANK", "0")) % len(cores)]})
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: pin_to_core.py -m MODULE [ARGS ...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
