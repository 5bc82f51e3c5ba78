"""`lasers-bench memory`: peak memory and time of one real training step of the deep DL-GAN, per setting.

    lasers-bench memory [--config configs/dlgan_ffhq1024.yaml] [--sizes 256 512 1024] [--batches 1 2]
                        [--checkpointing on off] [--precisions fp32 bf16] [--device cpu|cuda] [--budget-gb 80]

Every setting (image size x per-GPU batch x activation checkpointing x precision) runs in a process of its own,
so each peak is clean: it builds the config's model (default: the 1024^2 FFHQ DL-GAN: deep encoder/decoder,
attention, PatchGAN) with the real DeepSpeed engines of a 1-process run (the config's ZeRO stage, bf16 or fp32),
then runs lasers_dist.train.step.train_step with the discriminator on (the largest step): one warm-up step,
then --steps timed ones. Peak memory is the process's peak resident set (CPU: ru_maxrss, which includes
Python, torch and the model) or torch.cuda.max_memory_allocated (CUDA: tensors only, after the model and
optimizer were built, so it includes them).

Projection to --budget-gb per GPU (a projection, not a measurement): memory grows linearly with the batch,
peak(b) = fixed + b x per_image, with per_image = peak(2) - peak(1) and fixed = peak(1) - per_image from the
two measured batches; the projected batch is floor((budget - fixed) / per_image). Activations dominate
per_image; ZeRO-2 over N GPUs divides the (small) optimizer state in `fixed` by N, which the projection ignores
(conservative). CPU resident memory is only a proxy for GPU memory: run with --device cuda for the real figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/dlgan_ffhq1024.yaml"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lasers-bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"model / loss / optim config (default {DEFAULT_CONFIG})")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="images per GPU (default 1 2)")
    p.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per setting (default: torch's default)")
    p.add_argument("--budget-gb", type=float, default=80.0, help="GPU memory to project the batch for (default 80)")
    p.add_argument("--setting-timeout", type=float, default=3600.0, help="seconds allowed per setting")
    p.add_argument("--out", default="bench_results/memory.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting, print its JSON
    args = p.parse_args(argv)
    if args.steps < 1 or min(args.batches) < 1 or min(args.sizes) < 1:
        p.error("--steps, --batches and --sizes must be positive")
    return args


# ---- one setting (child process) ------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_setting(setting: dict) -> dict:
    """Build the engines for `setting` and time train_step; returns the measured row (runs in its own process)."""
    import torch

    from lasers_dist.config import load_config, validate
    from lasers_dist.losses import ReconstructionLoss, backbone_weights_path
    from lasers_dist.models import build_autoencoder, build_discriminator
    from lasers_dist.train import distributed as D
    from lasers_dist.train.distributed import DistEnv
    from lasers_dist.train.engines import build_engines
    from lasers_dist.train.step import train_step

    if setting["threads"]:
        torch.set_num_threads(setting["threads"])
    overrides = [f"data.image_size={setting['size']}", f"train.batch_size={setting['batch']}",
                 f"model.checkpoint_activations={'true' if setting['checkpointing'] == 'on' else 'false'}",
                 f"train.precision={setting['precision']}", "model.discriminator=true", "loss.disc_start=0",
                 "optim.grad_accum_steps=1", "train.max_steps=1000"]
    cfg = load_config(setting["config"], overrides)
    random_lpips = cfg.loss.perceptual_weight > 0 and not backbone_weights_path(cfg.loss.lpips_net).is_file()
    if random_lpips:  # offline: the same network with random weights does the same work
        cfg = load_config(setting["config"], overrides + ["loss.lpips_random_backbone=true"])
    validate(cfg, 1, check_files=False)
    device = D.init_distributed(DistEnv(master_port=setting["port"]), setting["device"], 600.0)
    torch.manual_seed(0)
    autoencoder, discriminator = build_autoencoder(cfg.model), build_discriminator(cfg.model)
    params = sum(p.numel() for m in (autoencoder, discriminator) for p in m.parameters())
    recon_loss = ReconstructionLoss(cfg.loss.perceptual_weight, cfg.loss.lpips_net,
                                    cfg.loss.lpips_random_backbone).to(device)
    engines = build_engines(cfg, autoencoder, discriminator, 1, device)
    images = (torch.rand(setting["batch"], 3, setting["size"], setting["size"]) * 2 - 1).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else _rss_bytes()
    times = []
    for step in range(1 + setting["steps"]):
        start = time.perf_counter()
        train_step(engines, recon_loss, [(images, images)], step, cfg)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    D.shutdown_distributed()
    return {**{k: setting[k] for k in ("size", "batch", "checkpointing", "precision")},
            "peak_bytes": int(peak), "before_step_bytes": int(before), "step_s": statistics.median(times[1:]),
            "warmup_step_s": times[0], "params": params, "zero_stage": cfg.deepspeed.zero_stage,
            "lpips_random_backbone": random_lpips,
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"}


# ---- the sweep (parent process) -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(device: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed picks its accelerator once, at import
    return env


def _measure(setting: dict, timeout: float) -> dict:
    port = _free_port()
    setting = dict(setting, port=port)
    cmd = [sys.executable, "-m", "lasers_dist.cli.bench_memory", "--one", json.dumps(setting)]
    keys = {k: setting[k] for k in ("size", "batch", "checkpointing", "precision")}
    try:
        proc = subprocess.run(cmd, env=_child_env(setting["device"], port), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**keys, "error": f"took longer than {timeout:g} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode < 0:  # a signal: on a full machine, the kernel's OOM killer (its last output says nothing)
        return {**keys, "error": f"killed by {signal.Signals(-proc.returncode).name} (out of memory?)"}
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {**keys, "error": tail[0][:300]}
    return json.loads(lines[-1])


def project(rows: list[dict], budget_bytes: float) -> list[dict]:
    """Per (size, checkpointing, precision) with batches 1 and 2 measured: the linear fit and projected batch."""
    out = []
    groups = itertools.groupby(sorted((r for r in rows if "peak_bytes" in r),
                                      key=lambda r: (r["size"], r["checkpointing"], r["precision"], r["batch"])),
                               key=lambda r: (r["size"], r["checkpointing"], r["precision"]))
    for (size, ckpt, precision), group in groups:
        peaks = {r["batch"]: r["peak_bytes"] for r in group}
        if 1 not in peaks or 2 not in peaks:
            continue
        per_image = peaks[2] - peaks[1]
        fixed = peaks[1] - per_image
        # Below ~2% of the peak the difference is allocator noise (small images on CPU): no projection.
        batch = int((budget_bytes - fixed) // per_image) if per_image > 0.02 * peaks[1] else None
        out.append({"size": size, "checkpointing": ckpt, "precision": precision, "per_image_bytes": per_image,
                    "fixed_bytes": fixed, "projected_batch": batch})
    return out


def _print(report: dict) -> None:
    mb = 2.0 ** 20
    print(f"device {report['device']} ({report['device_name']}), config {report['config']}, peak = "
          f"{report['peak_kind']}")
    print(f"{'size':>5s} {'batch':>5s} {'ckpt':>4s} {'prec':>5s} {'peak MB':>10s} {'step s':>8s}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['size']:5d} {r['batch']:5d} {r['checkpointing']:>4s} {r['precision']:>5s}  error: {r['error']}")
        else:
            print(f"{r['size']:5d} {r['batch']:5d} {r['checkpointing']:>4s} {r['precision']:>5s} "
                  f"{r['peak_bytes'] / mb:10.0f} {r['step_s']:8.2f}")
    if report["projection"]:
        print(f"projected per-GPU batch within {report['budget_gb']:g} GB (linear fit of batches 1 and 2):")
        print(f"{'size':>5s} {'ckpt':>4s} {'prec':>5s} {'MB/image':>9s} {'fixed MB':>9s} {'batch':>6s}")
        for p in report["projection"]:
            batch = "-" if p["projected_batch"] is None else str(p["projected_batch"])
            print(f"{p['size']:5d} {p['checkpointing']:>4s} {p['precision']:>5s} {p['per_image_bytes'] / mb:9.0f} "
                  f"{p['fixed_bytes'] / mb:9.0f} {batch:>6s}")


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    if args.one is not None:
        print(json.dumps(run_setting(json.loads(args.one))), flush=True)
        return {}
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(args.config).is_file():
        raise SystemExit(f"lasers-bench memory: config {args.config} does not exist (run from the repository root "
                         f"or pass --config)")
    rows = []
    for size, batch, ckpt, precision in itertools.product(args.sizes, args.batches, args.checkpointing,
                                                          args.precisions):
        setting = {"config": args.config, "size": size, "batch": batch, "checkpointing": ckpt,
                   "precision": precision, "steps": args.steps, "device": device, "threads": args.threads}
        rows.append(_measure(setting, args.setting_timeout))
        row = rows[-1]
        status = row.get("error") or f"peak {row['peak_bytes'] / 2**20:.0f} MB, step {row['step_s']:.2f} s"
        print(f"  {size}^2 batch {batch} checkpointing {ckpt} {precision}: {status}", flush=True)
    measured = [r for r in rows if "peak_bytes" in r]
    report = {
        "benchmark": "memory", "config": args.config, "device": device,
        "device_name": measured[0]["device_name"] if measured else device,
        "peak_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "peak resident set (ru_maxrss)",
        "budget_gb": args.budget_gb, "results": rows,
        "projection": project(rows, args.budget_gb * 1e9),
        "projection_method": "linear in the batch: per_image = peak(2) - peak(1), fixed = peak(1) - per_image, "
                             "batch = floor((budget - fixed) / per_image); a projection, not a measurement",
        "torch": torch.__version__,
    }
    _print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
