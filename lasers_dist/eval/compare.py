"""Compare evaluations: a paper-style table, a rate-distortion plot and Bjøntegaard deltas.

Each evaluation folder (a metrics.json written by lasers-eval) is one point. Points are grouped into curves, by
default one per model (a DL model evaluated at several --sparsity / --coeff-bits settings traces a curve), or
one per model kind (e.g. VQ-VAE runs with K = 64, 256, 512). Between two curves with at least 4 points each the
Bjøntegaard delta (VCEG-M33: cubic fits, averaged over the overlapping interval) is reported:
    BD-rate  average bit-rate difference at equal PSNR, in percent (negative: the curve needs fewer bits)
    BD-PSNR  average PSNR difference at equal rate, in dB (positive: the curve is better)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lasers_dist.eval.report import format_value, markdown_table, model_title

MIN_BD_POINTS = 4
COMPARE_COLUMNS = (("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("lpips", "LPIPS", "{:.4f}"),
                   ("flip", "FLIP", "{:.4f}"), ("rfid", "rFID", "{:.2f}"), ("perplexity", "perplexity", "{:.1f}"),
                   ("used_fraction", "used", "{:.1%}"), ("bits_per_pixel", "bits/pixel", "{:.3f}"))


@dataclass
class Point:
    """One evaluation: its folder, the curve it belongs to, its table label, and its metrics.json."""

    folder: Path
    curve: str
    label: str
    metrics: dict[str, Any]


def find_evaluations(path: str | Path) -> list[Path]:
    """An eval folder (holding metrics.json), or a run directory / any folder with eval folders below it."""
    path = Path(path)
    if (path / "metrics.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob("metrics.json")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path}: no metrics.json in or below it; run `lasers-eval {path} --shards ... "
                                f"--out {path}/eval/NAME` first")
    return found


def _model_name(metrics: dict[str, Any]) -> str:
    source = metrics.get("source", {})
    if source.get("run_dir"):
        return Path(source["run_dir"]).name
    return Path(source.get("checkpoint") or source.get("source") or "model").stem


def load_points(paths: list[str | Path], group: str = "model") -> list[Point]:
    """Every evaluation under `paths` as a Point; group "model" (one curve per run / checkpoint) or "kind"."""
    if group not in ("model", "kind"):
        raise ValueError(f"group must be 'model' or 'kind', got {group!r}")
    points = []
    for path in paths:
        for folder in find_evaluations(path):
            try:
                metrics = json.loads((folder / "metrics.json").read_text())
                kind = metrics["evaluated"]["model_kind"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{folder / 'metrics.json'} is not a lasers-eval metrics file ({err})") from err
            name = _model_name(metrics)
            curve = f"{name} ({kind})" if group == "model" else kind
            points.append(Point(folder, curve, f"{name}: {model_title(metrics)}", metrics))
    return points


def curves_of(points: list[Point]) -> dict[str, list[Point]]:
    """Points per curve (in first-seen order), each sorted by bits per pixel."""
    curves: dict[str, list[Point]] = {}
    for point in points:
        curves.setdefault(point.curve, []).append(point)
    return {k: sorted(v, key=lambda p: p.metrics.get("bits_per_pixel") or 0.0) for k, v in curves.items()}


def _integral(coeffs: np.ndarray, low: float, high: float) -> float:
    antiderivative = np.polyint(coeffs)
    return float(np.polyval(antiderivative, high) - np.polyval(antiderivative, low))


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    low, high = max(a.min(), b.min()), min(a.max(), b.max())
    if high <= low:
        raise ValueError("the two curves do not overlap")
    return float(low), float(high)


def bd_rate(rate_a, psnr_a, rate_b, psnr_b) -> float:
    """Average rate difference of curve b against curve a at equal PSNR, in percent."""
    psnr_a, psnr_b = np.asarray(psnr_a, float), np.asarray(psnr_b, float)
    fit_a = np.polyfit(psnr_a, np.log(rate_a), 3)
    fit_b = np.polyfit(psnr_b, np.log(rate_b), 3)
    low, high = _overlap(psnr_a, psnr_b)
    mean_log_ratio = (_integral(fit_b, low, high) - _integral(fit_a, low, high)) / (high - low)
    return (math.exp(mean_log_ratio) - 1.0) * 100.0


def bd_psnr(rate_a, psnr_a, rate_b, psnr_b) -> float:
    """Average PSNR difference of curve b against curve a at equal rate, in dB."""
    log_a, log_b = np.log(np.asarray(rate_a, float)), np.log(np.asarray(rate_b, float))
    fit_a, fit_b = np.polyfit(log_a, psnr_a, 3), np.polyfit(log_b, psnr_b, 3)
    low, high = _overlap(log_a, log_b)
    return (_integral(fit_b, low, high) - _integral(fit_a, low, high)) / (high - low)


def _rd(points: list[Point]) -> tuple[list[float], list[float]] | None:
    pairs = [(p.metrics.get("bits_per_pixel"), p.metrics.get("psnr")) for p in points]
    pairs = [(r, q) for r, q in pairs if r and q is not None]
    if len({r for r, _ in pairs}) < MIN_BD_POINTS or len({q for _, q in pairs}) < MIN_BD_POINTS:
        return None
    return [r for r, _ in pairs], [q for _, q in pairs]


def _increasing(rates: list[float], psnrs: list[float]) -> bool:
    ordered = [q for _, q in sorted(zip(rates, psnrs))]
    return all(b > a for a, b in zip(ordered, ordered[1:]))


def bjontegaard(curves: dict[str, list[Point]]) -> list[dict[str, Any]]:
    """BD-rate / BD-PSNR of every curve with >= 4 points against the first such curve (the anchor)."""
    usable = {name: rd for name, pts in curves.items() if (rd := _rd(pts)) is not None}
    if len(usable) < 2:
        return []
    anchor, (rate_a, psnr_a) = next(iter(usable.items()))
    out = []
    for name, (rate_b, psnr_b) in list(usable.items())[1:]:
        entry: dict[str, Any] = {"anchor": anchor, "curve": name, "bd_rate_percent": None, "bd_psnr_db": None}
        if not (_increasing(rate_a, psnr_a) and _increasing(rate_b, psnr_b)):
            entry["warning"] = "a curve's PSNR does not rise with its rate: the cubic fits, so the deltas, are unreliable"
        # Each delta needs its own overlap: BD-rate of the PSNR ranges, BD-PSNR of the rate ranges.
        for key, delta, over in (("bd_rate_percent", bd_rate, "PSNR"), ("bd_psnr_db", bd_psnr, "rate")):
            try:
                entry[key] = delta(rate_a, psnr_a, rate_b, psnr_b)
            except ValueError:
                entry.setdefault("unavailable", {})[key] = f"the two curves' {over} ranges do not overlap"
        out.append(entry)
    return out


def comparison_table(points: list[Point]) -> tuple[str, list[dict[str, Any]]]:
    """(markdown table, JSON rows): model | PSNR | SSIM | LPIPS | FLIP | rFID | perplexity | used | bits/pixel."""
    rows, records = [], []
    for point in points:
        rows.append([point.label] + [format_value(point.metrics.get(k), f) for k, _, f in COMPARE_COLUMNS])
        records.append({"model": point.label, "curve": point.curve, "folder": str(point.folder),
                        **{k: point.metrics.get(k) for k, _, _ in COMPARE_COLUMNS},
                        "num_images": point.metrics.get("num_images")})
    return markdown_table(["model"] + [t for _, t, _ in COMPARE_COLUMNS], rows), records


def rd_figure(curves: dict[str, list[Point]], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    for name, points in curves.items():
        pairs = [(p.metrics.get("bits_per_pixel"), p.metrics.get("psnr")) for p in points]
        pairs = [(r, q) for r, q in pairs if r and q is not None]
        if pairs:
            ax.plot(*zip(*pairs), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (fixed-length code, log scale)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Rate-distortion")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")
    return path


def compare(paths: list[str | Path], out_dir: str | Path, group: str = "model") -> dict[str, Any]:
    """Write OUT/comparison.md, OUT/comparison.json and OUT/rate_distortion.png; returns the JSON content."""
    points = load_points(paths, group)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, records = comparison_table(points)
    curves = curves_of(points)
    deltas = bjontegaard(curves)
    figure = rd_figure(curves, out / "rate_distortion.png")
    result = {"rows": records, "curves": {k: [str(p.folder) for p in v] for k, v in curves.items()},
              "bjontegaard": deltas, "plot": figure.name}
    (out / "comparison.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    lines = ["# Comparison", "", table, ""]
    for d in deltas:
        rate = "n/a" if d["bd_rate_percent"] is None else f"{d['bd_rate_percent']:+.1f} %"
        psnr = "n/a" if d["bd_psnr_db"] is None else f"{d['bd_psnr_db']:+.2f} dB"
        why = "; ".join([*d.get("unavailable", {}).values(), *([d["warning"]] if "warning" in d else [])])
        lines.append(f"- {d['curve']} vs {d['anchor']}: BD-rate {rate}, BD-PSNR {psnr}" + (f" ({why})" if why else ""))
    lines += ["", f"![rate-distortion]({figure.name})", ""]
    (out / "comparison.md").write_text("\n".join(lines))
    result["markdown"] = "\n".join(lines)
    return result
