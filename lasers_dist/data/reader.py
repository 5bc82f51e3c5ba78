"""Fetch the bytes of the samples a `SampleOrder` hands out, reading shards strictly front to back.

Every reference the order emits was pushed into its buffer earlier, in input order, so reading the input
sequentially up to the requested reference always suffices; samples read on the way that are still in the
buffer are kept (at most `buffer_size` of them). After a restore, the samples emitted before the restore
point are not needed: shards holding none of the still-needed samples are skipped unopened, and a shard is
read only as far as its last needed sample.
"""

from __future__ import annotations

from collections import defaultdict

from .order import Ref, SampleOrder
from .remote import DEFAULT_TIMEOUT_S, shard_name
from .shards import Sample, ShardReadError, iter_samples


class SampleFetcher:
    """`fetch(ref)` -> (key, {ext: bytes}), or None when the sample is lost (damaged or short shard)."""

    def __init__(self, urls: list[str], order: SampleOrder, timeout: float = DEFAULT_TIMEOUT_S):
        self.urls, self.order, self.timeout = urls, order, timeout
        # Everything from here on is needed, plus what sits in the order's buffer at this moment.
        self.frontier = order.pushed
        self.resume_positions: dict[int, set[int]] = defaultdict(set)
        for segment, pos in order.buffer:
            self.resume_positions[segment].add(pos)
        self.pending: dict[Ref, Sample] = {}
        self.segment, self.pos = 0, 0  # next sample to read
        self.samples = None  # iterator over the open segment
        self.last_needed = -1
        self.damage: list[tuple[str, str]] = []  # (shard name, what happened) for each read that ended early

    @property
    def damaged_shards(self) -> int:
        return len(self.damage)

    def _needed(self, segment: int, pos: int) -> bool:
        return self.order.segments[segment][1] + pos >= self.frontier or pos in self.resume_positions.get(segment, ())

    def _last_needed(self, segment: int) -> int:
        shard_id, start = self.order.segments[segment]
        count = self.order.counts[shard_id]
        if start + count > self.frontier:
            return count - 1
        return max(self.resume_positions.get(segment, ()), default=-1)

    def _next_segment(self) -> None:
        if self.samples is not None:
            self.samples.close()
        self.samples, self.segment, self.pos = None, self.segment + 1, 0

    def _advance(self) -> None:
        """Read one sample (or skip / finish one segment)."""
        if self.samples is None:
            self.last_needed = self._last_needed(self.segment)
            if self.last_needed < 0:  # nothing of this segment is needed any more: do not even open it
                self._next_segment()
                return
            shard_id = self.order.segments[self.segment][0]
            self.samples = iter_samples(self.urls[shard_id], stop_after=self.last_needed + 1, timeout=self.timeout)
        try:
            sample = next(self.samples)
        except (StopIteration, ShardReadError) as end:  # the shard held fewer samples than its manifest says
            shard_id = self.order.segments[self.segment][0]
            why = end.cause if isinstance(end, ShardReadError) else \
                f"ended after {self.pos} of {self.order.counts[shard_id]} samples"
            self.damage.append((shard_name(self.urls[shard_id]), why))
            self._next_segment()
            return
        if self._needed(self.segment, self.pos):
            self.pending[(self.segment, self.pos)] = sample
        self.pos += 1
        if self.pos > self.last_needed:
            self._next_segment()

    def fetch(self, ref: Ref) -> Sample | None:
        while ref not in self.pending:
            if (self.segment, self.pos) > ref:  # already passed: it was lost with a damaged shard
                return None
            self._advance()
        return self.pending.pop(ref)

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
