"""Verify a GPU machine in one go: `bash launch/gpu_check.sh [OUT_DIR]` (which installs what is missing first).

    python -m lasers_dist.kernels.gpu_check --out OUT_DIR [--budget-s 570]

Runs these steps in order on CUDA device 0, each a subprocess with its own time limit inside one overall
budget (10 minutes with set-up), and goes on after any failure; a step that would start past the budget is
reported as not run:
  cuda-tests  pytest -m cuda: the torch backend on CUDA, the Triton kernel's agreement cases natively, the
              self-check on this card
  bench-omp   lasers-bench omp --backend all --grid --device cuda (with the self-check per (K, dim, S))
  bench-step  lasers-bench step --device cuda (share of OMP in a DL-GAN step, against VQ-GAN)
  quickstart  launch/quickstart.sh on one GPU in bf16, 200 steps (DeepSpeed, NCCL, the trainer's backend choice)
Then OUT_DIR/report.json and OUT_DIR/report.md: the card, versions, each step's outcome, time and log, the
figures, and what failed (with the end of its log). Exit code 0 when every step passed, 1 otherwise, 3 without a
CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXIT_NO_CUDA = 3
# The H100 targets of the README's benchmark table, checked at the paper's shape.
PAPER_SHAPE = {"N": 2**20, "K": 512, "dim": 16, "S": 5}
TARGET_VECTORS_PER_S = 1e9
TARGET_SPEEDUP_OVER_TORCH = 5.0


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    command: str
    status: str  # "passed", "failed", "timed out", "not run"
    seconds: float
    returncode: int | None
    log: str
    note: str = ""


def standard_steps(out: Path) -> list[Step]:
    py = sys.executable
    quickstart = ["train.precision=bf16", "train.max_steps=200", "loss.disc_start=100", "train.log_every=20",
                  "train.checkpoint_every=100", "train.sample_every=100", "train.val_every=100"]
    return [
        Step("cuda-tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                            f"--basetemp={out / 'pytest'}", f"--junitxml={out / 'cuda-tests.xml'}", "tests"], 150),
        Step("bench-omp", [py, "-m", "lasers_dist.cli.bench", "omp", "--backend", "all", "--grid", "--device", "cuda",
                           "--repeats", "2", "--sklearn-subset", "256", "--json", str(out / "omp.json")], 200),
        Step("bench-step", [py, "-m", "lasers_dist.cli.bench", "step", "--device", "cuda", "--steps", "5",
                            "--json", str(out / "step.json")], 60),
        Step("quickstart", ["bash", str(REPO / "launch" / "quickstart.sh"), *quickstart], 150,
             env={"NPROC": "1", "RUN_DIR": str(out / "quickstart"), "DATA_DIR": str(out / "data"),
                  "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}),
    ]


def run_steps(steps: list[Step], out: Path, budget_s: float) -> list[StepResult]:
    """Run every step (whatever the previous ones did) within budget_s seconds in all; logs under out/logs."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    results = []
    for step in steps:
        log = out / "logs" / f"{step.name}.log"
        left = deadline - time.monotonic()
        if left < 10:
            results.append(StepResult(step.name, " ".join(step.argv), "not run", 0.0, None, str(log),
                                      f"the {budget_s:.0f} s budget was used up by the steps before"))
            continue
        print(f"[gpu_check] {step.name}: {' '.join(step.argv)}", flush=True)
        results.append(run_step(step, log, min(step.timeout_s, left)))
        print(f"[gpu_check] {step.name}: {results[-1].status} in {results[-1].seconds:.0f} s", flush=True)
    return results


def run_step(step: Step, log: Path, timeout_s: float) -> StepResult:
    """One step in its own process group (a timeout kills torchrun's workers too), output to `log`."""
    start = time.monotonic()
    with open(log, "w") as handle:
        process = subprocess.Popen(step.argv, cwd=REPO, env={**os.environ, **step.env}, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
            status, note = ("passed" if returncode == 0 else "failed"), ""
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
            status, note = "timed out", f"killed after {timeout_s:.0f} s"
    return StepResult(step.name, " ".join(step.argv), status, time.monotonic() - start, returncode, str(log), note)


# ---- figures ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def junit_counts(junit: Path) -> dict[str, int] | None:
    """passed / failed / errors / skipped of a pytest --junitxml file."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"] + total["errors"], "skipped": total["skipped"], "failed_tests": failed}


def omp_figures(result: dict | None) -> dict | None:
    """Per (N, K, dim, S): vectors/s of each backend and triton / torch; the paper shape against the targets."""
    if not result:
        return None
    table: dict[tuple, dict] = {}
    for row in result.get("rows", []):
        key = (row["K"], row["dim"], row["S"]) if row["backend"] == "sklearn" else (row["N"], row["K"], row["dim"],
                                                                                   row["S"])
        table.setdefault(key, {})[row["backend"]] = row["vectors_per_s"]
    rows = []
    for key, rates in table.items():
        if len(key) != 4:
            continue
        n, k, dim, s = key
        torch_rate, triton_rate = rates.get("torch"), rates.get("triton")
        rows.append({"N": n, "K": k, "dim": dim, "S": s, "torch": torch_rate, "triton": triton_rate,
                     "sklearn": table.get((k, dim, s), {}).get("sklearn"),
                     "triton_over_torch": triton_rate / torch_rate if torch_rate and triton_rate else None})
    paper = next((r for r in rows if all(r[key] == value for key, value in PAPER_SHAPE.items())), None)
    targets = None
    if paper and paper["triton"]:
        targets = {"vectors_per_s": paper["triton"], "vectors_per_s_target": TARGET_VECTORS_PER_S,
                   "speedup_over_torch": paper["triton_over_torch"],
                   "speedup_target": TARGET_SPEEDUP_OVER_TORCH,
                   "met": paper["triton"] >= TARGET_VECTORS_PER_S
                   and (paper["triton_over_torch"] or 0) >= TARGET_SPEEDUP_OVER_TORCH}
    checks = result.get("self_checks", [])
    return {"rows": rows, "paper_shape": paper, "targets": targets,
            "self_checks_passed": sum(1 for c in checks if c["auto_backend"] == "triton"),
            "self_checks": checks,
            "problems": [entry for entry in result.get("skipped", []) if entry.get("failed")]}


def step_figures(result: dict | None) -> dict | None:
    if not result:
        return None
    keys = ("device_name", "batch", "image_size", "omp_backend", "omp_backend_reason", "dlgan_step_ms", "omp_ms",
            "omp_share", "vqgan_step_ms", "dlgan_over_vqgan", "lpips_random_backbone")
    return {key: result.get(key) for key in keys}


def quickstart_figures(run_dir: Path) -> dict | None:
    summary, provenance = _read_json(run_dir / "summary.json"), _read_json(run_dir / "provenance.json")
    if summary is None and provenance is None:
        return None
    figures = dict(summary or {})
    if provenance:
        figures.update({key: provenance.get(key) for key in
                        ("omp_backend", "omp_backend_reason", "omp_self_check", "device_name", "world_size")})
    status = _read_json(run_dir / "status.json")
    figures["status"] = status.get("state") if isinstance(status, dict) else None
    return figures


def card_info() -> dict:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = f"not importable: {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"card": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1), "visible_devices": torch.cuda.device_count()})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


# ---- report ----------------------------------------------------------------------------------------------------


def build_report(card: dict, results: list[StepResult], out: Path) -> dict:
    figures = {
        "cuda_tests": junit_counts(out / "cuda-tests.xml"),
        "bench_omp": omp_figures(_read_json(out / "omp.json")),
        "bench_step": step_figures(_read_json(out / "step.json")),
        "quickstart": quickstart_figures(out / "quickstart"),
    }
    failures = [{"step": r.name, "status": r.status, "note": r.note, "log": r.log, "log_tail": _tail(Path(r.log))}
                for r in results if r.status != "passed"]
    omp = figures["bench_omp"]
    if omp:
        failures += [{"step": "bench-omp", "status": "failed", "note": f"{p['backend']} at N={p['N']}, K={p['K']}, "
                      f"dim={p['dim']}, S={p['S']}: {p['reason']}", "log": "", "log_tail": ""} for p in omp["problems"]]
        failures += [{"step": "bench-omp", "status": "failed", "log": "", "log_tail": "",
                      "note": f"self-check K={c['K']}, dim={c['dim']}, S={c['S']}: auto uses {c['auto_backend']} "
                              f"({c['reason']})"} for c in omp["self_checks"] if c["auto_backend"] != "triton"]
    quick = figures["quickstart"]
    if quick and quick.get("omp_backend") not in (None, "triton"):
        failures.append({"step": "quickstart", "status": "failed", "log": "", "log_tail": "",
                         "note": f"trained with omp backend {quick.get('omp_backend')}: {quick.get('omp_backend_reason')}"})
    return {"ok": not failures, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "card": card,
            "steps": [asdict(r) for r in results], "figures": figures, "failures": failures}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def format_report(report: dict) -> str:
    card, figures = report["card"], report["figures"]
    lines = [f"# GPU check: {card.get('card', 'no CUDA device')}", "",
             f"{'**All steps passed.**' if report['ok'] else '**Something failed** (see Failures).'} "
             f"{report['time']}", "",
             f"Card {card.get('card')} (compute capability {card.get('capability')}, {card.get('memory_gib')} GiB, "
             f"{card.get('visible_devices')} visible), driver {card.get('driver')}, CUDA {card.get('cuda')}, "
             f"torch {card.get('torch')}, Triton {card.get('triton')}, Python {card.get('python')}.", "",
             "## Steps", "", "| step | outcome | seconds | log |", "|---|---|---|---|"]
    for step in report["steps"]:
        outcome = step["status"] + (f" ({step['note']})" if step["note"] else "")
        lines.append(f"| {step['name']} | {outcome} | {step['seconds']:.0f} | {step['log']} |")
    tests = figures["cuda_tests"]
    if tests:
        lines += ["", f"CUDA-marked tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} "
                      "skipped."]
    omp = figures["bench_omp"]
    if omp:
        lines += ["", "## Batch-OMP (vectors/s)", "",
                  f"Triton self-check passed for {omp['self_checks_passed']} of {len(omp['self_checks'])} (K, dim, S).",
                  ""]
        if omp["targets"]:
            t = omp["targets"]
            lines += [f"Paper shape (N=2^20, K=512, dim 16, S=5): Triton {_num(t['vectors_per_s'])} vectors/s "
                      f"(target {_num(t['vectors_per_s_target'])}), {_num(t['speedup_over_torch'], '{:.1f}')}x the "
                      f"torch backend (target {t['speedup_target']:.0f}x): {'met' if t['met'] else 'NOT met'}.", ""]
        lines += ["| N | K | dim | S | torch | triton | triton/torch | sklearn (CPU) |", "|---|---|---|---|---|---|---|---|"]
        for r in omp["rows"]:
            lines.append(f"| {r['N']} | {r['K']} | {r['dim']} | {r['S']} | {_num(r['torch'])} | {_num(r['triton'])} | "
                         f"{_num(r['triton_over_torch'], '{:.1f}x')} | {_num(r['sklearn'])} |")
    step = figures["bench_step"]
    if step:
        lines += ["", "## One DL-GAN step", "",
                  f"Batch {step['batch']} at {step['image_size']}^2, OMP backend {step['omp_backend']}: DL-GAN step "
                  f"{_num(step['dlgan_step_ms'], '{:.1f}')} ms, of which Batch-OMP {_num(step['omp_ms'], '{:.2f}')} ms "
                  f"({_num(step['omp_share'] and 100 * step['omp_share'], '{:.1f}')}%); VQ-GAN step "
                  f"{_num(step['vqgan_step_ms'], '{:.1f}')} ms (ratio {_num(step['dlgan_over_vqgan'], '{:.2f}')})."]
    quick = figures["quickstart"]
    if quick:
        lines += ["", "## Quickstart (1 GPU, bf16)", "",
                  f"{quick.get('steps')} steps, status {quick.get('status')}; train PSNR "
                  f"{_num(quick.get('first_train_psnr'), '{:.2f}')} -> {_num(quick.get('last_train_psnr'), '{:.2f}')} dB, "
                  f"val PSNR {_num(quick.get('val_psnr'), '{:.2f}')} dB, {_num(quick.get('images_per_s'), '{:.1f}')} "
                  f"images/s; omp backend {quick.get('omp_backend')} ({quick.get('omp_backend_reason')})."]
    if report["failures"]:
        lines += ["", "## Failures", ""]
        for failure in report["failures"]:
            lines.append(f"- **{failure['step']}**: {failure['status']}"
                         + (f", {failure['note']}" if failure["note"] else "")
                         + (f" (log: {failure['log']})" if failure["log"] else ""))
            if failure["log_tail"]:
                lines += ["", "  ```", *("  " + line for line in failure["log_tail"].splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(format_report(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lasers_dist.kernels.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the report, logs and benchmark JSON")
    parser.add_argument("--budget-s", type=float, default=570.0, help="seconds for all steps together")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) "
              "sees no GPU; run this on a GPU node", file=sys.stderr)
        return EXIT_NO_CUDA
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    card = card_info()
    print(f"[gpu_check] {card.get('card')} (capability {card.get('capability')}), report in {out}", flush=True)
    results = run_steps(standard_steps(out), out, args.budget_s)
    report = build_report(card, results, out)
    write_report(report, out)
    print(format_report(report))
    print(f"[gpu_check] wrote {out / 'report.md'} and {out / 'report.json'}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
