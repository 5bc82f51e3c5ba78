"""Helpers for the data tests: real tar shards written through the library's writer, and ways to damage them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from lasers_dist.data.shard_writer import ShardOptions, write_split
from lasers_dist.data.sources import Item


def pattern(index: int, size: int, smooth: bool = False) -> np.ndarray:
    """The (size, size, 3) uint8 picture of sample `index`: random noise, or a smooth colour ramp (for JPEG)."""
    rng = np.random.default_rng(index)
    if not smooth:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    y, x = np.linspace(0, 1, size)[:, None, None], np.linspace(0, 1, size)[None, :, None]
    return np.rint(rng.uniform(70, 180, 3) + y * rng.uniform(-60, 60, 3) + x * rng.uniform(-60, 60, 3)).astype(np.uint8)


def make_shards(out_dir: Path, n_shards: int, per_shard: int, *, size: int = 16, split: str = "train",
                image_format: str = "png", smooth: bool = False) -> list[str]:
    """Write n_shards x per_shard labelled samples (label = index % 10); returns the shard paths."""
    items = [Item(i, f"sample{i}", i % 10, None, ("pixels", pattern(i, size, smooth)))
             for i in range(n_shards * per_shard)]
    manifest = write_split(items, out_dir, split, ShardOptions(None, image_format, 95, per_shard),
                           source_info={"path": "test"})
    return [str(Path(out_dir) / s["name"]) for s in manifest["shards"]]


def corrupt_sample(shard: str, which: int) -> str:
    """Replace the image bytes of the `which`-th sample of a shard by garbage; returns that sample's key."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    victim = keys[which]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == f"{victim}.png":
                data = b"\x89PNG not really a png" + bytes(200)
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return victim


def truncate(shard: str, fraction: float = 0.5) -> None:
    path = Path(shard)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
