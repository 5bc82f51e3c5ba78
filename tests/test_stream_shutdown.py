"""ShardStream.close() ends its DataLoader worker processes for sure (they ignore SIGTERM by design), keeps the
stream's position, and a process that dies of an exception without calling close() still exits promptly."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import torch

from lasers_dist.data import ShardStream
from shard_fixtures import make_shards
from train_support import REPO, child_env


def test_close_ends_the_workers_and_the_stream_goes_on_where_it_stood(tmp_path):
    paths = make_shards(tmp_path, 4, 8, size=16)
    kw = dict(batch_size=4, image_size=16, mode="resampled", num_workers=2, batches_per_epoch=6, seed=1,
              shuffle_buffer=8, multiprocessing_context="fork")
    reference = ShardStream(paths, **kw)
    expected = [next(reference.forever()) for _ in range(9)]
    reference.close()
    stream = ShardStream(paths, **kw)
    batches = stream.forever()
    got = [next(batches) for _ in range(4)]
    workers = list(stream._live._workers)
    assert all(w.is_alive() for w in workers)
    start = time.perf_counter()
    stream.close()
    assert time.perf_counter() - start < 10 and not any(w.is_alive() for w in workers)
    assert all(w.exitcode is not None for w in workers)  # joined: no zombie left behind
    got += [next(batches) for _ in range(5)]  # new workers, from the saved cursors
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(got, expected))
    stream.close()
    stream.close()  # idempotent


def test_an_exception_that_skips_close_still_exits_promptly(tmp_path):
    """Before: the interpreter's exit joined the workers forever (they ignore the SIGTERM it sends them)."""
    make_shards(tmp_path, 4, 8, size=16)
    script = textwrap.dedent(f"""
        from lasers_dist.data import ShardStream
        stream = ShardStream({str(tmp_path / "train-*.tar")!r}, batch_size=4, image_size=16, num_workers=2,
                             batches_per_epoch=50, shuffle_buffer=8)
        batches = stream.forever()
        next(batches)
        raise RuntimeError("boom in the training loop")
    """)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "boom in the training loop" in proc.stderr
    assert time.perf_counter() - start < 60
