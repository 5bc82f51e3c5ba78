"""Share of Batch-OMP in one DL-GAN training step, against the same step with the VQ bottleneck.

Both models run lasers_dist.train.step.train_step (generator forward with the bottleneck, MSE + LPIPS, the GAN
term with its adaptive weight, backward, AdamW step, then the discriminator's forward, backward and step) at
step >= loss.disc_start, so every part of a DL-GAN / VQ-GAN step is on. The engines are plain torch AdamW
behind the slice of DeepSpeed's engine interface that train_step calls: the bench times the model's work,
not DeepSpeed's bookkeeping or communication.

OMP time is batch_omp alone on the step's own signals (the encoder's latents of the same batch, cut into
signals as the bottleneck does). DL-GAN step, OMP and VQ-GAN step are timed in turn, round after round (medians
of --steps rounds after one warm-up call each, torch.cuda.synchronize around each call on GPU), so that load
from other processes hits all three alike. Without the LPIPS backbone weights (offline machines) the loss uses a random
backbone of the same architecture: the same work, so the same time, but noted in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lasers_dist.bottleneck.dictionary import to_signals
from lasers_dist.config import Config, load_config
from lasers_dist.losses import ReconstructionLoss, backbone_weights_path
from lasers_dist.models import build_autoencoder, build_discriminator
from lasers_dist.sparse import batch_omp
from lasers_dist.sparse.backend import resolve_backend
from lasers_dist.train.engines import Engines, adamw, trainable
from lasers_dist.train.provenance import device_name
from lasers_dist.train.step import train_step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lasers-bench step", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config whose model/loss/optim sections to use (default: the paper's DL-GAN: "
                             "K=512, L=16, S=5, light encoder/decoder, PatchGAN, MSE + LPIPS)")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--omp-backend", choices=["auto", "torch", "triton"], default=None,
                        help="batch_omp backend (default: the config's model.omp_backend)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench_results/step.json"))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.image_size < 1:
        parser.error("--batch, --steps and --image-size must be positive")
    from lasers_dist.kernels.bench_omp import resolve_device

    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    return args


class TorchEngine:
    """What train_step uses of a DeepSpeed engine (call, .module, backward, step) over a torch AdamW."""

    def __init__(self, module: nn.Module, lr: float, cfg: Config) -> None:
        self.module = module
        self.optimizer = adamw(trainable(module), lr, cfg)

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def bench_config(args: argparse.Namespace) -> tuple[Config, bool]:
    """The DL-GAN config to time (GAN terms on from step 0) and whether LPIPS needs its random backbone."""
    cfg = load_config(args.config) if args.config else Config()
    model = replace(cfg.model, bottleneck="dictionary", discriminator=True)
    if args.omp_backend:
        model = replace(model, omp_backend=args.omp_backend)
    loss = replace(cfg.loss, disc_start=0)
    random_lpips = loss.perceptual_weight > 0 and not backbone_weights_path(loss.lpips_net).is_file()
    if random_lpips:
        loss = replace(loss, lpips_random_backbone=True)
    return replace(cfg, model=model, loss=loss), random_lpips


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call, with the device's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def step_runner(cfg: Config, images: torch.Tensor, recon_loss: nn.Module, seed: int) -> tuple[Callable, nn.Module]:
    """A closure running one train_step of the config's model on `images`, and that model's autoencoder."""
    torch.manual_seed(seed)
    device = images.device
    autoencoder = build_autoencoder(cfg.model).to(device).train()
    discriminator = build_discriminator(cfg.model).to(device).train()
    engines = Engines(TorchEngine(autoencoder, cfg.optim.lr, cfg), TorchEngine(discriminator, cfg.optim.disc_lr, cfg))
    return lambda: train_step(engines, recon_loss, [(images, images)], cfg.loss.disc_start, cfg), autoencoder


def omp_runner(cfg: Config, autoencoder: nn.Module, images: torch.Tensor) -> tuple[Callable, tuple[int, int]]:
    """A closure running batch_omp on the signals the bottleneck codes for `images`, and their shape."""
    bottleneck = autoencoder.bottleneck
    with torch.no_grad():
        signals = to_signals(autoencoder.encoder(images), bottleneck.patch_size).float().contiguous()
        atoms = bottleneck.unit_atoms().detach().contiguous()
    return lambda: batch_omp(signals, atoms, bottleneck.sparsity, backend=cfg.model.omp_backend), tuple(signals.shape)


def time_interleaved(runners: dict[str, Callable], steps: int, device: torch.device) -> dict[str, list[float]]:
    """ms per call of each runner: one warm-up call each, then `steps` rounds calling them in turn, so that
    load from other processes or clock changes hit all of them alike."""
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(steps):
        for name, run in runners.items():
            times[name].append(timed(run, device))
    return times


def print_table(result: dict) -> None:
    fastest = result["min_ms"]
    rows = [
        ("DL-GAN step", f"{result['dlgan_step_ms']:.1f} ms (fastest {fastest['dlgan']:.1f})"),
        ("  of which OMP", f"{result['omp_ms']:.1f} ms (fastest {fastest['omp']:.1f}), "
                           f"{100 * result['omp_share']:.1f}% of the step"),
        ("VQ-GAN step", f"{result['vqgan_step_ms']:.1f} ms (fastest {fastest['vqgan']:.1f})"),
        ("DL-GAN / VQ-GAN", f"{result['dlgan_over_vqgan']:.3f}x"),
    ]
    print(f"device {result['device_name']}, batch {result['batch']} at {result['image_size']}^2, "
          f"{result['omp_signals'][0]} signals of dim {result['omp_signals'][1]}, K={result['atoms']}, "
          f"S={result['sparsity']}, OMP backend {result['omp_backend']}, median of {result['steps']} rounds")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    if result["lpips_random_backbone"]:
        print("note: LPIPS backbone weights missing, timed with a random backbone of the same architecture")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = args.device
    cfg, random_lpips = bench_config(args)
    generator = torch.Generator().manual_seed(args.seed)
    images = (torch.rand(args.batch, cfg.model.in_channels, args.image_size, args.image_size, generator=generator)
              * 2 - 1).to(device)
    recon_loss = ReconstructionLoss(cfg.loss.perceptual_weight, cfg.loss.lpips_net,
                                    cfg.loss.lpips_random_backbone).to(device)
    dlgan_step, autoencoder = step_runner(cfg, images, recon_loss, args.seed)
    omp, signal_shape = omp_runner(cfg, autoencoder, images)
    vq_cfg = replace(cfg, model=replace(cfg.model, bottleneck="vq", patch_size=[1, 1]))
    vqgan_step, _ = step_runner(vq_cfg, images, recon_loss, args.seed)
    # What "auto" resolves to here (on CUDA: after the Triton self-check), recorded with the timings.
    omp_choice = resolve_backend(cfg.model.omp_backend, device, torch.float32, cfg.model.num_atoms, signal_shape[1],
                                 cfg.model.sparsity)
    times = time_interleaved({"dlgan": dlgan_step, "omp": omp, "vqgan": vqgan_step}, args.steps, device)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch, "image_size": args.image_size, "steps": args.steps,
        "omp_backend": omp_choice.backend, "omp_backend_requested": cfg.model.omp_backend,
        "omp_backend_reason": omp_choice.reason, "omp_signals": list(signal_shape),
        "atoms": cfg.model.num_atoms, "sparsity": cfg.model.sparsity,
        "dlgan_step_ms": median["dlgan"], "omp_ms": median["omp"], "vqgan_step_ms": median["vqgan"],
        "min_ms": {name: min(values) for name, values in times.items()},
        "omp_share": median["omp"] / median["dlgan"],
        "dlgan_over_vqgan": median["dlgan"] / median["vqgan"],
        "all_ms": times,
        "lpips_random_backbone": random_lpips,
    }
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
