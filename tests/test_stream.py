"""ShardStream on real tar shards and real multi-worker DataLoaders (one process; ranks are arguments here,
the 2-process gloo tests are in test_stream_distributed.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lasers_dist.data import ShardStream, center_mask, inpainting_input, super_resolution_input
from lasers_dist.data.order import SampleOrder
from shard_fixtures import corrupt_sample, make_shards, pattern, truncate


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["images"], y["images"])
        assert torch.equal(x["labels"], y["labels"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("shards"), n_shards=8, per_shard=12, size=20)


def test_batches_are_decoded_images_in_range(shards):
    stream = ShardStream(shards, batch_size=6, image_size=16, mode="resampled", batches_per_epoch=5, seed=3)
    batches = list(stream)
    assert len(batches) == len(stream) == 5
    for batch in batches:
        assert batch["images"].shape == (6, 3, 16, 16) and batch["images"].dtype == torch.float32
        assert batch["images"].min() >= -1 and batch["images"].max() <= 1
        # labels come from the .cls members: index % 10, and the key is the zero-padded index
        assert batch["labels"].tolist() == [int(k) % 10 for k in batch["keys"]]
    assert stream.epoch == 1 and stream.batches_yielded == 0


def test_validation_is_an_exact_center_crop_in_shard_order(shards):
    stream = ShardStream(shards, batch_size=12, image_size=16, mode="split", train=False, resize=False)
    first = next(iter(stream))
    assert first["keys"] == [f"{i:08d}" for i in range(12)]  # shard 0, in order
    for key, image in zip(first["keys"], first["images"]):
        expected = torch.from_numpy(pattern(int(key), 20)[2:18, 2:18]).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(image, expected)


def test_training_crops_and_flips_vary_and_stay_inside_the_picture(shards):
    stream = ShardStream(shards[:1], batch_size=12, image_size=16, mode="split", train=True, resize=False,
                         shuffle=False, seed=0)
    batch = next(iter(stream))
    positions = set()
    for key, image in zip(batch["keys"], batch["images"]):
        full = torch.from_numpy(pattern(int(key), 20)).permute(2, 0, 1).float() / 127.5 - 1
        found = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)
                 if torch.equal(full[:, top:top + 16, left:left + 16].flip(-1) if flip
                                else full[:, top:top + 16, left:left + 16], image)]
        assert len(found) == 1
        positions.add(found[0])
    assert len(positions) > 6  # not the same crop every time


def test_split_mode_reads_every_sample_once_per_epoch_across_workers(shards):
    stream = ShardStream(shards, batch_size=4, image_size=16, mode="split", num_workers=2, seed=5)
    assert len(stream) == 8 * 12 // 4  # equal shards, divisible: nothing is dropped
    epoch0 = [k for b in stream for k in b["keys"]]
    epoch1 = [k for b in stream for k in b["keys"]]
    assert sorted(epoch0) == sorted(epoch1) == [f"{i:08d}" for i in range(96)]
    assert epoch0 != epoch1  # reshuffled between epochs


def test_split_mode_refuses_fewer_shards_than_ranks_times_workers(shards):
    with pytest.raises(ValueError, match=r"at least world_size x workers = 4 x 3 = 12 shards"):
        ShardStream(shards, batch_size=4, image_size=16, mode="split", world_size=4, rank=1, num_workers=3)


def test_ranks_in_split_mode_get_disjoint_shards_and_equal_batch_counts(shards):
    streams = [ShardStream(shards, batch_size=4, image_size=16, mode="split", rank=r, world_size=2, num_workers=2,
                           seed=9) for r in range(2)]
    keys = [[k for b in s for k in b["keys"]] for s in streams]
    assert len(streams[0]) == len(streams[1])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:08d}" for i in range(96)]


@pytest.mark.parametrize("mode", ["resampled", "split"])
def test_resume_mid_epoch_and_across_epochs_is_exact(shards, mode):
    kw = dict(batch_size=5, image_size=16, mode=mode, num_workers=2, seed=11, shuffle_buffer=20)
    if mode == "resampled":
        kw["batches_per_epoch"] = 7
    reference = take(ShardStream(shards, **kw).forever(), 24)
    for t in (3, 9):  # mid-epoch (odd: the other worker is next), and in the second epoch
        first = ShardStream(shards, **kw)
        take(first.forever(), t)
        state = first.state_dict()
        resumed = ShardStream(shards, **kw)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed.forever(), 24 - t), reference[t:])


def test_damaged_data_is_skipped_counted_and_resume_stays_exact(tmp_path):
    paths = make_shards(tmp_path, n_shards=4, per_shard=10, size=16)
    bad_key = corrupt_sample(paths[1], 3)
    truncate(paths[2], 0.45)  # about half of its samples are lost
    kw = dict(batch_size=4, image_size=16, mode="split", num_workers=2, seed=2, shuffle_buffer=8)
    stream = ShardStream(paths, **kw)
    epoch = list(stream)
    assert len(epoch) == len(stream) == 10  # still the full count: workers took more samples to fill batches
    seen = [k for b in epoch for k in b["keys"]]
    assert bad_key not in seen
    assert stream.corrupt_count >= 1 + 4  # the bad image and the samples after the truncation
    assert stream.stats()["damaged_shard_reads"] >= 1
    reference = take(ShardStream(paths, **kw).forever(), 30)
    first = ShardStream(paths, **kw)
    take(first.forever(), 13)
    resumed = ShardStream(paths, **kw)
    resumed.load_state_dict(first.state_dict())
    assert resumed.corrupt_count == first.corrupt_count
    assert_same_batches(take(resumed.forever(), 17), reference[13:])


def test_unreadable_shards_raise_instead_of_spinning(tmp_path):
    paths = make_shards(tmp_path, n_shards=2, per_shard=8, size=16)
    for p in paths:
        truncate(p, 0.01)
    with pytest.raises(RuntimeError, match="could not be read"):
        list(ShardStream(paths, batch_size=4, image_size=16, mode="resampled", batches_per_epoch=2))


def test_state_dict_mismatch_and_set_epoch(shards):
    stream = ShardStream(shards, batch_size=4, image_size=16, mode="resampled", batches_per_epoch=3, num_workers=0)
    take(iter(stream), 2)
    state = stream.state_dict()
    assert (state["epoch"], state["batches_yielded"]) == (0, 2)
    other = ShardStream(shards, batch_size=4, image_size=16, mode="resampled", batches_per_epoch=3, num_workers=2)
    with pytest.raises(ValueError, match="workers: saved 1, now 2"):
        other.load_state_dict(state)
    stream.load_state_dict([dict(state, rank=1), state])  # a list of every rank's states picks this rank's
    stream.set_epoch(4)
    first_of_epoch4 = next(iter(stream))
    again = ShardStream(shards, batch_size=4, image_size=16, mode="resampled", batches_per_epoch=3)
    again.set_epoch(4)
    assert next(iter(again))["keys"] == first_of_epoch4["keys"]


def test_shard_patterns_manifests_and_missing_shards(shards):
    folder = os.path.dirname(shards[0])
    brace = os.path.join(folder, "train-{000000..000007}.tar")
    for spec in (brace, os.path.join(folder, "train-*.tar"), os.path.join(folder, "train.json")):
        assert ShardStream(spec, batch_size=4, image_size=16, mode="split").spec.urls == tuple(shards)
    with pytest.raises(FileNotFoundError, match=r"train-000008\.tar. does not exist"):
        ShardStream(os.path.join(folder, "train-{000000..000009}.tar"), batch_size=4, image_size=16)


def test_sample_order_is_a_permutation_per_pass_and_skip_is_consistent():
    counts = [7, 5, 9, 3]
    order = SampleOrder(counts, [0, 2, 3], mode="split", seed=1, rank=0, worker=1, epoch=2, shuffle=True,
                        buffer_size=6)
    refs = take(order, 19 * 2)
    shards_of = lambda rs: sorted((order.segments[s][0], p) for s, p in rs)  # noqa: E731
    expected = sorted((i, p) for i in (0, 2, 3) for p in range(counts[i]))
    assert shards_of(refs[:19]) == shards_of(refs[19:]) == expected  # each pass: every sample exactly once
    assert refs[:19] != sorted(refs[:19])  # shuffled
    skipped = SampleOrder(counts, [0, 2, 3], mode="split", seed=1, rank=0, worker=1, epoch=2, shuffle=True,
                          buffer_size=6)
    skipped.skip(11)
    assert take(skipped, 27) == refs[11:]


def test_super_resolution_keeps_smooth_content_and_removes_fine_detail():
    y, x = torch.meshgrid(torch.linspace(-0.5, 0.5, 64), torch.linspace(-0.5, 0.5, 64), indexing="ij")
    smooth = (x + y).expand(2, 3, 64, 64).contiguous()
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1).float().expand(1, 3, 64, 64)
    assert (super_resolution_input(smooth) - smooth)[..., 8:-8, 8:-8].abs().max() < 0.02
    assert super_resolution_input(checker).abs().max() < 0.05  # period-2 detail is far above the 1/4 Nyquist
    assert super_resolution_input(smooth).shape == smooth.shape
    with pytest.raises(ValueError, match="divisible"):
        super_resolution_input(torch.zeros(1, 3, 30, 30))


def test_inpainting_zeroes_exactly_the_centered_square():
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    inputs, mask = inpainting_input(images, 0.25)
    assert mask.sum() == 16 * 16 and mask[0, 0, 24:40, 24:40].all()
    assert (inputs[:, :, 24:40, 24:40] == 0).all()
    assert torch.equal(inputs.masked_select(~mask), images.masked_select(~mask))
    assert center_mask(10, 10, 0.5)[0, 0].nonzero().min(0).values.tolist() == [2, 2]


def test_stream_degradation_pairs(shards):
    stream = ShardStream(shards, batch_size=4, image_size=16, mode="resampled", batches_per_epoch=1,
                         degradation="super_resolution", num_workers=1)
    batch = next(iter(stream))
    assert torch.equal(batch["inputs"], super_resolution_input(batch["images"], 4))
    stream = ShardStream(shards, batch_size=4, image_size=16, mode="resampled", batches_per_epoch=1,
                         degradation="inpainting", mask_fraction=0.5)
    batch = next(iter(stream))
    assert batch["mask"].shape == (4, 1, 16, 16) and batch["mask"].sum() == 4 * 64
    assert (batch["inputs"][batch["mask"].expand(-1, 3, -1, -1)] == 0).all()
    with pytest.raises(ValueError, match="degradation must be"):
        ShardStream(shards, batch_size=4, image_size=16, degradation="denoise")


def test_jpeg_shards_decode(tmp_path):
    paths = make_shards(tmp_path, n_shards=2, per_shard=4, size=16, image_format="jpeg", smooth=True)
    batch = next(iter(ShardStream(paths, batch_size=4, image_size=16, mode="split", train=False)))
    expected = torch.from_numpy(np.stack([pattern(int(k), 16, True) for k in batch["keys"]])).permute(0, 3, 1, 2)
    error = (batch["images"] - (expected.float() / 127.5 - 1)).abs()
    assert error.mean() < 0.02 and error.max() < 0.1  # lossy (a few grey levels), but the same picture


def test_restored_reader_does_not_open_shards_it_has_fully_consumed(tmp_path):
    from lasers_dist.data.reader import SampleFetcher

    paths = make_shards(tmp_path, n_shards=4, per_shard=12, size=16)
    order = SampleOrder([12] * 4, [0, 1, 2, 3], mode="split", seed=0, rank=0, worker=0, epoch=0, shuffle=False,
                        buffer_size=1)
    order.skip(27)  # shards 0 and 1 are used up, shard 2 from its 4th sample
    os.remove(paths[0])
    os.remove(paths[1])  # opening either would now be a damaged read
    fetcher = SampleFetcher(paths, order)
    keys = [fetcher.fetch(next(order))[0] for _ in range(21)]
    assert keys == [f"{i:08d}" for i in range(27, 48)]
    assert fetcher.damaged_shards == 0
