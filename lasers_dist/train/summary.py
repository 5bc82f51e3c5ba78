"""What a finished run achieved, read back from its directory (metrics.jsonl, samples/, checkpoints/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl as a list of dicts (one per logged step); a torn last line is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a lasers-train run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves at most one partial line
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """First and last training PSNR, final validation numbers, throughput and the newest sample grid."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train_psnr, val_psnr = _series(rows, "train/psnr"), _series(rows, "val/psnr")
    speeds = [v for _, v in _series(rows, "images_per_s")][1:]  # the first interval includes start-up
    samples = sorted((run_dir / "samples").glob("*.png"))
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": max((int(r["step"]) for r in rows), default=0),
        "first_train_psnr": train_psnr[0][1] if train_psnr else None,
        "first_train_psnr_step": train_psnr[0][0] if train_psnr else None,
        "last_train_psnr": train_psnr[-1][1] if train_psnr else None,
        "val_psnr": val_psnr[-1][1] if val_psnr else None,
        "images_per_s": sum(speeds) / len(speeds) if speeds else None,
        "sample_grid": str(samples[-1]) if samples else None,
        "checkpoint": str(checkpoints[-1]) if checkpoints else None,
    }
    for key in ("val/perplexity", "val/dead_atoms", "val/mse", "val/lpips", "train/perplexity"):
        series = _series(rows, key)
        summary[key.replace("/", "_")] = series[-1][1] if series else None
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A readable two-column table of `summarize_run`'s result."""

    def num(value: Any, unit: str = "", digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    lines = [
        ("steps", str(summary["steps"])),
        (f"train PSNR, first log (step {summary['first_train_psnr_step']})", num(summary["first_train_psnr"], " dB")),
        ("train PSNR, last log", num(summary["last_train_psnr"], " dB")),
        ("val PSNR", num(summary["val_psnr"], " dB")),
        ("val perplexity (atom usage)", num(summary["val_perplexity"], "", 1)),
        ("val dead atoms", num(summary["val_dead_atoms"], "", 0)),
        ("images/s (all ranks)", num(summary["images_per_s"], "", 1)),
        ("reconstruction grid", summary["sample_grid"] or "n/a"),
        ("checkpoint", summary["checkpoint"] or "n/a"),
    ]
    width = max(len(k) for k, _ in lines)
    rule = "-" * (width + 2) + "+" + "-" * 40
    return "\n".join([rule] + [f"{k:<{width}}  | {v}" for k, v in lines] + [rule])
