"""ShardStream across a real 2-process torch.distributed (gloo) group, each rank with 2 DataLoader workers."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lasers_dist.data import ShardStream
from shard_fixtures import make_shards, truncate

WORLD = 2


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _split_epoch(urls: list[str]) -> dict:
    """One split-mode epoch; a collective after every batch would hang (time out) if a rank ran dry."""
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = ShardStream(urls, batch_size=4, image_size=16, mode="split", rank=rank, world_size=world,
                         num_workers=2, seed=7, multiprocessing_context="fork")
    keys, steps = [], torch.zeros(1)
    for batch in stream:
        keys += batch["keys"]
        done = torch.ones(1)
        dist.all_reduce(done)
        steps += done
    return {"batches": len(stream), "keys": keys, "steps": int(steps.item()), "corrupt": stream.corrupt_count}


def _resume(urls: list[str], mode: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    # fork: a rank started by spawn would otherwise spawn its DataLoader workers too (seconds each here)
    kw = dict(batch_size=4, image_size=16, mode=mode, rank=rank, world_size=world, num_workers=2, seed=3,
              shuffle_buffer=16, batches_per_epoch=25 if mode == "resampled" else None, multiprocessing_context="fork")
    reference = _take(ShardStream(urls, **kw).forever(), 60)
    first = ShardStream(urls, **kw)
    _take(first.forever(), 30)
    states = [None] * world
    dist.all_gather_object(states, json.loads(json.dumps(first.state_dict())))  # as a checkpoint would keep them
    del first
    resumed = ShardStream(urls, **kw)
    resumed.load_state_dict(states)
    after = _take(resumed.forever(), 30)
    equal = all(a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) for a, b in zip(reference[30:], after))
    return {"equal": equal, "keys": [k for b in reference for k in b["keys"]], "epoch": resumed.epoch}


def _worker(rank: int, init_file: str, shard_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        clean = sorted(str(p) for p in Path(shard_dir, "clean").glob("train-*.tar"))
        damaged = sorted(str(p) for p in Path(shard_dir, "damaged").glob("train-*.tar"))
        result = {"split": _split_epoch(damaged), "resampled": _resume(clean, "resampled"),
                  "split_resume": _resume(clean, "split")}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_disjointly_survive_damage_and_resume_exactly(tmp_path):
    make_shards(tmp_path / "clean", n_shards=8, per_shard=12, size=16)
    damaged = make_shards(tmp_path / "damaged", n_shards=8, per_shard=12, size=16)
    truncate(damaged[5], 0.3)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))

    # split: same batch count on both ranks, every batch of the epoch met by both, disjoint samples
    assert r0["split"]["batches"] == r1["split"]["batches"] == 12
    assert r0["split"]["steps"] == r1["split"]["steps"] == 2 * 12
    assert len(r0["split"]["keys"]) == len(r1["split"]["keys"]) == 12 * 4
    assert not set(r0["split"]["keys"]) & set(r1["split"]["keys"])
    assert r0["split"]["corrupt"] + r1["split"]["corrupt"] > 0  # the truncated shard was met and counted

    # resume: 30 batches, save, rebuild, the next 30 equal the uninterrupted stream's, on both ranks
    for mode in ("resampled", "split_resume"):
        assert r0[mode]["equal"] and r1[mode]["equal"]
        assert r0[mode]["keys"] != r1[mode]["keys"]  # the ranks read different streams
    assert r0["resampled"]["epoch"] == 2  # 60 batches at 25 per epoch: the comparison crossed epochs
    # split: over each 12-batch epoch the two ranks together read all 96 samples once
    epoch0 = r0["split_resume"]["keys"][:48] + r1["split_resume"]["keys"][:48]
    assert sorted(epoch0) == [f"{i:08d}" for i in range(96)]
