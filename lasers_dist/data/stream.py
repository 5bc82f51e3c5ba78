"""ShardStream: batches from WebDataset tar shards for one rank, exactly resumable.

How the determinism works (details in `order.py` and `reader.py`):
- The stream has W = max(1, num_workers) logical workers. Within an epoch, batch i of this rank comes from
  logical worker i % W; torch's DataLoader (in order, its default) hands out batches round-robin, and every worker
  is given exactly its share of the epoch's batches, so the interleaving is fixed.
- Each (rank, worker, epoch) consumes samples in an order computed from seeded generators and the manifest's
  per-shard counts alone. Each batch carries its worker's cursor (how many references of that order it has
  used, lost samples included), so the main process knows every worker's exact position.
- The state is (epoch, batches yielded, one cursor per worker). Restoring rebuilds each worker's order,
  skips to its cursor (integer work, no decoding), and reads only the shards that still hold needed samples.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import crop, decode_sample, to_batch
from .degrade import DEGRADATIONS, degrade
from .index import lookup_counts
from .order import SampleOrder
from .reader import SampleFetcher
from .remote import DEFAULT_TIMEOUT_S, shard_name
from .shards import expand_urls
from .workers import stop_workers, survive_stop_signals, track, untrack

STATE_VERSION = 1


@dataclass(frozen=True)
class _Spec:
    """Everything a worker process needs; plain data so it pickles under any start method."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    mode: str
    batch_size: int
    image_size: int
    train: bool
    shuffle: bool
    shuffle_buffer: int
    resize: bool
    seed: int
    rank: int
    world_size: int
    workers: int
    degradation: str | None
    sr_factor: int
    mask_fraction: float
    timeout: float

    def shard_ids(self, worker: int, epoch: int) -> list[int]:
        """Shards this rank's `worker` reads in `epoch` (split: a disjoint share; resampled: all of them)."""
        n = len(self.urls)
        if self.mode == "resampled":
            return list(range(n))
        order = np.random.default_rng([self.seed, epoch, 3]).permutation(n) if self.shuffle else np.arange(n)
        slots = self.world_size * self.workers
        return [int(i) for i in order[worker * self.world_size + self.rank::slots]]


def _worker_batches(spec: _Spec, epoch: int, worker: int, cursor: int, num_batches: int) -> Iterator[dict]:
    """`num_batches` batches of logical `worker` in `epoch`, starting at `cursor` in its sample order."""
    if num_batches <= 0:
        return
    order = SampleOrder(list(spec.counts), spec.shard_ids(worker, epoch), mode=spec.mode, seed=spec.seed,
                        rank=spec.rank, worker=worker, epoch=epoch, shuffle=spec.shuffle,
                        buffer_size=spec.shuffle_buffer)
    order.skip(cursor)
    fetcher = SampleFetcher(list(spec.urls), order, spec.timeout)
    # A run of lost samples longer than this means the worker's shards are unreadable, not just damaged.
    max_lost_run = 4 * max(spec.counts) + 10 * spec.batch_size
    draft = spec.image_size if spec.resize else None
    try:
        for _ in range(num_batches):
            rng = np.random.default_rng([spec.seed, spec.rank, worker, epoch, order.emitted, 2])
            crops, labels, keys, lost_run, lost = [], [], [], 0, 0
            damage_seen = len(fetcher.damage)
            while len(crops) < spec.batch_size:
                sample = fetcher.fetch(next(order))
                decoded = decode_sample(sample[1], draft) if sample is not None else None
                if decoded is None:
                    lost, lost_run = lost + 1, lost_run + 1
                    if lost_run > max_lost_run:
                        raise RuntimeError(_unreadable_message(spec, worker, epoch, lost_run, fetcher.damage))
                    continue
                lost_run = 0
                crops.append(crop(decoded[0], spec.image_size, train=spec.train, resize=spec.resize, rng=rng))
                labels.append(decoded[1])
                keys.append(sample[0])
            images = to_batch(crops)
            batch = {"images": images, "labels": torch.tensor(labels, dtype=torch.int64), "keys": keys}
            if spec.degradation is not None:
                batch.update(degrade(images, spec.degradation, sr_factor=spec.sr_factor,
                                     mask_fraction=spec.mask_fraction))
            batch.update(_epoch=epoch, _worker=worker, _cursor=order.emitted, _lost=lost,
                         _damage=fetcher.damage[damage_seen:])
            yield batch
    finally:
        fetcher.close()


def _unreadable_message(spec: _Spec, worker: int, epoch: int, lost_run: int, damage: list[tuple[str, str]]) -> str:
    names = sorted({shard_name(spec.urls[i]) for i in spec.shard_ids(worker, epoch)})
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    reasons = "; ".join(f"{name}: {why}" for name, why in dict(damage[-3:]).items())
    return (f"rank {spec.rank} DataLoader worker {worker}: {lost_run} samples in a row could not be read from its "
            f"shards ({shown}){'; last errors: ' + reasons if reasons else ''}. Check that the shards exist and "
            f"are readable (lasers-shard index PATTERN lists damaged ones), then rewrite or remove them")


class _StreamDataset(IterableDataset):
    """The endless batch sequence of one rank from a given position, as the DataLoader's workers produce it.

    DataLoader task k (k = 0, 1, ...) goes to worker k % W and is the rank's batch number start + k, counted
    from the start of `epoch`. Within one epoch that batch (epoch e, index i) must come from logical worker
    i % W, so worker j plays logical worker (j + start - (e - epoch) * N) % W during epoch e: the same
    processes serve every epoch.
    """

    def __init__(self, spec: _Spec, epoch: int, start: int, cursors: list[int], batches_per_epoch: int):
        self.spec, self.epoch, self.start, self.cursors, self.n = spec, epoch, start, cursors, batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        j, W = (info.id if info is not None else 0), self.spec.workers
        for epoch in itertools.count(self.epoch):
            first = self.start if epoch == self.epoch else 0
            worker = (j + self.start - (epoch - self.epoch) * self.n) % W
            count = len(range(worker, self.n, W)) - len(range(worker, first, W))
            cursor = self.cursors[worker] if epoch == self.epoch else 0
            yield from _worker_batches(self.spec, epoch, worker, cursor, count)


class ShardStream:
    """Batches of images from WebDataset shards for one rank (an epoch at a time, exactly resumable).

    Args:
        urls: shard URLs: a brace pattern (`train-{000000..000127}.tar`), a glob (`data/photos/train-*.tar`),
            a manifest (`data/photos/train.json`, or its URL), or a list of these; local paths, `http(s)://`,
            `pipe:` commands and the other schemes WebDataset opens.
        batch_size: samples per batch (per rank).
        image_size: side of the square crops.
        mode: "resampled" (each (rank, worker) draws shards with replacement, seeded by (seed, rank, worker,
            epoch); an epoch is `batches_per_epoch` batches, default: the dataset's samples / (batch x world))
            or "split" (each epoch, every shard goes to exactly one (rank, worker); needs
            shards >= world_size x max(1, num_workers); `batches_per_epoch` defaults to the largest count
            every rank can fill whatever the assignment, and may be set lower).
        train: random crop + horizontal flip and shuffling (True) or center crop, no flip, shards and samples
            in order (False; `shuffle` overrides the ordering part).
        seed, rank, world_size: passed by the caller (the library reads no environment variables). Use the
            same seed on every rank; streams differ by rank.
        num_workers: DataLoader worker processes (0: in the main process). Part of the stream's identity:
            resume with the same value.
        degradation: None, "super_resolution" (bicubic down by `sr_factor`, then up) or "inpainting" (centered
            square of `mask_fraction` of each side set to 0): batches then also hold `inputs` (and `mask`).
        shuffle_buffer: samples (as compressed bytes) held per worker for shuffling across shard boundaries.
        resize: resize the shorter side to image_size before cropping (True) or crop at native scale (False;
            images smaller than image_size are always resized up).
        pin_memory: pin batches when CUDA is available.
        multiprocessing_context: start method of the DataLoader workers ("fork", "spawn", "forkserver";
            None: torch's default, which inside a process started by spawn is spawn).
        counts: samples per shard, in the order of the expanded URLs (e.g. looked up once by rank 0 and
            broadcast). None: from `manifest`, else the `{split}.json` manifest beside the shards, else by reading
            the shards once here (with a warning; see `index.lookup_counts`).
        manifest: a manifest path or URL to take the counts from (used only when `counts` is None).
        io_timeout_s: seconds a remote open or read may wait for data before it counts as failed.

    Workers: one DataLoader serves all epochs. It starts at the first batch requested and is restarted only
    by `load_state_dict`, `set_epoch` or `close()` (the workers then re-derive their positions). `close()` ends
    the worker processes within about 2 s, whatever they are doing; streams still open at interpreter exit are
    closed then (so an exception that skips `close()` cannot leave the process waiting for its workers).

    Iteration: `for batch in stream` yields the REST of the current epoch (`len(stream)` batches for a fresh
    epoch) and then moves to the next epoch, so successive loops walk through epochs 0, 1, 2, ...;
    `stream.forever()` chains epochs endlessly. Every rank yields exactly `len(stream)` batches per epoch.
    A batch is a dict:
        images (B, 3, image_size, image_size) float32 in [-1, 1] (the target when a degradation is set)
        labels (B,) int64, -1 where the shard has no `.cls`
        keys   list of B sample keys
        inputs (B, 3, H, W) degraded images, and mask (B, 1, H, W) bool for inpainting (only with a degradation)

    Position: `epoch`, `batches_yielded` (within the epoch) count batches handed to the caller. `state_dict()`
    taken after the caller has consumed t batches restores, via `load_state_dict`, a stream that yields batch
    t next, identical to the uninterrupted stream. The state is per rank (worker cursors differ): save each
    rank's dict, e.g. all-gathered into a list; `load_state_dict` accepts that list and picks its rank.
    `set_epoch(e)` restarts at the first batch of epoch e.

    Damage: samples whose image cannot be decoded, and samples missing because a shard is truncated,
    unreadable or gone, are skipped and counted (`corrupt_count`, `stats()`, one warning per damaged shard);
    the worker draws further samples (the next shards, or another pass over its own) so the batch count never
    changes. A worker that cannot read a single sample for a long run raises, naming its shards.
    """

    def __init__(self, urls: str | os.PathLike | list, *, batch_size: int, image_size: int,
                 mode: str = "resampled", train: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, batches_per_epoch: int | None = None, degradation: str | None = None,
                 sr_factor: int = 4, mask_fraction: float = 0.25, shuffle: bool | None = None,
                 shuffle_buffer: int = 512, resize: bool = True, pin_memory: bool = True, prefetch_factor: int = 2,
                 multiprocessing_context: str | None = None, counts: list[int] | None = None,
                 manifest: str | None = None, io_timeout_s: float = DEFAULT_TIMEOUT_S):
        _check_args(batch_size, image_size, mode, rank, world_size, num_workers, degradation, sr_factor,
                    mask_fraction)
        shard_urls = expand_urls(urls, io_timeout_s)
        if counts is None:
            counts = lookup_counts(shard_urls, manifest, timeout=io_timeout_s,
                                   pattern=urls if isinstance(urls, str) else None).counts
        if len(counts) != len(shard_urls) or any(int(c) < 0 for c in counts):
            raise ValueError(f"counts must give a sample count >= 0 for each of the {len(shard_urls)} shards, "
                             f"got {len(counts)} values")
        workers = max(1, num_workers)
        self.spec = _Spec(tuple(shard_urls), tuple(int(c) for c in counts), mode, batch_size, image_size, train,
                          train if shuffle is None else shuffle, shuffle_buffer, resize, seed, rank, world_size,
                          workers, degradation, sr_factor, mask_fraction, io_timeout_s)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.batches_per_epoch = _batches_per_epoch(self.spec, batches_per_epoch)
        self._identity = hashlib.sha256(
            repr([(shard_name(u), int(c)) for u, c in zip(shard_urls, counts)]).encode()).hexdigest()[:16]
        self.epoch, self.batches_yielded = 0, 0
        self._cursors = [0] * workers
        self._lost, self._damaged = 0, 0
        self._damaged_shards: dict[str, str] = {}  # shard name -> what went wrong (the first 100 met)
        self._live: Iterator[dict] | None = None  # the running DataLoader iterator, positioned at our state

    # ---- iteration --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self._next_batch()

    def forever(self) -> Iterator[dict]:
        """All batches of all epochs from the current position on."""
        while True:
            yield self._next_batch()

    def _start(self) -> Iterator[dict]:
        dataset = _StreamDataset(self.spec, self.epoch, self.batches_yielded, list(self._cursors),
                                 self.batches_per_epoch)
        workers = self.num_workers > 0
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if workers else None,
                            multiprocessing_context=self.multiprocessing_context if workers else None,
                            worker_init_fn=survive_stop_signals if workers else None)
        live = iter(loader)
        track(self)
        return live

    def _next_batch(self) -> dict:
        if self._live is None:
            self._live = self._start()
        batch = next(self._live)
        W, where = self.spec.workers, (self.epoch, self.batches_yielded % self.spec.workers)
        if (batch.pop("_epoch"), batch.pop("_worker")) != where:
            raise RuntimeError(f"batch {self.batches_yielded} of epoch {self.epoch} did not come from logical "
                               f"worker {where[1]}: the DataLoader did not hand out batches round-robin")
        self._cursors[where[1]] = batch.pop("_cursor")
        self._lost += batch.pop("_lost")
        self._note_damage(batch.pop("_damage"))
        self.batches_yielded += 1
        if self.batches_yielded == self.batches_per_epoch:
            self.epoch, self.batches_yielded, self._cursors = self.epoch + 1, 0, [0] * W
        return batch

    def _note_damage(self, damage: list[tuple[str, str]]) -> None:
        self._damaged += len(damage)
        for name, why in damage:
            if name not in self._damaged_shards and len(self._damaged_shards) < 100:
                self._damaged_shards[name] = why
                warnings.warn(f"rank {self.spec.rank}: shard {name}: {why}; its missing samples are skipped and "
                              f"counted in corrupt_samples", stacklevel=3)

    def close(self, grace_s: float = 2.0) -> None:
        """Stop the DataLoader workers now: asked to finish, then killed after `grace_s` seconds. The position is
        kept: the next batch restarts them where the stream stands."""
        live, self._live = self._live, None
        untrack(self)
        if live is not None:
            stop_workers(live, grace_s)

    def set_epoch(self, epoch: int) -> None:
        """Position the stream at the first batch of `epoch`."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.close()
        self.epoch, self.batches_yielded, self._cursors = epoch, 0, [0] * self.spec.workers

    # ---- logging ----------------------------------------------------------------------------------------

    @property
    def corrupt_count(self) -> int:
        """Samples skipped so far (undecodable, or lost in a truncated / unreadable shard)."""
        return self._lost

    def stats(self) -> dict:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "corrupt_samples": self._lost,
                "damaged_shard_reads": self._damaged, "damaged_shards": dict(self._damaged_shards)}

    # ---- checkpointing ----------------------------------------------------------------------------------

    def _identity_fields(self) -> dict:
        s = self.spec
        return {"mode": s.mode, "seed": s.seed, "rank": s.rank, "world_size": s.world_size, "workers": s.workers,
                "batch_size": s.batch_size, "batches_per_epoch": self.batches_per_epoch, "shards": self._identity}

    def state_dict(self) -> dict:
        """This rank's position: plain ints and strings (JSON-serialisable)."""
        return {"version": STATE_VERSION, **self._identity_fields(), "epoch": self.epoch,
                "batches_yielded": self.batches_yielded, "cursors": list(self._cursors),
                "corrupt_samples": self._lost, "damaged_shard_reads": self._damaged}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Restore a position saved by `state_dict` (this rank's dict, or the list of every rank's dicts)."""
        if isinstance(state, (list, tuple)):
            mine = [s for s in state if s.get("rank") == self.spec.rank]
            if len(mine) != 1:
                raise ValueError(f"the saved stream states hold {len(mine)} entries for rank {self.spec.rank}")
            state = mine[0]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
        expected = self._identity_fields()
        diff = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume this stream exactly ({detail}); restore with the same shards, seed, "
                             f"world size, num_workers and batch size, or call set_epoch() to start a fresh epoch")
        self.close()
        self.epoch, self.batches_yielded = int(state["epoch"]), int(state["batches_yielded"])
        self._cursors = [int(c) for c in state["cursors"]]
        self._lost, self._damaged = int(state["corrupt_samples"]), int(state["damaged_shard_reads"])


def _check_args(batch_size: int, image_size: int, mode: str, rank: int, world_size: int, num_workers: int,
                degradation: str | None, sr_factor: int, mask_fraction: float) -> None:
    if mode not in ("resampled", "split"):
        raise ValueError(f"mode must be 'resampled' or 'split', got {mode!r}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if degradation is not None and degradation not in DEGRADATIONS:
        raise ValueError(f"degradation must be None or one of {DEGRADATIONS}, got {degradation!r}")
    if degradation == "super_resolution" and image_size % sr_factor:
        raise ValueError(f"image_size {image_size} must be divisible by sr_factor {sr_factor}")
    if degradation == "inpainting" and not 0 < mask_fraction < 1:
        raise ValueError(f"mask_fraction must be in (0, 1), got {mask_fraction}")


def _batches_per_epoch(spec: _Spec, requested: int | None) -> int:
    n, slots, total = len(spec.urls), spec.world_size * spec.workers, sum(spec.counts)
    if total == 0:
        raise ValueError(f"the {n} shards hold no samples (first: {spec.urls[0]})")
    if spec.mode == "resampled":
        if requested is not None and requested < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {requested}")
        return requested or max(1, total // (spec.batch_size * spec.world_size))
    if n < slots:
        raise ValueError(f"split mode needs at least world_size x workers = {spec.world_size} x {spec.workers} = "
                         f"{slots} shards, but only {n} were given (first: {spec.urls[0]}): write smaller shards "
                         f"(lasers-shard --max-count), use fewer DataLoader workers, or mode='resampled'")
    # Whatever the epoch's assignment, every (rank, worker) gets at least n // slots shards: the smallest
    # such sum bounds the batches every worker can produce.
    per_worker = sum(sorted(spec.counts)[: n // slots]) // spec.batch_size
    if per_worker == 0:
        raise ValueError(f"split mode: a worker may get only {sum(sorted(spec.counts)[: n // slots])} samples, "
                         f"less than one batch of {spec.batch_size}; lower the batch size or the worker count")
    limit = per_worker * spec.workers
    if requested is not None and not 1 <= requested <= limit:
        raise ValueError(f"split mode: batches_per_epoch must be in [1, {limit}] for these shards, got {requested}")
    return requested or limit
