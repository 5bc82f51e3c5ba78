"""Shards served over HTTP by a real `http.server` on 127.0.0.1 (started and stopped by each test), with every GET
counted per file: manifests found through the shards' own URLs, counting without one, unanswered and silent
URLs, worker shutdown, `lasers-shard index` over HTTP, and a real 2-rank training's download counts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from lasers_dist.cli.shard import main as shard_main
from lasers_dist.data import CountWarning, ShardStream
from shard_fixtures import ShardServer, make_shards
from train_support import DRIVER, run, tiny_config, torchrun_command, write_config

TRAIN_SHARDS, PER_SHARD, VAL_SHARDS = 64, 32, 4


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """root/with: 64 train shards of 32 samples + 4 val shards, with their manifests; root/without: the same
    tar files without manifests (as another WebDataset tool would leave them)."""
    root = tmp_path_factory.mktemp("served")
    make_shards(root / "with", TRAIN_SHARDS, PER_SHARD, size=32, smooth=True)
    make_shards(root / "with", VAL_SHARDS, 8, size=32, smooth=True, split="val")
    shutil.copytree(root / "with", root / "without", ignore=shutil.ignore_patterns("*.json"))
    return root


def closed_port_url(name: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"  # nothing listens there any more: connection refused


def test_stream_over_http_reads_the_manifest_and_no_shard_to_count(served):
    local = ShardStream(str(served / "with" / "train-*.tar"), batch_size=8, image_size=32, mode="split",
                        train=False)
    with ShardServer(served) as server:
        remote = ShardStream(server.url("with/train-{000000..000063}.tar"), batch_size=8, image_size=32,
                             mode="split", train=False)
        assert dict(server.gets) == {"with/train.json": 1}  # constructed: one manifest read, no shard touched
        for a, b in zip(local, remote):
            assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
        assert sum(server.shard_gets("with/").values()) == TRAIN_SHARDS  # one epoch in order: each shard once


def test_without_manifest_each_shard_is_read_once_to_count(served):
    with ShardServer(served) as server:
        with pytest.warns(CountWarning, match=r"no manifest lists 64 of 64 shards.*lasers-shard index"):
            stream = ShardStream(server.url("without/train-{000000..000063}.tar"), batch_size=8, image_size=32)
        assert stream.spec.counts == (PER_SHARD,) * TRAIN_SHARDS
        assert set(server.shard_gets("without/").values()) == {1}
        assert server.gets["without/train.json"] == 1  # looked for once, answered 404


def test_a_url_that_does_not_answer_is_a_clear_error(tmp_path):
    url = closed_port_url("train-{000000..000003}.tar")
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"127\.0\.0\.1:\d+/train\.json.*Connection refused.*is the server up"):
        ShardStream(url, batch_size=4, image_size=16, io_timeout_s=2)
    assert time.perf_counter() - start < 30  # a few quick retries, not WebDataset's 30 x 30 s

    from lasers_dist.config import load_config
    from lasers_dist.train.distributed import DistEnv
    from lasers_dist.train.trainer import shard_lists

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tmp_path / "run")),
                      [f"data.train_shards={url}", "data.val_shards=", "data.io_timeout_s=2"])
    with pytest.raises(OSError, match="Connection refused"):
        shard_lists(cfg, DistEnv())  # what every rank of lasers-train raises (rank 0 looks, all hear)


def test_a_silent_shard_mid_run_is_counted_as_lost_and_the_stream_goes_on(served):
    silent = "with/train-000001.tar"
    with ShardServer(served, stall=(silent,)) as server:
        urls = [server.url(f"with/train-{i:06d}.tar") for i in range(4)]
        stream = ShardStream(urls, batch_size=8, image_size=32, mode="split", train=False, io_timeout_s=0.5)
        with pytest.warns(UserWarning, match=r"shard train-000001\.tar: .*no answer within the timeout"):
            keys = [k for batch in stream for k in batch["keys"]]
        assert len(keys) == len(stream) * 8  # every batch full: the worker took samples from a second pass
        assert stream.corrupt_count == PER_SHARD and not set(keys) & {f"{i:08d}" for i in range(32, 64)}
        assert list(stream.stats()["damaged_shards"]) == ["train-000001.tar"]
        assert server.gets[silent] >= 3  # tried again before giving up


def test_close_ends_workers_blocked_on_a_silent_server(served):
    names = tuple(f"with/train-{i:06d}.tar" for i in range(TRAIN_SHARDS))
    with ShardServer(served, stall=names) as server:
        stream = ShardStream(server.url("with/train.json"), batch_size=8, image_size=32, num_workers=2,
                             io_timeout_s=120, multiprocessing_context="fork")
        stream._live = stream._start()  # start the workers; each blocks on its first shard for 2 minutes
        workers = list(stream._live._workers)
        deadline = time.monotonic() + 60
        while sum(server.gets[n] for n in names) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until both workers are inside a read (the server saw their requests)
        start = time.perf_counter()
        stream.close()
        assert time.perf_counter() - start < 10
        assert not any(w.is_alive() for w in workers)


def test_index_over_http_records_missing_shards_and_matches_local_hashes(served, tmp_path, capsys):
    out = tmp_path / "train.json"
    with ShardServer(served) as server:
        pattern = server.url("without/train-{000000..000004}.tar")
        os.rename(served / "without" / "train-000004.tar", tmp_path / "moved.tar")
        try:
            assert shard_main(["index", pattern, "--out", str(out), "--sha256", "--no-progress"]) == 0
        finally:
            os.rename(tmp_path / "moved.tar", served / "without" / "train-000004.tar")
    manifest = json.loads(out.read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [PER_SHARD] * 4 + [0]
    assert manifest["shards"][0]["sha256"] == hashlib.sha256(
        (served / "without" / "train-000000.tar").read_bytes()).hexdigest()
    assert [d["name"] for d in manifest["damaged"]] == ["train-000004.tar"]
    assert "HTTP 404" in manifest["damaged"][0]["reason"]
    assert f"data.train_manifest={out}" not in capsys.readouterr().out  # --out given: no copy hint needed


@pytest.mark.slow
def test_two_rank_training_over_http_downloads(served, tmp_path):
    """2 ranks, 3 steps, a validation after each: with manifests nothing is read to count (fewer shard downloads
    than shards); without, the only extra downloads are one per shard, by rank 0, for counting."""
    config = write_config(tmp_path / "base.yaml", tiny_config(served, tmp_path / "unused", train={
        "max_steps": 3, "val_every": 1, "log_every": 1}))
    with ShardServer(served) as server:
        runs = [{"name": where, "overrides": [
            f"data.train_shards={server.url(where + '/train-{000000..000063}.tar')}",
            f"data.val_shards={server.url(where + '/val-{000000..000003}.tar')}"]} for where in ("with", "without")]
        start = time.perf_counter()
        run(torchrun_command(2, str(DRIVER), "--config", str(config), "--out", str(tmp_path / "runs"),
                             "--runs", json.dumps(runs)), timeout=420)
        seconds = time.perf_counter() - start
        gets = {where: server.shard_gets(where + "/") for where in ("with", "without")}
        manifest_gets = {name: n for name, n in server.gets.items() if name.endswith(".json")}
    for where in ("with", "without"):
        status = json.loads((tmp_path / "runs" / where / "status.json").read_text())
        assert status["state"] == "finished" and status["step"] == 3
    train = {w: {n: c for n, c in g.items() if "/train-" in n} for w, g in gets.items()}
    val = {w: {n: c for n, c in g.items() if "/val-" in n} for w, g in gets.items()}
    assert manifest_gets == {"with/train.json": 1, "with/val.json": 1, "without/train.json": 1,
                             "without/val.json": 1}  # rank 0 only, once per job
    assert sum(train["with"].values()) < TRAIN_SHARDS
    # Same seed, same counts: the training reads the same shards in both runs, so the difference is the counting.
    for split, shards in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        found = {"train": train, "val": val}[split]
        extra = {f"{split}-{i:06d}.tar": found["without"].get(f"without/{split}-{i:06d}.tar", 0)
                 - found["with"].get(f"with/{split}-{i:06d}.tar", 0) for i in range(shards)}
        assert set(extra.values()) == {1}, (split, extra)
    report = {"shards": TRAIN_SHARDS, "downloads_with_manifest": sum(gets["with"].values()),
              "downloads_without_manifest": sum(gets["without"].values()), "seconds_both_runs": round(seconds, 1)}
    (tmp_path / "downloads.json").write_text(json.dumps(report))
    print(f"HTTP download counts (2 ranks, 3 steps, a validation after each): {report}")
