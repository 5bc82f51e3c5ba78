"""One evaluation of a trained autoencoder on sharded images: per-image metrics, code statistics, rate.

Runs in one process or on every rank of a torchrun job (each rank a disjoint slice of the shards, see data.py).
The model runs in eval mode, which changes no bottleneck state and issues no collectives; the only collectives
are the reductions at the end (code statistics, rFID sums, per-image records gathered to rank 0). Means are taken
on rank 0 over the records sorted by global image index, so they equal a one-process evaluation's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lasers_dist.bottleneck.usage import broadcast_, distributed_ready
from lasers_dist.eval.data import EvalImages, batched, plan_slices, rank_slices
from lasers_dist.eval.image_metrics import (
    finite_mean,
    flip_error,
    hwc_unit,
    ms_ssim_available,
    ms_ssim_per_image,
    psnr_per_image,
    ssim_per_image,
    to_uint8,
)
from lasers_dist.eval.perceptual import FidAccumulator, Lpips, MetricUnavailable
from lasers_dist.eval.rate import CodeStatistics, CoefficientQuantizer, RateSpec
from lasers_dist.models import Autoencoder
from lasers_dist.models.autoencoder import LatentCodes, model_kind

TASKS = ("reconstruction", "super_resolution", "inpainting")
# metrics.json keys that are a number or null (DESIGN.md lists them; other tools read these names).
METRIC_KEYS = ("psnr", "ssim", "ms_ssim", "lpips", "flip", "rfid", "perplexity", "used_fraction", "dead_atoms",
               "bits_per_latent", "bits_per_pixel", "entropy_bits_per_pixel", "num_images")


@dataclass
class EvalOptions:
    """How to evaluate. limit: the first N images; task: None = the run's data.degradation; sparsity: atoms per
    signal (None = trained S); coeff_bits: quantize coefficients to B bits (None = float32); flip_limit: FLIP on
    the first N images only (None = all, 0 = off); random_backbones: LPIPS / Inception with random weights
    (tests only: the outputs are then not LPIPS or FID); min_fid_images: below this rFID is not reported;
    fid_features: Inception features (2048 is FID; smaller ones only make tests fast)."""

    batch_size: int = 16
    limit: int | None = None
    task: str | None = None
    sparsity: int | None = None
    coeff_bits: int | None = None
    calibration_images: int = 256
    flip_limit: int | None = None
    flip_ppd: float | None = None
    lpips: bool = True
    rfid: bool = True
    random_backbones: bool = False
    min_fid_images: int = 2048
    fid_features: int = 2048
    num_pictures: int = 8
    num_workers: int = 0
    progress: bool = True


@dataclass
class PictureItem:
    """One of the first images, for the report's figures: uint8 (3, H, W) images, FLIP map (H, W) or None,
    latents before / after the bottleneck (L, h, w) fp32."""

    index: int
    key: str
    target: Tensor
    input: Tensor | None
    reconstruction: Tensor
    flip_map: np.ndarray | None
    latent: Tensor
    coded_latent: Tensor


@dataclass
class EvalResult:
    """Rank 0's result: metrics (the metrics.json content), records (per_image.jsonl lines, in global order),
    pictures, atoms (K, code_dim) unit-norm dictionary or codebook, usage (K,) selections per atom."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    pictures: list[PictureItem]
    atoms: Tensor
    usage: Tensor
    unavailable: dict[str, str] = field(default_factory=dict)


def resolve_task(task: str | None, degradation: str) -> str:
    task = task or ("reconstruction" if degradation == "none" else degradation)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def rate_spec(model: Autoencoder, sparsity: int | None, coeff_bits: int | None) -> RateSpec:
    bottleneck = model.bottleneck
    if model.config.model.bottleneck == "vq":
        if sparsity is not None or coeff_bits is not None:
            raise ValueError("--sparsity and --coeff-bits apply to dictionary models; a VQ code is one index")
        return RateSpec("vq", bottleneck.num_atoms, 1)
    return RateSpec("dictionary", bottleneck.num_atoms, sparsity or bottleneck.sparsity, coeff_bits,
                    tuple(bottleneck.patch_size))


def model_atoms(model: Autoencoder) -> Tensor:
    """(K, code_dim) fp32: the unit-norm dictionary atoms, or the VQ codebook vectors."""
    bottleneck = model.bottleneck
    atoms = bottleneck.unit_atoms() if hasattr(bottleneck, "unit_atoms") else bottleneck.codebook.float()
    return atoms.detach().cpu()


@torch.no_grad()
def calibrate_quantizer(model: Autoencoder, slices, options: EvalOptions, image_size: int, stream_args: dict,
                        device: torch.device) -> CoefficientQuantizer:
    """The quantizer's range: the largest |coefficient| over the first `calibration_images` images of the
    evaluation set (the same images on every rank; rank 0's value is broadcast so all ranks agree exactly)."""
    first = plan_slices([s.url for s in slices], limit=min(options.calibration_images, sum(s.take for s in slices)))
    scale = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batched(EvalImages(first, image_size=image_size, **stream_args), options.batch_size):
        codes = model.encode(batch.inputs.to(device), sparsity=options.sparsity)
        scale = torch.maximum(scale, codes.coeffs.abs().max().double())
    scale = float(broadcast_(scale, src=0))
    return CoefficientQuantizer(options.coeff_bits, round_up_3_digits(scale) if scale > 0 else 1.0)


def round_up_3_digits(value: float) -> float:
    """The range as it would be stored with the codes: 3 significant digits, rounded up so that no calibration
    coefficient saturates. It also absorbs float noise between runs with other thread counts or world sizes."""
    unit = 10.0 ** (math.floor(math.log10(value)) - 2)
    return math.ceil(value / unit * (1 - 1e-12)) * unit


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed_ready() else (0, 1)


def _gather_to_rank0(obj: Any) -> list[Any] | None:
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


class _Evaluator:
    """The per-rank loop's state: metric backends, statistics, records, pictures."""

    def __init__(self, model: Autoencoder, options: EvalOptions, spec: RateSpec, device: torch.device,
                 quantizer: CoefficientQuantizer | None, image_size: int) -> None:
        self.model, self.options, self.spec, self.device, self.quantizer = model, options, spec, device, quantizer
        self.unavailable: dict[str, str] = {}
        self.lpips = self._backend("lpips", options.lpips, lambda: Lpips(device, options.random_backbones))
        self.fid = self._backend("rfid", options.rfid, lambda: FidAccumulator(
            device, options.random_backbones, options.min_fid_images, options.fid_features))
        if not ms_ssim_available(image_size, image_size):
            self.unavailable["ms_ssim"] = (f"MS-SSIM needs image sides > 160 px (5 scales of an 11-px window); "
                                           f"these images are {image_size}x{image_size}")
        if options.flip_limit == 0:
            self.unavailable["flip"] = "disabled (--flip-limit 0)"
        self.stats = CodeStatistics(spec.num_atoms, device, quantizer)
        self.records: list[dict[str, Any]] = []
        self.pictures: list[PictureItem] = []
        self.flip_ppd: float | None = None

    def _backend(self, name: str, wanted: bool, build):
        if not wanted:
            self.unavailable[name] = f"disabled (--no-{name})"
            return None
        try:
            return build()
        except MetricUnavailable as err:
            self.unavailable[name] = str(err)
            return None

    def _flip_wanted(self, index: int) -> bool:
        limit = self.options.flip_limit
        return limit is None or index < limit

    @torch.no_grad()
    def run_batch(self, indices: list[int], keys: list[str], inputs: Tensor, targets: Tensor) -> None:
        model, options = self.model, self.options
        latents = model.latents(inputs)
        codes = model.codes_of_latents(latents, options.sparsity)
        if self.quantizer is not None:
            codes = LatentCodes(codes.indices, self.quantizer(codes.coeffs).to(codes.coeffs.device))
        self.stats.update(codes.indices, codes.coeffs)
        reconstructions = to_uint8(model.decode(codes))
        originals = to_uint8(targets)
        values: dict[str, Tensor] = {"psnr": psnr_per_image(reconstructions, originals),
                                     "ssim": ssim_per_image(reconstructions, originals)}
        if "ms_ssim" not in self.unavailable:
            values["ms_ssim"] = ms_ssim_per_image(reconstructions, originals)
        if self.lpips is not None:
            values["lpips"] = self.lpips(reconstructions, originals)
        if self.fid is not None:
            self.fid.update(reconstructions, originals)
        values = {k: v.cpu().tolist() for k, v in values.items()}
        wants_flip = [self._flip_wanted(i) and "flip" not in self.unavailable for i in indices]
        rec_hwc = hwc_unit(reconstructions) if any(wants_flip) else None
        ref_hwc = hwc_unit(originals) if any(wants_flip) else None
        for j, (index, key) in enumerate(zip(indices, keys)):
            record: dict[str, Any] = {"index": index, "key": key, **{k: v[j] for k, v in values.items()}}
            flip_map = None
            if wants_flip[j]:
                record["flip"], flip_map, self.flip_ppd = flip_error(ref_hwc[j], rec_hwc[j], options.flip_ppd)
            self.records.append(record)
            if index < options.num_pictures:
                coded = model.bottleneck.from_codes(codes.indices[j:j + 1], codes.coeffs[j:j + 1])[0]
                self.pictures.append(PictureItem(
                    index, key, originals[j].cpu(), to_uint8(inputs[j:j + 1])[0].cpu() if inputs is not targets
                    else None, reconstructions[j].cpu(), flip_map, latents[j].float().cpu(), coded.float().cpu()))


def _mean_of(records: list[dict[str, Any]], key: str) -> tuple[float | None, int, int]:
    """(mean over the records that have `key`, how many have it, how many of those are +inf)."""
    values = [r[key] for r in records if r.get(key) is not None]
    mean, infinite = finite_mean(values)
    return mean, len(values), infinite


def evaluate(model: Autoencoder, shards: str | list[str], options: EvalOptions, device: torch.device) -> EvalResult | None:
    """Evaluate `model` (load_pretrained's, with .config) on `shards`; every rank calls it. Rank 0 gets the
    EvalResult, other ranks None."""
    cfg = model.config
    task = resolve_task(options.task, cfg.data.degradation)
    spec = rate_spec(model, options.sparsity, options.coeff_bits)
    rank, world = _world()
    image_size = cfg.data.image_size
    stream_args = dict(degradation=None if task == "reconstruction" else task, sr_factor=cfg.data.sr_factor,
                       mask_fraction=cfg.data.inpaint_fraction, num_workers=options.num_workers)
    slices = plan_slices(shards, options.limit)
    total = sum(s.take for s in slices)
    model.eval()
    quantizer = None
    if options.coeff_bits is not None:
        quantizer = calibrate_quantizer(model, slices, options, image_size, stream_args, device)
    evaluator = _Evaluator(model, options, spec, device, quantizer, image_size)
    images = EvalImages(rank_slices(slices, rank, world), image_size=image_size, **stream_args)
    bar = None
    if options.progress and rank == 0:
        from tqdm import tqdm

        share = sum(s.take for s in rank_slices(slices, 0, world))
        bar = tqdm(total=share, unit="img", desc=f"eval (rank 0 of {world})" if world > 1 else "eval")
    try:
        for batch in batched(images, options.batch_size):
            inputs = batch.inputs.to(device)
            targets = inputs if task == "reconstruction" else batch.targets.to(device)
            evaluator.run_batch(batch.indices, batch.keys, inputs, targets)
            if bar is not None:
                bar.update(len(batch.indices))
    finally:
        if bar is not None:
            bar.close()
    evaluator.stats.reduce_()
    if evaluator.fid is not None:
        evaluator.fid.reduce_()
    gathered = _gather_to_rank0((evaluator.records, evaluator.pictures, images.corrupt_samples))
    if rank != 0:
        return None
    records = sorted((r for part in gathered for r in part[0]), key=lambda r: r["index"])
    pictures = sorted((p for part in gathered for p in part[1]), key=lambda p: p.index)
    corrupt = sum(part[2] for part in gathered)
    return _summarize(model, options, spec, task, evaluator, records, pictures, corrupt, total, world, device)


def _summarize(model: Autoencoder, options: EvalOptions, spec: RateSpec, task: str, evaluator: _Evaluator,
               records: list[dict[str, Any]], pictures: list[PictureItem], corrupt: int, planned: int, world: int,
               device: torch.device) -> EvalResult:
    cfg, unavailable = model.config, dict(evaluator.unavailable)
    metrics: dict[str, Any] = {"num_images": len(records)}
    for key in ("psnr", "ssim", "ms_ssim", "lpips", "flip"):
        mean, count, infinite = _mean_of(records, key)
        metrics[key] = mean
        if key == "psnr":
            metrics["psnr_infinite"] = infinite  # identical to the original: +inf, left out of the mean
            if mean is None and records:
                unavailable["psnr"] = f"all {count} images are identical to their originals (PSNR +inf)"
        if key == "flip":
            metrics["flip_images"] = count
    metrics["rfid"] = None
    if evaluator.fid is not None:
        metrics["rfid_images"] = evaluator.fid.num_images
        try:
            metrics["rfid"] = evaluator.fid.compute()
        except MetricUnavailable as err:
            unavailable["rfid"] = str(err)
    usage = evaluator.stats.usage_summary()
    metrics.update({k: usage[k] for k in ("perplexity", "used_fraction", "dead_atoms")})
    metrics.update(usage_entropy_bits=usage["usage_entropy_bits"], mean_nonzeros=usage["mean_nonzeros"])
    latent_side = cfg.data.image_size // model.encoder.downsample_factor
    signals_per_image = (latent_side // spec.patch[0]) * (latent_side // spec.patch[1])
    pixels = cfg.data.image_size**2
    metrics.update(
        bits_per_signal=spec.bits_per_signal,
        bits_per_latent=spec.bits_per_latent,
        bits_per_pixel=spec.bits_per_pixel(signals_per_image, pixels),
        entropy_bits_per_pixel=evaluator.stats.entropy_bits_per_signal(spec) * signals_per_image / pixels,
        corrupt_samples=corrupt,
    )
    for key in METRIC_KEYS:
        if metrics.get(key) is None and key not in unavailable:
            unavailable[key] = "no images were evaluated" if not records else "not computed"
    metrics["unavailable"] = {k: unavailable[k] for k in sorted(unavailable) if metrics.get(k) is None}
    metrics["evaluated"] = {
        "model_kind": model_kind(cfg.model), "bottleneck": cfg.model.bottleneck, "num_atoms": spec.num_atoms,
        "sparsity": spec.sparsity, "trained_sparsity": cfg.model.sparsity if spec.kind == "dictionary" else 1,
        "coeff_bits": spec.coeff_bits, "coeff_range": evaluator.quantizer.scale if evaluator.quantizer else None,
        "embed_dim": cfg.model.embed_dim, "patch_size": list(spec.patch), "image_size": cfg.data.image_size,
        "latent_size": latent_side, "coded_signals_per_image": signals_per_image, "task": task,
        "images_planned": planned, "limit": options.limit, "world_size": world, "device": str(device),
        "lpips_backbone": evaluator.lpips.name if evaluator.lpips is not None else None,
        "fid_backbone": evaluator.fid.name if evaluator.fid is not None else None,
        "flip": {"mode": "LDR", "ppd": evaluator.flip_ppd, "limit": options.flip_limit},
        "omp_backend": getattr(model.bottleneck, "omp_backend", None),
        "library_versions": library_versions(),
    }
    return EvalResult(metrics, records, pictures, model_atoms(model), evaluator.stats.usage.cpu(), unavailable)


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("lasers_dist", "torch", "torchvision", "torchmetrics", "torch-fidelity", "lpips", "flip-evaluator",
                 "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out

