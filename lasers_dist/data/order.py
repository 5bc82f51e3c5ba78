"""The order in which one (rank, worker) consumes samples during one epoch, computed without reading data.

Shards are read front to back, one after another ("segments": a segment is one reading of one shard; a
resampled stream may read the same shard in several segments). Samples pass through a shuffle buffer. Both
the shard sequence and the buffer's picks come from generators seeded by (seed, rank, worker, epoch), and
the buffer is simulated on sample *references* (segment, position) using the per-shard sample counts of the
manifest. Hence the whole order is known before any byte is read, and skipping the first `c` samples of it
costs a loop over integers, not a decode.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np

Ref = tuple[int, int]  # (segment index, sample position inside that shard)


class SampleOrder:
    """Iterator over sample references for one (rank, worker, epoch).

    mode "split": the worker's `shard_ids`, in a seeded order, one pass; should the worker need more samples
    than they hold (damaged shards), further passes over the same shards follow, each in a new order.
    mode "resampled": an endless sequence of shards drawn uniformly with replacement from `shard_ids`.
    `segments[i] = (shard_id, first input index)` for every segment pushed so far.
    """

    def __init__(self, counts: list[int], shard_ids: list[int], *, mode: str, seed: int, rank: int, worker: int,
                 epoch: int, shuffle: bool, buffer_size: int):
        if mode not in ("split", "resampled"):
            raise ValueError(f"mode must be 'split' or 'resampled', got {mode!r}")
        if not shard_ids or sum(counts[i] for i in shard_ids) == 0:
            raise ValueError(f"rank {rank} worker {worker} was given no samples to read")
        self.counts, self.shard_ids, self.mode = counts, list(shard_ids), mode
        self.shuffle, self.buffer_size = shuffle, max(1, buffer_size if shuffle else 1)
        self._key = [seed, rank, worker, epoch]
        self.segments: list[tuple[int, int]] = []
        self.buffer: list[Ref] = []
        self.pushed = 0  # input index of the next sample to enter the buffer
        self.emitted = 0  # number of references handed out so far (the worker's cursor)
        self._uniform = np.empty(0)
        self._uniform_pos = 0
        self._pick_rng = np.random.default_rng(self._key + [1])
        self._refs = self._generate()

    def _shard_sequence(self) -> Iterator[tuple[int, bool]]:
        """Yields (shard id, whether this shard ends a pass)."""
        if self.mode == "resampled":
            rng = np.random.default_rng(self._key + [0])
            while True:
                for j in rng.integers(len(self.shard_ids), size=256):
                    yield self.shard_ids[j], False
        for pass_index in itertools.count():
            ids = self.shard_ids
            if self.shuffle:
                ids = [ids[j] for j in np.random.default_rng(self._key + [0, pass_index]).permutation(len(ids))]
            for n, shard_id in enumerate(ids):
                yield shard_id, n == len(ids) - 1

    def _pick(self) -> int:
        # Uniform floats drawn in blocks: the same picks whatever the block boundaries, and fast.
        if self._uniform_pos == len(self._uniform):
            self._uniform, self._uniform_pos = self._pick_rng.random(4096), 0
        u = self._uniform[self._uniform_pos]
        self._uniform_pos += 1
        return int(u * len(self.buffer))

    def _pop_random(self) -> Ref:
        j = self._pick()
        ref = self.buffer[j]
        self.buffer[j] = self.buffer[-1]
        self.buffer.pop()
        return ref

    def _generate(self) -> Iterator[Ref]:
        for shard_id, ends_pass in self._shard_sequence():
            segment = len(self.segments)
            self.segments.append((shard_id, self.pushed))
            for pos in range(self.counts[shard_id]):
                self.buffer.append((segment, pos))
                self.pushed += 1
                if len(self.buffer) >= self.buffer_size:
                    yield self._pop_random()
            if ends_pass:  # a split pass ends with the buffer drained, so passes do not mix
                while self.buffer:
                    yield self._pop_random()

    def __iter__(self) -> "SampleOrder":
        return self

    def __next__(self) -> Ref:
        ref = next(self._refs)
        self.emitted += 1
        return ref

    def skip(self, n: int) -> None:
        """Advance past the first `n` references (cheap: no data is touched)."""
        for _ in range(n - self.emitted):
            next(self)

    def input_index(self, ref: Ref) -> int:
        return self.segments[ref[0]][1] + ref[1]
