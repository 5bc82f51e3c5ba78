"""Checkpoints: one folder per optimizer step, complete or absent, verified before use.

    out_dir/checkpoints/step-NNNNNNNN/
        generator/              DeepSpeed save_checkpoint(..., tag="step-NNNNNNNN") of the generator engine
        discriminator/          the same for the discriminator engine (GAN runs only)
        ranks/rank-NNNNN.json   each rank's data-stream state and python / numpy / torch RNG states (plain JSON)
        model.safetensors       rank 0: generator state dict (buffers included, floats as fp32) and the
                                discriminator's under "discriminator.", readable without DeepSpeed
        meta.json               step, world size, ZeRO stage, stream mode, time, resolved config, versions, and
                                "files": the size and sha256 of every other file, taken at commit

Every rank writes into checkpoints/.tmp-step-NNNNNNNN; after a barrier the ranks hash the files (each a share),
rank 0 writes meta.json and renames the folder to step-NNNNNNNN (the commit: a rename within one folder is
atomic). A folder named step-* is therefore complete when committed; a crash leaves only a .tmp-* folder, which
is never read and which the next save removes. Damage after the commit (a truncated or overwritten file) is
found by comparing sizes (cheap, before any process group) and hashes (split over the ranks) with meta.json.

Nothing here unpickles except DeepSpeed's own loader (its model and optimizer files are torch pickles): resume
only from checkpoints you trust. Our per-rank state is JSON and the exported weights are safetensors.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lasers_dist.config import Config, config_to_dict
from lasers_dist.train import distributed as D

_STEP_RE = re.compile(r"^step-(\d{8})$")
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
_HASH_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, incomplete, cannot be written, or does not fit the run that wants it."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / "ranks" / f"rank-{rank:05d}.json"


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


def resume_candidates(resume: str, checkpoints_root: str | Path) -> tuple[list[Path], bool]:
    """`--resume` value -> (checkpoint folders to try, newest first; explicit). "auto": every committed checkpoint
    under checkpoints_root (none: a fresh start), not explicit, so a damaged one gives way to the one before. A path
    naming a step-* folder: just that one, explicit. A run directory or checkpoints folder: its committed
    checkpoints, newest first, not explicit."""
    if resume == "auto":
        return [p for _, p in reversed(list_checkpoints(checkpoints_root))], False
    path = Path(resume)
    if (path / META_FILE).is_file() or _STEP_RE.match(path.name):
        return [path], True
    for candidate in (path / "checkpoints", path):
        found = [p for _, p in reversed(list_checkpoints(candidate))]
        if found:
            return found, False
    raise CheckpointError(
        f"--resume {resume}: no complete checkpoint there (expected a folder with {META_FILE}, or a run directory "
        "holding checkpoints/step-NNNNNNNN)"
    )


def resolve_resume(resume: str, checkpoints_root: str | Path) -> Path | None:
    """The newest candidate of `resume_candidates`, unverified (None: auto with no checkpoint)."""
    candidates, _ = resume_candidates(resume, checkpoints_root)
    return candidates[0] if candidates else None


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {folder} is damaged: {path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"checkpoint {folder} is damaged: {path} holds no checkpoint description")
    return meta


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


# ---- per-rank state: JSON, so loading it runs no code ------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (and CUDA) RNG states as JSON-serialisable values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _bytes_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _bytes_to_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_text_to_bytes(state["cuda"]))


def _bytes_to_text(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str | torch.Tensor) -> torch.Tensor:
    if isinstance(text, torch.Tensor):  # a state read from a legacy .pt file
        return text
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def write_rank_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


def read_rank_state(folder: str | Path, rank: int) -> dict[str, Any] | None:
    """This rank's saved state, or None when the checkpoint has no file for it (it was written by fewer ranks).

    Checkpoints written before the state became JSON hold ranks/rank-NNNNN.pt: read with torch.load's
    weights_only mode, which unpickles only tensors, containers and the numpy types allow-listed here.
    """
    path = rank_file(folder, rank)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"checkpoint {folder} is damaged: {path} is not valid JSON ({err})") from err
    legacy = path.with_suffix(".pt")
    if not legacy.is_file():
        return None
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(legacy, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {legacy} safely (only tensors, containers and numpy arrays are "
                              f"allowed in it): {err}") from err


# ---- weights --------------------------------------------------------------------------------------------


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


def nonfinite_tensors(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of `module`'s floating parameters and buffers that hold a NaN or an Inf."""
    return [prefix + name for name, value in module.state_dict().items()
            if value.is_floating_point() and not bool(torch.isfinite(value).all())]


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


# ---- file sizes and hashes --------------------------------------------------------------------------------


def file_digest(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex digest} of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _data_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but meta.json, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != META_FILE)


def _digests_split_over_ranks(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Hash `names` under `folder`, rank r taking every world-size-th file from r; every rank gets all digests."""
    world, rank = D.world_size(), D.rank()
    mine = {name: file_digest(folder / name) for name in names[rank::world]}
    merged: dict[str, dict[str, Any]] = {}
    for part in D.all_gather_object(mine):
        merged.update(part)
    return merged


def file_problems(folder: str | Path, meta: dict[str, Any], check_hashes: bool = True,
                  names: list[str] | None = None) -> list[str]:
    """What is wrong with `folder`'s files against meta["files"], one line per file (empty: all good).

    Sizes always; sha256 when check_hashes. `names`: only these files (default: all). A file list absent from
    meta (checkpoints written before it was recorded) yields no problems: such checkpoints cannot be verified.
    """
    folder, recorded = Path(folder), meta.get("files") or {}
    problems = []
    for name in names if names is not None else sorted(recorded):
        if name not in recorded:
            continue
        path, expected = folder / name, recorded[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            what = "truncated" if size < expected["size"] else "longer than written"
            problems.append(f"{path}: {what} ({size} bytes, {expected['size']} at commit)")
        elif check_hashes and file_digest(path)["sha256"] != expected["sha256"]:
            problems.append(f"{path}: content changed since the commit (sha256 differs)")
    return problems


def checkpoint_problems(folder: str | Path, check_hashes: bool = False) -> list[str]:
    """What is wrong with a committed checkpoint, on this process alone: meta.json readable, files present with
    their recorded sizes, and (check_hashes) their sha256."""
    try:
        meta = read_meta(folder)
    except CheckpointError as err:
        return [str(err)]
    return file_problems(folder, meta, check_hashes)


def checkpoint_problems_collective(folder: str | Path) -> list[str]:
    """`checkpoint_problems` with hashes, the reading split over the ranks (a collective; every rank gets the same
    answer). Rank 0's view of meta.json decides what is checked."""
    folder = Path(folder)
    meta_or_problem: dict[str, Any] | str | None = None
    if D.rank() == 0:
        try:
            meta_or_problem = read_meta(folder)
        except CheckpointError as err:
            meta_or_problem = str(err)
    meta = D.broadcast_object(meta_or_problem)
    if isinstance(meta, str):
        return [meta]
    names = sorted(meta.get("files") or {})
    mine = file_problems(folder, meta, True, names[D.rank()::D.world_size()])
    return sorted(p for part in D.all_gather_object(mine) for p in part)


# ---- choosing the checkpoint to resume from ----------------------------------------------------------------


def _usable(folder: Path, problems: list[str], explicit: bool, warn: Callable[[str], None]) -> bool:
    if not problems:
        return True
    detail = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    if explicit:
        raise CheckpointError(f"checkpoint {folder} is damaged: {detail}. Name another checkpoint, or pass "
                              "--resume auto to take the newest complete one")
    warn(f"checkpoint {folder} is damaged ({detail}); falling back to the one before it")
    return False


def _usable_from(candidates: list[Path], explicit: bool, warn: Callable[[str], None],
                 find_problems: Callable[[Path], list[str]]) -> list[Path]:
    for index, folder in enumerate(candidates):
        if _usable(folder, find_problems(folder), explicit, warn):
            return candidates[index:]
    if candidates:
        raise CheckpointError(f"every checkpoint is damaged ({', '.join(str(c) for c in candidates)}): move them "
                              "away to start afresh, or repair the file system")
    return []


def first_intact(candidates: list[Path], explicit: bool, warn: Callable[[str], None]) -> list[Path]:
    """The candidates from the first whose files have their recorded sizes (no hashing: cheap enough for every
    rank before the process group starts). A damaged explicit checkpoint raises; otherwise it is skipped with a
    warning. All damaged: a CheckpointError naming them (never a silent fresh start)."""
    return _usable_from(candidates, explicit, warn, checkpoint_problems)


def first_verified(candidates: list[Path], explicit: bool, warn: Callable[[str], None]) -> Path | None:
    """The first candidate whose files all match their recorded sizes and hashes (a collective: every rank must
    call it with the same list; the hashing is split over the ranks). Damage is handled as in `first_intact`."""
    usable = _usable_from(candidates, explicit, warn, checkpoint_problems_collective)
    return usable[0] if usable else None


# ---- save and load -------------------------------------------------------------------------------------------


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


def _refuse_nonfinite(engines: Any, name: str, previous: Path | None) -> None:
    """Every rank checks its weights; if any rank finds a NaN / Inf, all refuse to write this checkpoint."""
    bad = nonfinite_tensors(engines.generator.module)
    if engines.discriminator is not None:
        bad += nonfinite_tensors(engines.discriminator.module, "discriminator.")
    device = next(engines.generator.module.parameters()).device
    flag = D.all_reduce_(torch.tensor([float(bool(bad))], device=device), op="max")
    if flag.item() > 0:
        shown = ", ".join(bad[:4]) or "on another rank"
        raise CheckpointError(f"refusing to write checkpoint {name}: the weights hold NaN or Inf ({shown}); the last "
                              f"good checkpoint is {previous or 'none'}")


def _write_failure(err: BaseException, name: str, root: Path, previous: Path | None) -> CheckpointError:
    free = shutil.disk_usage(root).free if root.exists() else 0
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < (1 << 20)
    cause = f"the file system is full (No space left on device; {free} bytes free)" if full else f"{err}"
    return CheckpointError(
        f"writing checkpoint {name} into {root} failed: {cause}. The previous checkpoint "
        f"{previous or '(none)'} is intact and nothing was committed; free space there (or set another "
        "train.out_dir) and resume with --resume auto"
    )


def save_checkpoint(
    root: str | Path,
    step: int,
    engines: Any,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    previous: Path | None = None,
) -> Path:
    """Write and commit checkpoint `step` (call on every rank, in lockstep). Returns the committed folder.

    engines: an Engines (generator / discriminator DeepSpeed engines). rank_state: this rank's own state
    (stream position, RNG states; JSON-serialisable) -> ranks/rank-NNNNN.json. meta: rank 0's meta.json content,
    to which the files' sizes and hashes are added. A committed folder of the same step (left by an earlier life
    of the run, which then resumed from an older checkpoint) is replaced. Weights holding NaN / Inf are never
    committed (CheckpointError), a failed write (a full disk) raises CheckpointError naming the cause, and the
    oldest checkpoints beyond `keep` are removed only after a commit, so the newest good one always survives.
    previous: the run's last good checkpoint, named in errors (default: the newest committed one).
    """
    root, name, rank = Path(root), step_name(step), D.rank()
    final, tmp, replaced = root / name, root / f".tmp-{name}", root / f".replaced-{name}"
    previous = previous or latest_checkpoint(root)
    _refuse_nonfinite(engines, name, previous)
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in [*root.glob(".tmp-step-*"), *root.glob(".replaced-step-*")]:  # left by a crash
                shutil.rmtree(stale)
            tmp.mkdir()
        D.barrier()
        engines.generator.save_checkpoint(str(tmp / "generator"), tag=name)
        if engines.discriminator is not None:
            engines.discriminator.save_checkpoint(str(tmp / "discriminator"), tag=name)
        write_rank_state(rank_file(tmp, rank), rank_state)
        if rank == 0:
            disc_module = engines.discriminator.module if engines.discriminator is not None else None
            write_weights(tmp / WEIGHTS_FILE, engines.generator.module, disc_module)
        D.barrier()  # every rank's files are written
        names = D.broadcast_object(_data_files(tmp) if rank == 0 else None)
        files = _digests_split_over_ranks(tmp, names)
        if rank == 0:
            (tmp / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2))
            _fsync_tree(tmp)  # contents on disk before the rename commits them (an OS crash must not tear them)
            if final.exists():  # from an earlier life of this run, which resumed from an older checkpoint
                os.rename(final, replaced)
            os.rename(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(replaced, ignore_errors=True)
    except Exception as err:
        if D.describe_collective_failure(err, None, 0) is not None:
            raise  # another rank failed, or stopped answering: its own error is the one to report
        raise _write_failure(err, name, root, previous) from err
    if rank == 0:
        # Only checkpoints up to this step rotate out: folders of later steps belong to an earlier life of the
        # run (damaged ones it fell back from) and must not push the one just committed out.
        for _, old in [(s, p) for s, p in list_checkpoints(root) if s <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()  # committed: nobody may exit (or resume) before the rename
    return final


def load_checkpoint(folder: str | Path, engines: Any, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load both engines (weights, optimizer, LR schedule) from `folder` on every rank.

    Returns (meta, this rank's saved state or None when the checkpoint has no file for this rank, i.e. it was
    written by fewer ranks). Verify the folder first (`first_verified`): DeepSpeed's loader unpickles its files.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    name = folder.name
    for role, engine in (("generator", engines.generator), ("discriminator", engines.discriminator)):
        if engine is None:
            continue
        if not (folder / role).is_dir():
            raise CheckpointError(f"checkpoint {folder} has no {role}/ folder, but this run trains a {role}")
        try:
            path, _ = engine.load_checkpoint(str(folder / role), tag=name)
        except Exception as err:
            if D.describe_collective_failure(err, None, 0) is not None:
                raise
            raise CheckpointError(f"DeepSpeed could not load {folder / role} (tag {name}): {err}") from err
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder / role} (tag {name})")
    return meta, read_rank_state(folder, rank)
