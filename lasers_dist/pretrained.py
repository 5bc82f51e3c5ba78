"""Exported weights: one safetensors file with the autoencoder's weights and its resolved config.

`export_pretrained` reads a training checkpoint (the rank-0 `model.safetensors` + `meta.json` that every
checkpoint folder holds, so DeepSpeed is not needed) and writes the generator's weights with the config in the
file's metadata. `load_pretrained` rebuilds the model from such a file, from a checkpoint folder, or from a run
directory (its newest checkpoint), ready for `encode(images) -> LatentCodes` and `decode(codes) -> images`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lasers_dist.config import config_from_dict
from lasers_dist.models import Autoencoder, build_autoencoder
from lasers_dist.train.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, read_meta, resolve_resume

FORMAT = "lasers_dist.autoencoder/1"
_DISC_PREFIX = "discriminator."


def _checkpoint_folder(source: Path) -> Path:
    folder = resolve_resume(str(source), source / "checkpoints")
    if folder is None or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{source}: no checkpoint with {WEIGHTS_FILE} found")
    return folder


def _read_source(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """-> (tensors, config dict, provenance) from an exported file or a checkpoint / run directory."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: give an exported .safetensors file, a run directory or "
                                "a checkpoints/step-NNNNNNNN folder")
    if source.is_file():
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{source} is not a lasers_dist export (metadata format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r}); create one with `lasers-export RUN OUT.safetensors`")
        provenance = {k: v for k, v in metadata.items() if k not in ("format", "config")}
        return load_file(str(source)), json.loads(metadata["config"]), provenance
    folder = _checkpoint_folder(source)
    meta = read_meta(folder)
    provenance = {"checkpoint": str(folder.resolve()), "step": str(meta["step"])}
    return load_file(str(folder / WEIGHTS_FILE)), meta["config"], provenance


def export_pretrained(source: str | Path, out: str | Path, *, with_discriminator: bool = False) -> Path:
    """Write `out` (.safetensors): the autoencoder's weights (and the discriminator's when asked) + config.

    source: a run directory, a checkpoint folder, or an earlier export. The file is written under a
    temporary name and renamed, so `out` is complete or absent.
    """
    from safetensors.torch import save_file

    tensors, config, provenance = _read_source(source)
    if not with_discriminator:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(_DISC_PREFIX)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    metadata = {"format": FORMAT, "config": json.dumps(config), **provenance}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Autoencoder in eval mode from an export, a checkpoint folder or a run directory (its newest checkpoint).

    The result needs no DeepSpeed: `codes = model.encode(images)` (images (B, 3, H, W) in [-1, 1]) gives
    LatentCodes with indices / coeffs of shape (B, S, H', W'), and `model.decode(codes)` the images.
    """
    tensors, config, _ = _read_source(path)
    cfg = config_from_dict(config)
    model = build_autoencoder(cfg.model)
    weights = {k: v for k, v in tensors.items() if not k.startswith(_DISC_PREFIX)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model its config describes "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.config = cfg  # type: ignore[attr-defined]  # kept for callers that need image size etc.
    return model.to(device).eval()


__all__ = ["FORMAT", "META_FILE", "export_pretrained", "load_pretrained"]
