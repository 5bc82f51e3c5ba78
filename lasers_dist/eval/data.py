"""Which images an evaluation sees, and how one rank reads its share, every image exactly once.

The evaluation set is the shards in the order given, samples in shard order (the first `limit` of them when a
limit is set). Each image has a global index in that order. Under torchrun rank r reads shards r, r + W, ...
(a disjoint slice), so the union over ranks is the same set whatever the world size, and per-image results,
sorted by global index, equal a one-process evaluation's.

Reading goes through `ShardStream` (split mode, centre crops, in order, the same decoding and degradations as
training's validation) with one image per stream batch, because a stream drops the remainder of its last
batch and an evaluation must not.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from lasers_dist.data import ShardStream, expand_urls, sample_counts


@dataclass(frozen=True)
class ShardSlice:
    """The first `take` samples of shard `url`; `first_index` is the global index of its first sample."""

    url: str
    count: int
    take: int
    first_index: int


@dataclass
class EvalBatch:
    """indices (B,) global image indices; keys; targets (B, 3, H, W) clean images in [-1, 1]; inputs the
    model's input (degraded for restoration tasks, else the targets)."""

    indices: list[int]
    keys: list[str]
    targets: Tensor
    inputs: Tensor


def plan_slices(shards: str | list[str], limit: int | None = None) -> list[ShardSlice]:
    """Shards (pattern, glob, manifest or list) -> the slices holding the evaluation set, in global order."""
    urls = expand_urls(shards)
    counts = sample_counts(urls)
    slices, first = [], 0
    for url, count in zip(urls, counts):
        take = count if limit is None else max(0, min(count, limit - first))
        if take > 0:
            slices.append(ShardSlice(url, count, take, first))
        first += take
    if not slices:
        raise ValueError(f"no images to evaluate in {shards!r} (limit {limit})")
    return slices


def rank_slices(slices: list[ShardSlice], rank: int, world_size: int) -> list[ShardSlice]:
    """This rank's disjoint share: slices rank, rank + world_size, ... (possibly none)."""
    return slices[rank::world_size]


class EvalImages:
    """Iterates (global index, key, target (3, H, W), input (3, H, W)) over every readable image of `slices`.

    num_workers 0 decodes in this process, 1 in one background worker (more would interleave shards and
    break the order). Undecodable samples are skipped and counted in `corrupt_samples`; the stream replaces a
    lost sample by reading on, so positions are recovered from its loss count and repeats are dropped.
    """

    def __init__(self, slices: list[ShardSlice], *, image_size: int, degradation: str | None = None,
                 sr_factor: int = 4, mask_fraction: float = 0.25, num_workers: int = 0) -> None:
        if num_workers not in (0, 1):
            raise ValueError(f"evaluation reads with 0 or 1 DataLoader workers, got {num_workers}")
        self.slices, self.corrupt_samples = slices, 0
        self.stream_args = dict(batch_size=1, image_size=image_size, mode="split", train=False,
                                num_workers=num_workers, degradation=degradation, sr_factor=sr_factor,
                                mask_fraction=mask_fraction)

    def __iter__(self) -> Iterator[tuple[int, str, Tensor, Tensor]]:
        if not self.slices:
            return
        slices = self.slices
        stream = ShardStream([s.url for s in slices], batches_per_epoch=sum(s.take for s in slices),
                             **self.stream_args)
        starts = [0]
        for s in slices:
            starts.append(starts[-1] + s.count)
        seen: set[int] = set()
        try:
            for yielded, batch in enumerate(stream):
                self.corrupt_samples = stream.corrupt_count
                position = yielded + stream.corrupt_count  # index in the concatenated input of these shards
                which = bisect.bisect_right(starts, position) - 1
                if which >= len(slices) or position - starts[which] >= slices[which].take:
                    continue  # read past a limit or into a second pass, only to replace lost samples
                index = slices[which].first_index + position - starts[which]
                if index in seen:
                    continue
                seen.add(index)
                target = batch["images"][0]
                yield index, batch["keys"][0], target, batch["inputs"][0] if "inputs" in batch else target
        finally:
            stream.close()


def batched(images: EvalImages, batch_size: int) -> Iterator[EvalBatch]:
    """Group the images into EvalBatches of up to batch_size (the last one may be smaller)."""
    items: list[tuple[int, str, Tensor, Tensor]] = []
    for item in images:
        items.append(item)
        if len(items) == batch_size:
            yield _stack(items)
            items = []
    if items:
        yield _stack(items)


def _stack(items: list[tuple[int, str, Tensor, Tensor]]) -> EvalBatch:
    return EvalBatch([i[0] for i in items], [i[1] for i in items], torch.stack([i[2] for i in items]),
                     torch.stack([i[3] for i in items]))
