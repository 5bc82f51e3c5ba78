"""`lasers-eval SOURCE --shards PATTERN --out DIR`: evaluate a run, checkpoint or export the way the paper does.

SOURCE is a run directory (its newest complete checkpoint), a checkpoints/step-NNNNNNNN folder or an exported
.safetensors file. Writes DIR/metrics.json, DIR/per_image.jsonl, DIR/report.md and the PNGs. Runs as one process
or under torchrun / srun (each rank a disjoint slice of the shards; the numbers equal a one-process run's).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Sequence

EXIT_USAGE = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lasers-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory, checkpoint folder, or exported .safetensors")
    p.add_argument("--shards", help="shard pattern / glob / manifest (default: the run's data.val_shards)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (per rank)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--task", choices=("reconstruction", "super_resolution", "inpainting"),
                   help="degraded input, clean target (default: the run's data.degradation)")
    p.add_argument("--sparsity", type=int, help="code with S atoms instead of the trained S (dictionary models)")
    p.add_argument("--coeff-bits", type=int, help="quantize coefficients uniformly to B bits (dictionary models)")
    p.add_argument("--calibration-images", type=int, default=256,
                   help="images whose largest |coefficient| sets the quantizer's range (default 256)")
    p.add_argument("--flip-limit", type=int, help="FLIP on the first N images only (slow on CPU; 0 = off)")
    p.add_argument("--flip-ppd", type=float, help="FLIP's pixels per degree (default: FLIP's own, ~67)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--no-rfid", action="store_true", help="skip rFID")
    p.add_argument("--random-backbones", action="store_true",
                   help="TESTS ONLY: LPIPS / Inception with random weights (the numbers are then not LPIPS / FID)")
    p.add_argument("--min-fid-images", type=int, default=2048, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--fid-features", type=int, default=2048, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--pictures", type=int, default=8, help="images shown in the figures (default 8)")
    p.add_argument("--workers", type=int, default=1, choices=(0, 1), help="decode in 0 or 1 background worker")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("limit", "batch_size", "sparsity", "calibration_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.flip_limit is not None and args.flip_limit < 0:
        p.error("--flip-limit must be >= 0")
    return args


def _device(choice: str, local_rank: int):
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but CUDA is not available here")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _start_group(env, device) -> None:
    import torch.distributed as dist

    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{host}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=30))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from lasers_dist.cli.train import cpu_threads, dist_env_from_environ

    try:
        env = dist_env_from_environ(os.environ)
    except ValueError as err:
        print(f"lasers-eval: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    import torch
    import torch.distributed as dist

    from lasers_dist.eval.evaluate import EvalOptions, evaluate
    from lasers_dist.eval.report import metrics_table, write_report
    from lasers_dist.eval.source import load_model

    try:
        device = _device(args.device, env.local_rank)
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(os.environ, env.local_world_size)[0])
        model, source = load_model(args.source, device)
        shards = args.shards or model.config.data.val_shards
        if not shards:
            raise ValueError("no --shards given and the run has no data.val_shards")
    except (FileNotFoundError, ValueError) as err:
        print(f"lasers-eval: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    options = EvalOptions(
        batch_size=args.batch_size, limit=args.limit, task=args.task, sparsity=args.sparsity,
        coeff_bits=args.coeff_bits, calibration_images=args.calibration_images, flip_limit=args.flip_limit,
        flip_ppd=args.flip_ppd, lpips=not args.no_lpips, rfid=not args.no_rfid,
        random_backbones=args.random_backbones, min_fid_images=args.min_fid_images,
        fid_features=args.fid_features, num_pictures=args.pictures,
        num_workers=args.workers, progress=not args.no_progress)
    if env.world_size > 1:
        _start_group(env, device)
    try:
        result = evaluate(model, shards, options, device)
    except (FileNotFoundError, ValueError) as err:
        print(f"lasers-eval: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result is None:  # not rank 0
        return 0
    report = write_report(result, source, args.out, shards)
    print(metrics_table(result.metrics))
    for metric, reason in result.metrics["unavailable"].items():
        print(f"  {metric}: unavailable: {reason}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
