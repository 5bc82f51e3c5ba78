"""`lasers-bench eval`: images per second of a full evaluation (lasers-eval's code path), with and without FLIP.

The model is the quickstart's DL-GAN generator (configs/quickstart_cpu.yaml's model section: light encoder /
decoder, K = 256, L = 16, S = 5) with random weights; the images are the built-in photos' val split written as
real shards at --image-size. Both runs read, code, decode and score every image (PSNR, SSIM, MS-SSIM where the
size allows, LPIPS when its weights are cached or --random-backbones is given); the second adds FLIP on every
image. rFID is left out unless --rfid (Inception at 299 x 299 dominates a CPU run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lasers_dist.config import Config, config_from_dict
from lasers_dist.eval.evaluate import EvalOptions, evaluate
from lasers_dist.models import build_autoencoder

QUICKSTART_MODEL = {"bottleneck": "dictionary", "num_atoms": 256, "embed_dim": 16, "sparsity": 5,
                    "architecture": "light", "hidden_channels": 64, "num_res_blocks": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lasers-bench eval", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64, help="images per run")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random-backbones", action="store_true",
                   help="LPIPS (and Inception with --rfid) with random weights when the real ones are not cached")
    p.add_argument("--rfid", action="store_true", help="include rFID's Inception features")
    p.add_argument("--json", type=Path, default=Path("bench_results/eval.json"))
    args = p.parse_args(argv)
    if min(args.images, args.image_size, args.batch_size) < 1:
        p.error("--images, --image-size and --batch-size must be positive")
    return args


def _shards(folder: Path, size: int, images: int) -> str:
    from lasers_dist.data import write_builtin_photos

    crops = max(4, images // 2)  # the val split holds a few photos (and faces): enough crops for --images
    write_builtin_photos(folder, size=size, crops_per_photo=crops, max_count=64, seed=0)
    return str(folder / "val-*.tar")


def _run(model, shards: str, args: argparse.Namespace, flip: bool, device: torch.device) -> dict:
    options = EvalOptions(batch_size=args.batch_size, limit=args.images, flip_limit=None if flip else 0,
                          rfid=args.rfid, random_backbones=args.random_backbones, num_pictures=0, progress=False)
    start = time.perf_counter()
    result = evaluate(model, shards, options, device)
    seconds = time.perf_counter() - start
    n = result.metrics["num_images"]
    return {"flip": flip, "images": n, "seconds": seconds, "images_per_s": n / seconds,
            "unavailable": sorted(result.metrics["unavailable"])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg: Config = config_from_dict({"data": {"image_size": args.image_size}, "model": QUICKSTART_MODEL})
    torch.manual_seed(0)
    model = build_autoencoder(cfg.model).to(device)
    model.config = cfg
    with tempfile.TemporaryDirectory(prefix="lasers-bench-eval-") as tmp:
        shards = _shards(Path(tmp), args.image_size, args.images)
        _run(model, shards, argparse.Namespace(**{**vars(args), "images": min(args.images, args.batch_size)}),
             False, device)  # warm-up: first-call costs (allocations, lazy imports) out of the timed runs
        runs = [_run(model, shards, args, flip, device) for flip in (False, True)]
    result = {"device": str(device), "threads": torch.get_num_threads(), "image_size": args.image_size,
              "batch_size": args.batch_size, "model": QUICKSTART_MODEL, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device {result['device']} ({result['threads']} threads), {args.image_size}^2 images, batch "
          f"{args.batch_size}, quickstart DL model (K=256, S=5, random weights)")
    for run in runs:
        label = "with FLIP   " if run["flip"] else "without FLIP"
        print(f"{label}  {run['images_per_s']:8.2f} images/s  ({run['images']} images in {run['seconds']:.1f} s; "
              f"unavailable: {', '.join(run['unavailable']) or 'none'})")
    print(f"wrote {args.json}")
    return result
