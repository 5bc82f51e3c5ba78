"""lasers-eval end to end on real shards and real checkpoint folders: the files it writes, the rate it claims,
restoration tasks, exports, errors, lasers-bench eval, and a real 2-process torchrun run equal to 1 process."""

from __future__ import annotations

import json
import math
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lasers_dist.cli.eval import main as eval_main
from lasers_dist.config import config_from_dict, config_to_dict
from lasers_dist.eval import METRIC_KEYS, EvalOptions, evaluate, load_model
from lasers_dist.eval.image_metrics import psnr_per_image, to_uint8
from lasers_dist.eval.rate import CoefficientQuantizer, log2_binomial
from lasers_dist.models import build_autoencoder
from lasers_dist.models.autoencoder import LatentCodes
from lasers_dist.pretrained import export_pretrained
from lasers_dist.train.checkpoint import META_FILE, WEIGHTS_FILE, step_name, write_weights
from shard_fixtures import make_shards
from train_support import REPO, torchrun_command

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANDOM = ["--random-backbones", "--no-progress"]


def _run(root: Path, bottleneck: str) -> Path:
    """A run directory as the trainer leaves it: a committed checkpoint, metrics.jsonl, provenance.json."""
    cfg = config_from_dict({"data": {"image_size": 32},
                            "model": {"bottleneck": bottleneck, "num_atoms": 32, "embed_dim": 8, "sparsity": 3,
                                      "hidden_channels": 16, "norm_groups": 4}})
    torch.manual_seed(0)
    model = build_autoencoder(cfg.model)
    run = root / f"run-{bottleneck}"
    folder = run / "checkpoints" / step_name(40)
    folder.mkdir(parents=True)
    write_weights(folder / WEIGHTS_FILE, model, None)
    (folder / META_FILE).write_text(json.dumps({"step": 40, "world_size": 1, "omp_backend": "torch",
                                                "config": config_to_dict(cfg)}))
    lines = [{"step": s, "train/psnr": 15 + 5 * math.log1p(s) + (s % 3) * 0.2, "train/perplexity": 5 + s / 4}
             for s in range(1, 41)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "provenance.json").write_text(json.dumps({"omp_backend": "torch", "world_size": 2}))
    return run


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    make_shards(root / "shards", 3, 5, size=32, split="val", smooth=True)
    return {"root": root, "shards": root / "shards" / "val-*.tar", "dl": _run(root, "dictionary"),
            "vq": _run(root, "vq")}


def _quiet_evaluate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-backbone LPIPS warning
        return evaluate(*args, **kwargs)


def test_eval_writes_metrics_per_image_pictures_and_report(setup, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    args = [str(setup["dl"]), "--shards", str(setup["shards"]), "--out", str(out), "--batch-size", "4",
            "--flip-limit", "6", "--no-rfid", *RANDOM]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert eval_main(args) == 0
    printed = capsys.readouterr().out
    assert "| PSNR (dB) |" in printed and f"report: {out / 'report.md'}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics and (metrics[key] is not None or key in metrics["unavailable"]), key
    assert metrics["num_images"] == 15 and metrics["flip_images"] == 6
    assert set(metrics["unavailable"]) == {"ms_ssim", "rfid"}  # 32 px images; rFID switched off
    assert "random" in metrics["evaluated"]["lpips_backbone"]
    assert metrics["evaluated"]["flip"]["ppd"] == pytest.approx(67.0, abs=0.1)
    assert metrics["source"]["step"] == 40 and metrics["training_provenance"]["omp_backend"] == "torch"
    assert metrics["bits_per_signal"] == pytest.approx(log2_binomial(32, 3) + 3 * 32)
    assert metrics["bits_per_pixel"] == pytest.approx(metrics["bits_per_signal"] * 64 / 1024)  # 8x8 latents
    assert 1 <= metrics["perplexity"] <= 32 and metrics["dead_atoms"] == round(32 * (1 - metrics["used_fraction"]))
    records = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(15))
    assert all(("flip" in r) == (r["index"] < 6) for r in records)
    assert metrics["psnr"] == pytest.approx(sum(r["psnr"] for r in records) / 15)
    pictures = ["reconstructions.png", "latents.png", "atoms.png", "atom_embedding.png", "training_curves.png"]
    assert metrics["pictures"] == pictures
    report = (out / "report.md").read_text()
    for name in pictures:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(out / name) as image:
            image.verify()
        assert f"]({name})" in report
    assert "ms_ssim" in report and "160" in report


def test_quantized_codes_are_what_the_decoder_sees(setup) -> None:
    model, _ = load_model(setup["dl"], torch.device("cpu"))
    options = EvalOptions(batch_size=4, limit=8, coeff_bits=3, lpips=False, rfid=False, flip_limit=0,
                          num_pictures=0, progress=False)
    result = _quiet_evaluate(model, str(setup["shards"]), options, torch.device("cpu"))
    scale = result.metrics["evaluated"]["coeff_range"]
    assert result.metrics["bits_per_signal"] == pytest.approx(log2_binomial(32, 3) + 3 * 3)
    # Decode the first images by hand at 3 bits: the reported PSNR is the PSNR of these quantized codes.
    from lasers_dist.eval.data import EvalImages, plan_slices

    images = torch.stack([item[2] for item, _ in zip(EvalImages(plan_slices(str(setup["shards"]), 8),
                                                                image_size=32), range(8))])
    with torch.no_grad():
        codes = model.encode(images)
        largest = codes.coeffs.abs().max().item()  # 8 images: all of them are the calibration set
        assert largest <= scale <= largest * 1.01 and float(f"{scale:.3g}") == pytest.approx(scale)
        quantizer = CoefficientQuantizer(3, scale)
        quantized = model.decode(LatentCodes(codes.indices, quantizer(codes.coeffs)))
        assert len(torch.unique(quantizer.symbols(codes.coeffs))) <= 2**3 - 1
        expected = psnr_per_image(to_uint8(quantized), to_uint8(images))
        unquantized = psnr_per_image(to_uint8(model.decode(codes)), to_uint8(images))
    got = torch.tensor([r["psnr"] for r in result.records], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, unquantized)
    fewer = _quiet_evaluate(model, str(setup["shards"]), EvalOptions(
        batch_size=4, limit=8, sparsity=1, lpips=False, rfid=False, flip_limit=0, num_pictures=0, progress=False),
        torch.device("cpu"))
    assert fewer.metrics["evaluated"]["sparsity"] == 1 and fewer.metrics["mean_nonzeros"] <= 1.0
    assert fewer.metrics["bits_per_signal"] == pytest.approx(5 + 32)


def test_inpainting_from_an_export_with_a_limit(setup, tmp_path) -> None:
    exported = export_pretrained(setup["vq"], tmp_path / "vq.safetensors")
    model, source = load_model(exported, torch.device("cpu"))
    assert source.step == 40 and source.run_dir == setup["vq"]
    options = EvalOptions(batch_size=3, limit=7, task="inpainting", lpips=False, rfid=False, flip_limit=2,
                          num_pictures=3, progress=False)
    result = _quiet_evaluate(model, str(setup["shards"]), options, torch.device("cpu"))
    assert result.metrics["num_images"] == 7 and result.metrics["evaluated"]["task"] == "inpainting"
    assert result.metrics["bits_per_latent"] == pytest.approx(5.0)  # VQ: log2 32
    assert [p.index for p in result.pictures] == [0, 1, 2]
    masked = result.pictures[0].input
    assert masked is not None and not torch.equal(masked, result.pictures[0].target)
    assert masked[:, 16, 16].tolist() == [128, 128, 128]  # the centre is masked to mid-gray (0 in [-1, 1])


def test_eval_errors_are_reported_with_exit_code_2(setup, tmp_path, capsys) -> None:
    base = ["--shards", str(setup["shards"]), "--out", str(tmp_path / "x"), *RANDOM]
    assert eval_main([str(setup["vq"]), "--coeff-bits", "8", *base]) == 2
    assert "dictionary models" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "nowhere"), *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_main([str(setup["dl"]), "--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "y"),
                      *RANDOM]) == 2
    assert "no shard matches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main([str(setup["dl"]), *base, "--limit", "0"])


def test_bench_eval_prints_images_per_second(tmp_path, capsys) -> None:
    from lasers_dist.cli.bench import main as bench_main

    out = tmp_path / "eval.json"
    assert bench_main(["eval", "--images", "4", "--batch-size", "4", "--image-size", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [run["flip"] for run in result["runs"]] == [False, True]
    assert all(run["images"] == 4 and run["images_per_s"] > 0 for run in result["runs"])
    assert "images/s" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_torchrun_eval_equals_one_process(setup, tmp_path) -> None:
    # 3 shards of 5, the first 8 images: rank 0 reads shard 0 (5 images), rank 1 shard 1 (3 images, cut by the
    # limit). Quantized coefficients (the range must agree), FLIP on 3 images, rFID sums reduced over ranks.
    args = [str(setup["dl"]), "--shards", str(setup["shards"]), "--limit", "8", "--batch-size", "3",
            "--coeff-bits", "6", "--flip-limit", "3", "--min-fid-images", "4", "--fid-features", "64", "--workers",
            "0", "--pictures", "4", *RANDOM]
    single, double = tmp_path / "one", tmp_path / "two"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert eval_main(args + ["--out", str(single)]) == 0
    command = torchrun_command(2, "-m", "lasers_dist.cli.eval", *args, "--out", str(double))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert two["evaluated"]["world_size"] == 2 and one["evaluated"]["world_size"] == 1
    assert two["evaluated"]["coeff_range"] == one["evaluated"]["coeff_range"]
    for key in ("num_images", "flip_images", "rfid_images", "dead_atoms", "bits_per_pixel"):
        assert two[key] == one[key], key
    for key in ("psnr", "ssim", "lpips", "flip", "rfid", "perplexity", "used_fraction", "entropy_bits_per_pixel",
                "mean_nonzeros"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    rows = [[json.loads(line) for line in (d / "per_image.jsonl").read_text().splitlines()] for d in (single, double)]
    assert [(r["index"], r["key"]) for r in rows[0]] == [(r["index"], r["key"]) for r in rows[1]]
    for a, b in zip(*rows):
        assert set(a) == set(b)
        for key in a:
            if key not in ("index", "key"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["index"], key)
    assert (double / "reconstructions.png").read_bytes().startswith(PNG_SIGNATURE)
