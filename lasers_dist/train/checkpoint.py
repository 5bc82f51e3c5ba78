"""Checkpoints: one folder per optimizer step, complete or absent.

    out_dir/checkpoints/step-NNNNNNNN/
        generator/            DeepSpeed save_checkpoint(..., tag="step-NNNNNNNN") of the generator engine
        discriminator/        the same for the discriminator engine (GAN runs only)
        ranks/rank-NNNNN.pt   each rank's data-stream state and python / numpy / torch RNG states
        model.safetensors     rank 0: generator state dict (buffers included, floats as fp32) and the
                              discriminator's under "discriminator.", readable without DeepSpeed
        meta.json             step, world size, ZeRO stage, stream mode, time, resolved config, versions

Every rank writes into checkpoints/.tmp-step-NNNNNNNN; after a barrier rank 0 renames it to step-NNNNNNNN (the
commit: a rename within one folder is atomic), so a folder named step-* is always complete and a crash leaves
only a .tmp-* folder that the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lasers_dist.config import Config, config_to_dict
from lasers_dist.train import distributed as D

_STEP_RE = re.compile(r"^step-(\d{8})$")
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit the run that wants to resume from it."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / "ranks" / f"rank-{rank:05d}.pt"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under `root` as (step, folder), oldest first; .tmp-* folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str, checkpoints_root: str | Path) -> Path | None:
    """`--resume` value -> checkpoint folder. "auto": the newest committed one under checkpoints_root, or None
    (a fresh start). A path: a step-* folder, or a run directory / checkpoints folder (its newest step-*)."""
    if resume == "auto":
        return latest_checkpoint(checkpoints_root)
    path = Path(resume)
    if (path / META_FILE).is_file():
        return path
    for candidate in (path / "checkpoints", path):
        newest = latest_checkpoint(candidate)
        if newest is not None:
            return newest
    raise CheckpointError(
        f"--resume {resume}: no complete checkpoint there (expected a folder with {META_FILE}, or a run directory "
        "holding checkpoints/step-NNNNNNNN)"
    )


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: {META_FILE} is missing")
    return json.loads(path.read_text())


def check_resume_compatible(meta: dict[str, Any], world_size: int, stream_mode: str, zero_stage: int,
                            folder: Path, precision: str | None = None) -> None:
    """Refuse a resume that cannot continue the saved run: another ZeRO stage (the optimizer state has another
    layout), or another world size unless the stream is resampled (split streams hand each rank a fixed slice
    of the shards, so saved positions mean nothing on a different number of ranks) and the optimizer state is
    whole (ZeRO-1/2 partition it over the ranks that wrote it, and DeepSpeed cannot re-partition it)."""
    saved, saved_stage = int(meta["world_size"]), int(meta["zero_stage"])
    saved_precision = meta.get("precision")
    if precision is not None and saved_precision is not None and saved_precision != precision:
        raise CheckpointError(
            f"checkpoint {folder} was written with train.precision={saved_precision}, this run has {precision}: "
            f"the optimizer state differs between the two; resume with train.precision={saved_precision}"
        )
    if saved_stage != zero_stage:
        raise CheckpointError(
            f"checkpoint {folder} was written with deepspeed.zero_stage={saved_stage}, this run has {zero_stage}: "
            f"resume with deepspeed.zero_stage={saved_stage}"
        )
    if saved == world_size:
        return
    if stream_mode != "resampled":
        raise CheckpointError(
            f"checkpoint {folder} was written by {saved} ranks but this run has {world_size}: data.mode=split streams "
            f"cannot be redistributed exactly. Resume with {saved} ranks, or set data.mode=resampled (ranks then "
            "draw fresh, independently seeded samples)"
        )
    if saved_stage > 0:
        raise CheckpointError(
            f"checkpoint {folder} was written by {saved} ranks at ZeRO-{saved_stage}, which partitions the optimizer "
            f"state over those ranks, and DeepSpeed cannot re-partition it for {world_size}: resume with {saved} "
            "ranks (only ZeRO-0 checkpoints move to another world size, with data.mode=resampled)"
        )


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _float_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    # Floating tensors as fp32 (bf16 training keeps bf16 module weights), integer buffers as they are; cloned
    # so no two entries share storage (safetensors refuses shared tensors).
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach().cpu()
        out[prefix + key] = (value.float() if value.is_floating_point() else value).clone().contiguous()
    return out


def write_weights(path: Path, generator: nn.Module, discriminator: nn.Module | None) -> None:
    from safetensors.torch import save_file

    tensors = _float_state(generator)
    if discriminator is not None:
        tensors.update(_float_state(discriminator, "discriminator."))
    save_file(tensors, str(path), metadata={"format": "pt"})


def build_meta(step: int, cfg: Config, world_size: int) -> dict[str, Any]:
    import deepspeed

    return {
        "step": step,
        "world_size": world_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "stream_mode": cfg.data.mode,
        "precision": cfg.train.precision,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_to_dict(cfg),
        "torch_version": torch.__version__,
        "deepspeed_version": deepspeed.__version__,
    }


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    engines: Any,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write and commit checkpoint `step` (call on every rank, in lockstep). Returns the committed folder.

    engines: an Engines (generator / discriminator DeepSpeed engines). rank_state: this rank's own state
    (stream position, RNG states) -> ranks/rank-NNNNN.pt. meta: rank 0's meta.json content.
    Saving a step that is already committed (a stop signal right after a scheduled save) is a no-op.
    """
    root, name, rank = Path(root), step_name(step), D.rank()
    final, tmp = root / name, root / f".tmp-{name}"
    if D.broadcast_object(final.is_dir()):
        return final
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a crash: never committed, never read
            shutil.rmtree(stale)
        tmp.mkdir()
    D.barrier()
    engines.generator.save_checkpoint(str(tmp / "generator"), tag=name)
    if engines.discriminator is not None:
        engines.discriminator.save_checkpoint(str(tmp / "discriminator"), tag=name)
    rank_path = rank_file(tmp, rank)
    rank_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, rank_path)
    if rank == 0:
        disc_module = engines.discriminator.module if engines.discriminator is not None else None
        write_weights(tmp / WEIGHTS_FILE, engines.generator.module, disc_module)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    D.barrier()  # every rank's files are written
    if rank == 0:
        _fsync_tree(tmp)  # contents on disk before the rename commits them (an OS crash must not tear them)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    D.barrier()  # committed: nobody may exit (or resume) before the rename
    return final


def load_checkpoint(folder: str | Path, engines: Any, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load both engines (weights, optimizer, LR schedule) from `folder` on every rank.

    Returns (meta, this rank's saved state or None when the checkpoint has no file for this rank, i.e. it was
    written by fewer ranks).
    """
    folder = Path(folder)
    meta = read_meta(folder)
    name = folder.name
    for role, engine in (("generator", engines.generator), ("discriminator", engines.discriminator)):
        if engine is None:
            continue
        if not (folder / role).is_dir():
            raise CheckpointError(f"checkpoint {folder} has no {role}/ folder, but this run trains a {role}")
        path, _ = engine.load_checkpoint(str(folder / role), tag=name)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder / role} (tag {name})")
    state_path = rank_file(folder, rank)
    # Our own file (numpy RNG state is not a plain tensor): full unpickling is intended here.
    state = torch.load(state_path, weights_only=False) if state_path.is_file() else None
    return meta, state
