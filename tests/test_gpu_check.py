"""launch/gpu_check.sh and its orchestrator (kernels/gpu_check.py), on a machine without a GPU: the clear refusal,
and the step runner and report with real processes (a step that fails, one that hangs, one left out of the
budget, a real pytest run's junit file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lasers_dist.kernels import gpu_check
from lasers_dist.kernels.gpu_check import Step, build_report, format_report, omp_figures, run_steps, write_report

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_touches_nothing(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == gpu_check.EXIT_NO_CUDA, result.stdout + result.stderr
    assert "gpu_check: no CUDA device" in result.stderr and "sees no GPU" in result.stderr
    assert "[setup]" not in result.stdout  # refused before installing anything
    assert not out.exists()


def test_steps_run_past_failures_and_the_report_says_what_failed(tmp_path):
    tests = tmp_path / "test_probe.py"
    tests.write_text("def test_fine():\n    pass\n\n\ndef test_broken():\n    assert 1 == 2, 'probe failure'\n")
    py = sys.executable
    steps = [
        Step("cuda-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'cuda-tests.xml'}",
                            f"--rootdir={tmp_path}", str(tests)], 120),
        Step("hangs", [py, "-c", "import time; print('started', flush=True); time.sleep(600)"], 2),
        Step("fine", [py, "-c", "print('ok')"], 60),
    ]
    results = run_steps(steps, tmp_path, budget_s=600)
    # A step that would start with less than 10 s of the budget left is not started.
    results += run_steps([Step("too-late", [py, "-c", "print('never')"], 60)], tmp_path, budget_s=5)
    assert [r.status for r in results] == ["failed", "timed out", "passed", "not run"]
    assert "started" in Path(results[1].log).read_text()
    report = build_report({"card": "probe card", "capability": "9.0"}, results, tmp_path)
    assert not report["ok"]
    assert report["figures"]["cuda_tests"]["passed"] == 1 and report["figures"]["cuda_tests"]["failed"] == 1
    assert report["figures"]["cuda_tests"]["failed_tests"] == ["test_probe::test_broken"]
    assert {f["step"] for f in report["failures"]} == {"cuda-tests", "hangs", "too-late"}
    write_report(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# GPU check: probe card") and "**Something failed**" in text
    assert "| hangs | timed out (killed after 2 s)" in text and "probe failure" in text
    assert "too-late**: not run" in text and (tmp_path / "report.json").is_file()


def test_omp_figures_pair_backends_and_check_the_targets():
    rows = [
        {"backend": "sklearn", "N": 256, "K": 512, "dim": 16, "S": 5, "vectors_per_s": 2e3},
        {"backend": "torch", "N": 2**20, "K": 512, "dim": 16, "S": 5, "vectors_per_s": 1e8},
        {"backend": "triton", "N": 2**20, "K": 512, "dim": 16, "S": 5, "vectors_per_s": 1.2e9},
        {"backend": "torch", "N": 2**14, "K": 256, "dim": 64, "S": 8, "vectors_per_s": 1e7},
    ]
    checks = [{"K": 512, "dim": 16, "S": 5, "auto_backend": "triton", "reason": "passed", "check": None},
              {"K": 256, "dim": 64, "S": 8, "auto_backend": "torch", "reason": "failed: boom", "check": None}]
    skipped = [{"backend": "triton", "N": 2**14, "K": 256, "dim": 64, "S": 8, "failed": True, "reason": "boom"}]
    figures = omp_figures({"rows": rows, "self_checks": checks, "skipped": skipped})
    paper = figures["paper_shape"]
    assert (paper["triton_over_torch"], paper["sklearn"]) == (12.0, 2e3)
    assert figures["targets"]["met"] and figures["self_checks_passed"] == 1
    report = {"ok": False, "time": "now", "card": {"card": "H100"}, "steps": [], "failures": [],
              "figures": {"cuda_tests": None, "bench_omp": figures, "bench_step": None, "quickstart": None}}
    text = format_report(report)
    assert "Triton 1,200,000,000 vectors/s" in text and "12.0x the torch backend (target 5x): met" in text
    assert "| 16384 | 256 | 64 | 8 | 10,000,000 | - | - | - |" in text
