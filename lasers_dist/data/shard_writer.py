"""Write WebDataset tar shards plus a JSON manifest per split; parallel, deterministic and resumable.

Layout of OUT_DIR after a run:
    {split}-000000.tar, {split}-000001.tar, ...   members `KEY.png|jpg`, `KEY.cls` (when labelled), `KEY.json`
    {split}.json                                  the manifest (written last: its presence means "complete")
    .{split}.progress.json                        only while a split is unfinished

Workers decode / resize / encode items; the main process receives the results in item order and cuts shards,
so the output bytes do not depend on the number of workers. After every completed shard the progress file is
rewritten atomically; a rerun with the same options keeps the completed shards and continues after them.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .pixels import center_crop, encode, resize_shorter_side
from .sources import Item, Source, load_item, read_source

MANIFEST_VERSION = 1
_TAR_BLOCK = 512


@dataclass(frozen=True)
class ShardOptions:
    """How samples are encoded and cut into shards (everything that changes the output bytes)."""

    size: int | None = None  # resize shorter side to `size` + center crop; None keeps the original size
    image_format: str = "png"  # "png" (lossless) or "jpeg"
    quality: int = 95  # JPEG quality
    max_count: int = 1000  # at most this many samples per shard (a split is spread evenly over its shards)
    max_bytes: int | None = None  # approximate bytes per shard (tar headers included)

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"format must be 'png' or 'jpeg', got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.max_count < 1:
            raise ValueError(f"max_count must be at least 1, got {self.max_count}")
        if self.max_bytes is not None and self.max_bytes < 1024:
            raise ValueError(f"max_bytes must be at least 1024, got {self.max_bytes}")


# ---- encoding one item (worker processes) ----------------------------------------------------------------

def _sample_key(item: Item) -> str:
    return f"{item.index:08d}"  # no dots: WebDataset splits the key from the extension at the first dot


def encode_item(item: Item, options: ShardOptions) -> tuple[str, list[tuple[str, bytes]] | None, str | None, tuple]:
    """Returns (key, members or None, reason when skipped, (height, width) written)."""
    try:
        img, mode = load_item(item)
        orig_w, orig_h = img.size
        if options.size is not None:
            img = center_crop(resize_shorter_side(img, options.size), options.size)
        payload = encode(img, options.image_format, options.quality)
    except Exception as e:  # one bad file must never abort a job of 70,000: record it and go on
        message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "data", str(e))  # no memory addresses in manifests
        return _sample_key(item), None, f"{type(e).__name__}: {message}", ()
    ext = "png" if options.image_format == "png" else "jpg"
    meta = {"source": item.key, "label": item.label, "width": orig_w, "height": orig_h, "mode": mode}
    members = [(ext, payload)]
    if item.label is not None:
        members.append(("cls", str(item.label).encode()))
    members.append(("json", json.dumps(meta, sort_keys=True).encode()))
    return _sample_key(item), members, None, (img.size[1], img.size[0])


_worker_options: ShardOptions | None = None


def _init_worker(options: ShardOptions) -> None:
    global _worker_options
    _worker_options = options


def _encode_in_worker(item: Item):
    return encode_item(item, _worker_options)


def _encoded_stream(items: list[Item], options: ShardOptions, workers: int) -> Iterator[tuple]:
    if workers <= 1:
        for item in items:
            yield encode_item(item, options)
        return
    # fork shares already-loaded source data (e.g. the built-in photos) with the workers for free.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(options,)) as pool:
        yield from pool.imap(_encode_in_worker, items, chunksize=8)


# ---- tar files -------------------------------------------------------------------------------------------

def _member_bytes(members: list[tuple[str, bytes]]) -> int:
    return sum(_TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK for _, data in members)


class _ShardFile:
    """One tar being written under a temporary name; `commit` renames it into place."""

    def __init__(self, path: Path, first_item: int):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.first_item, self.count, self.bytes = first_item, 0, 2 * _TAR_BLOCK
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical bytes on rerun
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.bytes += _member_bytes(members)

    def commit(self, next_item: int) -> dict:
        self.tar.close()
        digest = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "num_samples": self.count, "num_bytes": self.path.stat().st_size,
                "sha256": digest.hexdigest(), "first_item": self.first_item, "next_item": next_item}


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---- one split ---------------------------------------------------------------------------------------------

def _fingerprint(source_info: dict, options: ShardOptions, split: str, items: list[Item]) -> str:
    listing = hashlib.sha256("\n".join(f"{it.index}:{it.key}:{it.split}" for it in items).encode()).hexdigest()
    blob = json.dumps({"source": source_info, "options": asdict(options), "split": split, "items": listing},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _split_files(out_dir: Path, split: str) -> list[Path]:
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar(\.tmp)?")
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))


def _restore_progress(out_dir: Path, split: str, fingerprint: str, overwrite: bool) -> dict:
    """Progress of an earlier run with the same fingerprint, or a fresh start (clearing another job's files)."""
    manifest_path, progress_path = out_dir / f"{split}.json", out_dir / f".{split}.progress.json"
    previous, complete = None, False
    if progress_path.exists():
        previous = _read_json_or_none(progress_path)
    elif manifest_path.exists():
        manifest = _read_json_or_none(manifest_path) or {}
        previous = dict(manifest.get("_progress", {}), fingerprint=manifest.get("fingerprint"))
        complete = True
    fresh = {"fingerprint": fingerprint, "shards": [], "skipped": [], "next_item": 0}
    if previous is None or previous.get("fingerprint") != fingerprint:
        leftovers = _split_files(out_dir, split)
        if (previous is not None or leftovers) and not overwrite:
            raise ValueError(f"{out_dir} already holds '{split}' shards written from another source or with other "
                             f"options; choose an empty OUT_DIR or pass --overwrite to replace them")
        for path in leftovers + [manifest_path, progress_path]:
            path.unlink(missing_ok=True)
        return fresh
    # Keep the leading shards that are still intact; redo everything after the first damaged one.
    kept, listed = [], previous.get("shards", [])
    for shard in listed:
        path = out_dir / shard["name"]
        if not path.exists() or path.stat().st_size != shard["num_bytes"]:
            break
        kept.append(shard)
    complete = complete and len(kept) == len(listed) and "next_item" in previous
    next_item = previous["next_item"] if complete else (kept[-1]["next_item"] if kept else 0)
    keep_names = {s["name"] for s in kept}
    for path in _split_files(out_dir, split):
        if path.name not in keep_names:
            path.unlink()
    skipped = [s for s in previous.get("skipped", []) if s["item"] < next_item]
    if not complete:
        manifest_path.unlink(missing_ok=True)
    return {"fingerprint": fingerprint, "shards": kept, "skipped": skipped, "next_item": next_item,
            "complete": complete}


def _read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"fingerprint": None}  # unreadable: treated as another job's file


def write_split(items: list[Item], out_dir: str | os.PathLike, split: str, options: ShardOptions, *,
                source_info: dict, workers: int = 1, progress: bool = False, overwrite: bool = False,
                on_shard: Callable[[dict], None] | None = None, image_size: int | None = None,
                listing_errors: list[dict] | None = None) -> dict:
    """Encode `items` (already in their final, shuffled order) into `out_dir/{split}-NNNNNN.tar` shards.

    Returns the manifest (also written to `out_dir/{split}.json`). `on_shard(shard_entry)` runs after each
    shard is committed (progress is durable at that point, so an exception raised there is a clean stop).
    `image_size` is recorded in the manifest when the items are already square crops of that size;
    `listing_errors` (damage found while listing the source) are recorded too.
    """
    if len({it.index for it in items}) != len(items):
        raise ValueError(f"split {split!r}: item indices are not unique, so shard keys would collide")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(source_info, options, split, items)
    state = _restore_progress(out, split, fingerprint, overwrite)
    manifest_path, progress_path = out / f"{split}.json", out / f".{split}.progress.json"
    if state.get("complete"):
        return json.loads(manifest_path.read_text())

    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=state["next_item"], desc=f"{split}", unit="img", disable=not progress)
    pending_skips: list[dict] = []
    current: _ShardFile | None = None

    def commit(next_item: int) -> None:
        nonlocal current, pending_skips
        entry = current.commit(next_item)
        state["shards"].append(entry)
        state["skipped"] += [s for s in pending_skips if s["item"] < next_item]
        pending_skips = [s for s in pending_skips if s["item"] >= next_item]
        state["next_item"], current = next_item, None
        _write_json_atomic(progress_path, state)
        if on_shard is not None:
            on_shard(entry)

    # Spread the split evenly over the fewest shards that respect max_count (no small remainder shard:
    # split-mode streams can only use as many batches as their smallest shards allow).
    per_shard = -(-len(items) // max(1, -(-len(items) // options.max_count)))
    start = state["next_item"]
    encoded = _encoded_stream(items[start:], options, workers)
    try:
        for pos, (key, members, reason, _) in enumerate(encoded, start):
            bar.update(1)
            if members is None:
                pending_skips.append({"item": pos, "source": items[pos].key, "reason": reason})
                continue
            size = _member_bytes(members)
            if current is not None and options.max_bytes is not None and current.bytes + size > options.max_bytes:
                commit(pos)
            if current is None:
                current = _ShardFile(out / f"{split}-{len(state['shards']):06d}.tar", pos)
            current.add(key, members)
            if current.count >= per_shard:
                commit(pos + 1)
        if current is not None:
            commit(len(items))
    finally:
        encoded.close()  # stops the worker pool now, not when the traceback is collected
        bar.close()
        if current is not None:  # interrupted mid-shard: drop the partial file, the progress file is intact
            current.tar.close()
            current.tmp.unlink(missing_ok=True)
    state["skipped"] += pending_skips
    manifest = _manifest(split, items, options, source_info, state, image_size or options.size)
    manifest["listing_errors"] = listing_errors or []
    _write_json_atomic(manifest_path, manifest)
    progress_path.unlink(missing_ok=True)
    return manifest


def _manifest(split: str, items: list[Item], options: ShardOptions, source_info: dict, state: dict,
              image_size: int | None) -> dict:
    shards = [{k: s[k] for k in ("name", "num_samples", "num_bytes", "sha256")} for s in state["shards"]]
    labels = sorted({it.label for it in items if it.label is not None})
    return {
        "format_version": MANIFEST_VERSION,
        "split": split,
        "complete": True,
        "fingerprint": state["fingerprint"],
        "source": source_info,
        "options": asdict(options),
        "image_size": image_size,  # null: original sizes kept (they may differ between samples)
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_classes": (max(labels) + 1) if labels else None,
        "shards": shards,
        "skipped": [{"source": s["source"], "reason": s["reason"]} for s in state["skipped"]],
        # private bookkeeping that lets a rerun recognise completed shards
        "_progress": {"shards": state["shards"], "skipped": state["skipped"], "next_item": state["next_item"]},
    }


# ---- whole jobs --------------------------------------------------------------------------------------------

def assign_splits(source: Source, split_mode: str | None, val_fraction: float | None, test_fraction: float | None,
                  seed: int) -> dict[str, list[Item]]:
    """Group items by split and shuffle each split deterministically by `seed`.

    split_mode "official" uses the source's own split; "fraction" cuts a seeded shuffle by the fractions
    (defaults: val 0.05, test 0); None means official when the source has one and no fraction was given.
    """
    if split_mode is None:
        split_mode = "official" if source.has_official_split and val_fraction is None and test_fraction is None \
            else "fraction"
    rng = np.random.default_rng(seed)
    if split_mode == "official":
        if not source.has_official_split:
            raise ValueError(f"source {source.path!r} ({source.kind}) has no official split "
                             f"(Oxford Flowers needs setid.mat beside it); use --split fraction")
        if val_fraction is not None or test_fraction is not None:
            raise ValueError("--val-fraction / --test-fraction apply to --split fraction, not to the official split")
        groups: dict[str, list[Item]] = {}
        for it in source.items:
            groups.setdefault(it.split, []).append(it)
        return {s: [g[i] for i in rng.permutation(len(g))] for s, g in sorted(groups.items())}
    if split_mode != "fraction":
        raise ValueError(f"unknown split mode {split_mode!r}: use 'official' or 'fraction'")
    val_fraction = 0.05 if val_fraction is None else val_fraction
    test_fraction = 0.0 if test_fraction is None else test_fraction
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    shuffled = [source.items[i] for i in rng.permutation(len(source.items))]
    n_test = round(test_fraction * len(shuffled))
    n_val = round(val_fraction * len(shuffled))
    groups = {"test": shuffled[:n_test], "val": shuffled[n_test:n_test + n_val], "train": shuffled[n_test + n_val:]}
    return {s: g for s, g in groups.items() if g}


def _run_splits(groups: dict[str, list[Item]], out_dir: Path, options: ShardOptions, source_info: dict,
                workers: int, progress: bool, overwrite: bool, on_shard, image_size: int | None = None,
                listing_errors: list[dict] | None = None) -> dict[str, dict]:
    manifests = {}
    for split in ("train", "val", "test"):
        if split in groups:
            manifests[split] = write_split(groups[split], out_dir, split, options, source_info=source_info,
                                           workers=workers, progress=progress, overwrite=overwrite,
                                           on_shard=on_shard, image_size=image_size,
                                           listing_errors=listing_errors)
    if sum(m["num_samples"] for m in manifests.values()) == 0:
        reasons = sorted({s["reason"] for m in manifests.values() for s in m["skipped"]})[:5]
        raise ValueError(f"no image of the source could be read; first reasons: {reasons}")
    return manifests


def write_shards(source: str | os.PathLike, out_dir: str | os.PathLike, *, kind: str | None = None,
                 size: int | None = None, image_format: str = "png", quality: int = 95, max_count: int = 1000,
                 max_bytes: int | None = None, split: str | None = None, val_fraction: float | None = None,
                 test_fraction: float | None = None, seed: int = 0, workers: int = 1, progress: bool = False,
                 overwrite: bool = False, on_shard: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Shard a dataset on disk into `out_dir`; returns {split: manifest}. See `lasers-shard --help`."""
    options = ShardOptions(size, image_format, quality, max_count, max_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = read_source(source, kind, out / ".cache")
    source_info = {"path": str(Path(source).resolve()), "kind": src.kind, "split": split,
                   "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    manifests = _run_splits(assign_splits(src, split, val_fraction, test_fraction, seed), out, options,
                            source_info, workers, progress, overwrite, on_shard, listing_errors=src.errors)
    for path in src.cleanup:
        Path(path).unlink(missing_ok=True)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    return manifests


def write_builtin_photos(out_dir: str | os.PathLike, *, size: int = 64, crops_per_photo: int = 200,
                         val_fraction: float = 0.15, test_fraction: float = 0.0, image_format: str = "png",
                         quality: int = 95, max_count: int = 128, max_bytes: int | None = None, seed: int = 0,
                         workers: int = 1, progress: bool = False, overwrite: bool = False,
                         on_shard: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Build the built-in `photos` set (scikit-image photographs, random crops of `size`) into `out_dir`."""
    from .builtin import builtin_photo_items

    groups, members = builtin_photo_items(size, crops_per_photo, val_fraction, test_fraction, seed)
    # The crops are already at `size`; the writer only encodes them.
    options = ShardOptions(None, image_format, quality, max_count, max_bytes)
    source_info = {"path": "builtin:photos", "kind": "builtin", "size": size, "crops_per_photo": crops_per_photo,
                   "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed, "photos": members}
    return _run_splits(groups, Path(out_dir), options, source_info, workers, progress, overwrite, on_shard, size)
