"""Exported weights: one safetensors file with the autoencoder's weights and its resolved config.

`export_pretrained` reads a training checkpoint (the rank-0 `model.safetensors` + `meta.json` that every
checkpoint folder holds, so DeepSpeed is not needed) and writes the generator's weights with the config in the
file's metadata. `load_pretrained` rebuilds the model from such a file, from a checkpoint folder, or from a run
directory (its newest checkpoint), ready for `encode(images) -> LatentCodes` and `decode(codes) -> images`.

Only safetensors files are read (never a pickle), and they are verified first: a checkpoint's weights against
the size and sha256 recorded in its meta.json (a run directory falls back to the previous checkpoint, with a
warning, when the newest is damaged; a named checkpoint folder is an error), an export against the sha256 of
its tensors stored in its own metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lasers_dist.config import config_from_dict
from lasers_dist.models import Autoencoder, build_autoencoder
from lasers_dist.train.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    file_problems,
    read_meta,
    resume_candidates,
)

FORMAT = "lasers_dist.autoencoder/1"
_DISC_PREFIX = "discriminator."


def _weights_problems(folder: Path) -> list[str]:
    try:
        meta = read_meta(folder)
    except CheckpointError as err:
        return [str(err)]
    if not (folder / WEIGHTS_FILE).is_file():
        return [f"{folder / WEIGHTS_FILE}: missing"]
    return file_problems(folder, meta, check_hashes=True, names=[WEIGHTS_FILE])


def _checkpoint_folder(source: Path) -> Path:
    """The checkpoint to read under `source`: a named step-* folder (damaged: an error), or the newest intact
    one of a run directory (damaged newer ones are skipped with a warning naming the file)."""
    candidates, explicit = resume_candidates(str(source), source / "checkpoints")
    for folder in candidates:
        problems = _weights_problems(folder)
        if not problems:
            return folder
        if explicit:
            raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}")
        warnings.warn(f"checkpoint {folder} is damaged ({'; '.join(problems)}); using the one before it",
                      stacklevel=3)
    raise CheckpointError(f"{source}: no intact checkpoint with {WEIGHTS_FILE} found")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (in name order): an export's own checksum."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); only safetensors files are "
                              "loaded (nothing is unpickled): give an export written by lasers-export, a run "
                              "directory or a checkpoint folder") from err


def _read_source(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """-> (tensors, config dict, provenance) from an exported file or a checkpoint / run directory, verified."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: give an exported .safetensors file, a run directory or "
                                "a checkpoints/step-NNNNNNNN folder")
    if source.is_file():
        tensors, metadata = _read_safetensors(source)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{source} is not a lasers_dist export (metadata format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r}); create one with `lasers-export RUN OUT.safetensors`")
        if "sha256" in metadata and tensors_digest(tensors) != metadata["sha256"]:
            raise CheckpointError(f"{source} is damaged: its tensors do not match the sha256 stored at export; "
                                  "export it again from the run")
        provenance = {k: v for k, v in metadata.items() if k not in ("format", "config", "sha256")}
        return tensors, json.loads(metadata["config"]), provenance
    folder = _checkpoint_folder(source)
    meta = read_meta(folder)
    provenance = {"checkpoint": str(folder.resolve()), "step": str(meta["step"])}
    if "omp_backend" in meta:
        provenance["omp_backend"] = str(meta["omp_backend"])
    return _read_safetensors(folder / WEIGHTS_FILE)[0], meta["config"], provenance


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
    metadata = {"format": FORMAT, "config": json.dumps(config), **provenance, "sha256": tensors_digest(tensors)}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Autoencoder in eval mode from an export, a checkpoint folder or a run directory (its newest checkpoint).

    The result needs no DeepSpeed: `codes = model.encode(images)` (images (B, 3, H, W) in [-1, 1]) gives
    LatentCodes with indices / coeffs of shape (B, S, H', W'), and `model.decode(codes)` the images.
    `model.config` is the run's Config; `model.provenance` names the checkpoint read and its step.
    """
    tensors, config, provenance = _read_source(path)
    cfg = config_from_dict(config)
    model = build_autoencoder(cfg.model)
    weights = {k: v for k, v in tensors.items() if not k.startswith(_DISC_PREFIX)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model its config describes "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.config = cfg  # type: ignore[attr-defined]  # kept for callers that need image size etc.
    # Which checkpoint was read (after any fallback past a damaged one) and its step, as strings: the same
    # entries an export carries in its metadata.
    model.provenance = provenance  # type: ignore[attr-defined]
    return model.to(device).eval()


__all__ = ["FORMAT", "META_FILE", "export_pretrained", "load_pretrained"]
