"""An evaluation folder: metrics.json, per_image.jsonl, the PNGs and report.md (readable on its own).

    DIR/metrics.json        the numbers (METRIC_KEYS: a number or null, reasons under "unavailable"), what was
                            evaluated ("evaluated", "source"), where it came from ("training_provenance")
    DIR/per_image.jsonl     one line per image, in evaluation order: index, key, psnr, ssim, [ms_ssim, lpips, flip]
    DIR/reconstructions.png originals / [model inputs] / reconstructions / FLIP heatmaps
    DIR/atoms.png           atoms (or codebook vectors) as tiles, by usage, and the usage curve
    DIR/atom_embedding.png  the atoms in 2-D (UMAP, or PCA without umap-learn)
    DIR/latents.png         top singular component of the latent map before / after the bottleneck
    DIR/training_curves.png PSNR and perplexity during training (when the run's metrics.jsonl is found)
    DIR/report.md           the table, what is unavailable and why, and every picture
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lasers_dist.eval import pictures
from lasers_dist.eval.evaluate import EvalResult
from lasers_dist.eval.source import ModelSource

# (metrics.json key, column title, format) for the summary table, in the paper's order.
TABLE_COLUMNS = (
    ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("ms_ssim", "MS-SSIM", "{:.4f}"),
    ("lpips", "LPIPS", "{:.4f}"), ("flip", "FLIP", "{:.4f}"), ("rfid", "rFID", "{:.2f}"),
    ("perplexity", "perplexity", "{:.1f}"), ("used_fraction", "used", "{:.1%}"), ("dead_atoms", "dead", "{:d}"),
    ("bits_per_pixel", "bits/pixel", "{:.3f}"), ("entropy_bits_per_pixel", "entropy bits/pixel (est.)", "{:.3f}"),
    ("num_images", "images", "{:d}"),
)


def format_value(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_table(metrics: dict[str, Any]) -> str:
    """A two-column markdown table of the headline numbers."""
    rows = [[title, format_value(metrics.get(key), fmt)] for key, title, fmt in TABLE_COLUMNS]
    return markdown_table(["metric", "value"], rows)


def _json_ready(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no infinity: an identical image's PSNR is written as null with "psnr_infinite": true.
    out = dict(record)
    if isinstance(out.get("psnr"), float) and math.isinf(out["psnr"]):
        out["psnr"], out["psnr_infinite"] = None, True
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_title(metrics: dict[str, Any]) -> str:
    e = metrics["evaluated"]
    title = f"{e['model_kind']} K={e['num_atoms']}"
    if e["bottleneck"] == "dictionary":
        title += f" S={e['sparsity']}" + (f" b={e['coeff_bits']}" if e["coeff_bits"] else "")
    step = metrics.get("source", {}).get("step")
    return title + (f" (step {step})" if step is not None else "")


def write_report(result: EvalResult, source: ModelSource, out_dir: str | Path, shards: Any) -> Path:
    """Write the evaluation folder; returns the path of report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = dict(result.metrics)
    metrics["source"] = {"source": source.source, "checkpoint": source.checkpoint, "step": source.step,
                         "run_dir": str(source.run_dir) if source.run_dir else None,
                         "omp_backend": source.meta.get("omp_backend")}
    metrics["evaluated"] = {**metrics["evaluated"], "shards": shards}
    metrics["training_provenance"] = source.provenance()
    title = model_title(metrics)
    figures = _draw(result, source, out, title)
    metrics["pictures"] = [p.name for p in figures]
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    lines = "".join(json.dumps(_json_ready(r), allow_nan=False) + "\n" for r in result.records)
    _write_atomic(out / "per_image.jsonl", lines)
    _write_atomic(out / "report.md", _report_markdown(metrics, title, figures))
    return out / "report.md"


def _draw(result: EvalResult, source: ModelSource, out: Path, title: str) -> list[Path]:
    figures = []
    if result.pictures:
        figures.append(pictures.reconstructions_figure(result.pictures, out / "reconstructions.png", title))
        figures.append(pictures.latent_figure(result.pictures, out / "latents.png", title))
    figures.append(pictures.atoms_figure(result.atoms, result.usage, out / "atoms.png", title))
    figures.append(pictures.embedding_figure(result.atoms, result.usage, out / "atom_embedding.png", title))
    log = source.metrics_log()
    if log is not None:
        curves = pictures.training_curves_figure(log, out / "training_curves.png", title)
        if curves is not None:
            figures.append(curves)
    return figures


_CAPTIONS = {
    "reconstructions.png": "Originals, reconstructions and FLIP error maps (dark = faithful), paper Figs. 9-12.",
    "latents.png": "Top singular component of the encoder output and of the coded latent (same direction), "
                   "paper Figs. 5-6.",
    "atoms.png": "Atoms (codebook vectors for VQ) as grayscale tiles, most used first, and usage over the "
                 "evaluation set, paper Figs. 7-8 (a).",
    "atom_embedding.png": "The atoms in two dimensions, coloured by usage, paper Figs. 7-8 (b).",
    "training_curves.png": "PSNR and perplexity during training, raw and Savitzky-Golay smoothed, paper Fig. 4.",
}


def _report_markdown(metrics: dict[str, Any], title: str, figures: list[Path]) -> str:
    e, s = metrics["evaluated"], metrics["source"]
    limit = "" if e["limit"] is None else f" (limit {e['limit']})"
    parts = [f"# Evaluation: {title}", "",
             f"Source `{s['source']}` (checkpoint `{s['checkpoint']}`, step {s['step']}); task {e['task']}; "
             f"{metrics['num_images']} images of {e['image_size']}x{e['image_size']} from `{e['shards']}`{limit}.",
             "", metrics_table(metrics), ""]
    parts += [
        f"Rate: {metrics['bits_per_signal']:.2f} bits per coded signal ({e['coded_signals_per_image']} signals "
        f"per image), {metrics['bits_per_latent']:.2f} bits per latent position; entropy-coded estimate "
        f"{metrics['entropy_bits_per_pixel']:.3f} bits/pixel (an estimate, not a codec). Usage entropy "
        f"{metrics['usage_entropy_bits']:.2f} bits, {metrics['mean_nonzeros']:.2f} nonzero coefficients per "
        "signal on average.", ""]
    if metrics.get("psnr_infinite"):
        parts += [f"{metrics['psnr_infinite']} images were reproduced exactly (PSNR +inf) and are left out of the "
                  "PSNR mean.", ""]
    if metrics.get("corrupt_samples"):
        parts += [f"{metrics['corrupt_samples']} samples could not be decoded and were skipped.", ""]
    if metrics["unavailable"]:
        parts += ["## Unavailable", ""]
        parts += [f"- **{k}**: {reason}" for k, reason in metrics["unavailable"].items()]
        parts.append("")
    parts += ["## What was evaluated", "", "```json", json.dumps(e, indent=2), "```", ""]
    if figures:
        parts += ["## Pictures", ""]
        for figure in figures:
            parts += [f"![{figure.stem}]({figure.name})", "", _CAPTIONS.get(figure.name, ""), ""]
    return "\n".join(parts)
