"""Run a test file again in a child pytest with Triton's CPU interpreter on.

Triton reads TRITON_INTERPRET when a kernel is defined, for the whole process, so kernel cases cannot switch the
interpreter on inside a shared pytest process; test files that need it re-run themselves through this.
"""

from __future__ import annotations

import os
import subprocess
import sys


def assert_passes_under_interpreter(test_file: str) -> None:
    """Every collected case of test_file passes (none skipped) in a child pytest with TRITON_INTERPRET=1."""
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0, f"interpreter run failed:\n{child.stdout[-6000:]}\n{child.stderr[-3000:]}"
    assert "passed" in summary and "skipped" not in summary, child.stdout[-3000:]
