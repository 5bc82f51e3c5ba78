"""lasers-compare: Bjøntegaard deltas on curves with known answers, the table, the RD plot, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lasers_dist.cli.compare import main as compare_main
from lasers_dist.eval.compare import bd_psnr, bd_rate, compare, find_evaluations


def test_bd_rate_and_psnr_on_shifted_curves() -> None:
    rates = np.array([0.1, 0.2, 0.4, 0.8, 1.6])
    psnr = 20 + 4 * np.log2(rates / 0.1) - 0.1 * np.log2(rates / 0.1) ** 2  # a smooth, concave RD curve
    # The same curve at 80% of the rate: 20% fewer bits at every PSNR.
    assert bd_rate(rates, psnr, rates * 0.8, psnr) == pytest.approx(-20.0, abs=1e-6)
    assert bd_rate(rates, psnr, rates * 1.5, psnr) == pytest.approx(50.0, abs=1e-6)
    # 0.5 dB better at every rate.
    assert bd_psnr(rates, psnr, rates, psnr + 0.5) == pytest.approx(0.5, abs=1e-9)
    assert bd_psnr(rates, psnr, rates, psnr) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="overlap"):
        bd_psnr(rates, psnr, rates * 100, psnr)


def _eval_folder(root: Path, name: str, kind: str, run: str, bpp: float, psnr: float, **extra) -> Path:
    folder = root / run / "eval" / name
    folder.mkdir(parents=True)
    bottleneck = "dictionary" if kind.startswith("DL") else "vq"
    metrics = {"psnr": psnr, "ssim": 0.8, "lpips": None, "flip": 0.1, "rfid": None, "perplexity": 100.0,
               "used_fraction": 0.9, "bits_per_pixel": bpp, "num_images": 10,
               "evaluated": {"model_kind": kind, "bottleneck": bottleneck, "num_atoms": 256, "sparsity": 1,
                             "coeff_bits": None, **extra},
               "source": {"run_dir": str(root / run), "step": 100}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_compare_writes_table_plot_and_deltas(tmp_path: Path, capsys) -> None:
    evals = tmp_path / "evals"
    rates = [0.2, 0.4, 0.8, 1.6]
    for s, rate in enumerate(rates, start=1):
        psnr = 22 + 3 * math.log2(rate / 0.2)
        _eval_folder(evals, f"s{s}", "DL-VAE", "dl_run", rate, psnr + 1.0, sparsity=s, coeff_bits=8)
        _eval_folder(evals, f"k{s}", "VQ-VAE", f"vq_run{s}", rate * 1.1, psnr)
    out = tmp_path / "cmp"
    # One curve per model kind, so the four single-point VQ runs make one curve.
    assert compare_main([str(evals / "dl_run"), *(str(evals / f"vq_run{s}") for s in range(1, 5)), "--out", str(out),
                         "--group", "kind"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    assert len(result["rows"]) == 8 and set(result["curves"]) == {"DL-VAE", "VQ-VAE"}
    (delta,) = result["bjontegaard"]
    assert delta["anchor"] == "DL-VAE" and delta["curve"] == "VQ-VAE"
    assert "unavailable" not in delta and "warning" not in delta
    assert delta["bd_psnr_db"] < 0 and delta["bd_rate_percent"] > 0  # VQ needs more bits for the same PSNR
    markdown = (out / "comparison.md").read_text()
    assert "| model | PSNR | SSIM | LPIPS | FLIP | rFID | perplexity | used | bits/pixel |" in markdown
    assert "dl_run: DL-VAE K=256 S=2 b=8 (step 100)" in markdown and "n/a" in markdown  # LPIPS null
    assert "BD-rate" in printed and "](rate_distortion.png)" in markdown
    with Image.open(out / "rate_distortion.png") as image:
        image.verify()
    # Grouped per model, each VQ run is a single point: no delta, but still a table and a plot.
    assert compare(list(evals.iterdir()), tmp_path / "per_model")["bjontegaard"] == []
    # Curves that share PSNRs but no rates: BD-rate exists, BD-PSNR does not (and says why).
    far = tmp_path / "far"
    for s, rate in enumerate(rates, start=1):
        _eval_folder(far, f"s{s}", "DL-VAE", "dl", rate * 10, 22 + 3 * math.log2(rate / 0.2))
        _eval_folder(far, f"k{s}", "VQ-VAE", f"vq{s}", rate, 21 + 3.5 * math.log2(rate / 0.2))
    (delta,) = compare([far], tmp_path / "far_out", group="kind")["bjontegaard"]
    assert delta["bd_rate_percent"] is not None and delta["bd_psnr_db"] is None
    assert "rate ranges do not overlap" in delta["unavailable"]["bd_psnr_db"]


def test_compare_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert compare_main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{}")
    assert compare_main([str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "not a lasers-eval metrics file" in capsys.readouterr().err
    assert find_evaluations(bad) == [bad]
