"""Bad data during training, on real tar files: odd images are converted, broken members and shards are skipped and
counted, a shard deleted while the stream runs is counted as lost, the stream stops only when a worker cannot read
anything (naming its shards), and a real 2-rank torchrun training on such shards finishes on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from lasers_dist.data import ShardStream
from shard_fixtures import cut_before_sample, encode_image, make_shards, write_tar
from train_support import REPO, child_env, tiny_config, train_cli, write_config

pytestmark = pytest.mark.faults

SIZE = 16


def ramp(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8, smooth (JPEG-friendly) and clearly different along x and y."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(40, 80, 3)
    return np.clip(base + 9.0 * x[..., None] + 3.0 * y[..., None] * rng.uniform(0.5, 1.0, 3), 0, 255).astype(np.uint8)


EXACT, ROUNDING, LOSSY = (0.0, 0.0), (1.0, 1.0), (3.0, 12.0)  # (mean, max) error allowed, in grey levels


def odd_images() -> dict[str, tuple[str, bytes, np.ndarray, tuple[float, float]]]:
    """key -> (extension, file bytes, expected (16, 16, 3) centre crop, allowed (mean, max) error)."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    sixteen = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    indices = rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8)
    cases = {}
    cases["gray"] = ("png", encode_image(Image.fromarray(gray, "L"), "PNG"), np.repeat(gray[..., None], 3, 2), EXACT)
    over_white = np.rint(rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0))
    cases["rgba"] = ("png", encode_image(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), over_white, ROUNDING)
    gray_white = np.rint(gray * (alpha / 255.0) + 255.0 * (1 - alpha / 255.0))
    cases["graya"] = ("png", encode_image(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"),
                      np.repeat(gray_white[..., None], 3, 2), ROUNDING)
    sixteen_png = encode_image(Image.fromarray(sixteen), "PNG")  # uint16: mode I;16
    cases["gray16"] = ("png", sixteen_png, np.repeat(np.rint(sixteen / 257.0)[..., None], 3, 2), ROUNDING)
    indexed = Image.fromarray(indices, "P")
    indexed.putpalette(palette.flatten().tolist() + [0] * (768 - 12))
    cases["palette"] = ("png", encode_image(indexed, "PNG"), palette[indices], EXACT)
    clear = palette[indices].astype(np.float64)
    clear[indices == 2] = 255.0  # palette entry 2 is transparent: white after compositing
    cases["palette_clear"] = ("png", encode_image(indexed, "PNG", transparency=2), clear, EXACT)
    smooth = ramp(SIZE, SIZE, 1)
    cases["cmyk"] = ("jpg", encode_image(Image.fromarray(smooth).convert("CMYK"), "JPEG", quality=95), smooth, LOSSY)
    cases["gray_jpeg"] = ("jpg", encode_image(Image.fromarray(smooth[..., 0], "L"), "JPEG", quality=95),
                          np.repeat(smooth[..., :1], 3, 2), LOSSY)
    # Stored 16 wide x 24 high with EXIF orientation 6 ("rotate 90 degrees clockwise to display"): shown
    # 24 wide x 16 high, the centre 16 x 16 of the rotated picture.
    stored = ramp(24, SIZE, 2)
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = np.rot90(stored, k=-1)[:, 4:20]
    cases["exif_rotated"] = ("jpg", encode_image(Image.fromarray(stored), "JPEG", quality=95, exif=exif), shown, LOSSY)
    return cases


def read_all(paths: list[str], counts: list[int], batch_size: int, **kw) -> tuple[list, ShardStream]:
    """[(key, (16, 16, 3) picture)] of one in-order epoch (validation mode: exact centre crops)."""
    stream = ShardStream(paths, counts=counts, batch_size=batch_size, image_size=SIZE, mode="split", train=False,
                         resize=False, **kw)
    pictures = [(key, np.rint((image.permute(1, 2, 0).numpy() + 1) * 127.5))
                for batch in stream for key, image in zip(batch["keys"], batch["images"])]
    return pictures, stream


def test_odd_image_modes_are_converted_not_lost(tmp_path):
    cases = odd_images()
    shard = write_tar(tmp_path / "odd-000000.tar", [(key, {ext: data, "cls": b"1"})
                                                     for key, (ext, data, _, _) in cases.items()])
    pairs, stream = read_all([shard], [len(cases)], batch_size=len(cases))
    pictures = dict(pairs)
    assert stream.corrupt_count == 0 and sorted(pictures) == sorted(cases)
    for key, (_, _, expected, (mean, most)) in cases.items():
        error = np.abs(pictures[key] - expected)
        assert error.mean() <= mean and error.max() <= most, (key, error.mean(), error.max())
    wrong_way = np.abs(pictures["exif_rotated"] - np.rot90(ramp(24, SIZE, 2), k=1)[:, 4:20]).mean()
    assert wrong_way > 10  # the orientation matters for this picture: a decoder that ignored EXIF would fail


def test_broken_members_and_truncated_shards_are_skipped_and_counted(tmp_path):
    good = encode_image(Image.fromarray(ramp(SIZE, SIZE, 3)), "PNG")
    members = write_tar(tmp_path / "train-000000.tar", [
        ("a0", {"png": good}), ("a1", {"png": b""}),  # zero-byte member
        ("a2", {"png": b"GIF89a? no: plain text pretending to be an image"}),  # not an image
        ("a3", {"txt": b"a sample without any image"}), ("a4", {"png": good}), ("a5", {"jpg": good[:40]}),
    ])
    cut_clean = make_shards(tmp_path, 1, 6, size=SIZE, split="clean")[0]
    cut_before_sample(cut_clean, 4)  # a valid-looking but short archive: 2 samples missing
    cut_data = make_shards(tmp_path, 1, 6, size=SIZE, split="data")[0]
    # A read error inside sample 3: samples 3-5 are missing, and sample 2 with them (a sample ends only when the
    # next key starts, which is where the read failed).
    cut_before_sample(cut_data, 3, into_data=True)
    intact = make_shards(tmp_path, 1, 6, size=SIZE, split="intact")[0]
    # One pass in order, batches of 1: the 14 good samples are exactly the epoch, every loss is met once.
    pictures, stream = read_all([members, cut_clean, cut_data, intact], [6, 6, 6, 6], batch_size=1,
                                batches_per_epoch=14)
    assert stream.corrupt_count == 4 + 2 + 4
    keys = [key for key, _ in pictures]
    assert len(keys) == 2 + 4 + 2 + 6 and keys[:2] == ["a0", "a4"]
    damaged = stream.stats()["damaged_shards"]
    assert damaged["clean-000000.tar"] == "ended after 4 of 6 samples"
    assert "unexpected end of data" in damaged["data-000000.tar"] and len(damaged) == 2


def test_a_shard_deleted_while_the_stream_runs_is_counted_as_lost(tmp_path):
    paths = make_shards(tmp_path, 4, 6, size=SIZE)
    stream = ShardStream(paths, batch_size=3, image_size=SIZE, mode="split", train=False)
    batches = iter(stream)
    first = next(batches)
    os.remove(paths[2])  # nobody has opened it yet
    with pytest.warns(UserWarning, match=r"shard train-000002\.tar: .*no such file"):
        rest = list(batches)
    keys = first["keys"] + [k for b in rest for k in b["keys"]]
    assert len(rest) + 1 == len(stream) == 8  # the batch count never changes
    assert stream.corrupt_count == 6 and not set(keys) & {f"{i:08d}" for i in range(12, 18)}


def test_a_worker_that_can_read_nothing_stops_naming_its_shards(tmp_path):
    paths = make_shards(tmp_path, 2, 6, size=SIZE)
    stream = ShardStream(paths, batch_size=4, image_size=SIZE, mode="resampled", num_workers=1,
                         multiprocessing_context="fork")
    for path in paths:
        os.remove(path)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"could not be read from its shards \(train-000000\.tar, "
                                           r"train-000001\.tar\); last errors: .*no such file"):
        next(iter(stream))
    assert time.perf_counter() - start < 60
    stream.close()


def test_two_rank_training_on_damaged_shards_finishes_on_both_ranks(tmp_path):
    """Odd images, broken members, a truncated shard, and a shard deleted after the first logged step."""
    shards = tmp_path / "shards"
    make_shards(shards, 6, 8, size=32, smooth=True)
    make_shards(shards, 2, 4, size=32, smooth=True, split="val")
    cases = odd_images()
    extra = {
        "train-000006.tar": [(f"odd{key}", {ext: data}) for key, (ext, data, _, _) in cases.items()],
        "train-000007.tar": [("bad0", {"png": b""}), ("bad1", {"png": b"not an image"}), ("bad2", {"txt": b"x"}),
                             ("ok0", {"png": encode_image(Image.fromarray(ramp(32, 32, 4)), "PNG")})],
    }
    manifest = json.loads((shards / "train.json").read_text())
    for name, samples in extra.items():
        write_tar(shards / name, samples)
        manifest["shards"].append({"name": name, "num_samples": len(samples)})
    (shards / "train.json").write_text(json.dumps(manifest))
    cut_before_sample(str(shards / "train-000003.tar"), 5, into_data=True)
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(shards, out, data={"num_workers": 1},
                                                           train={"max_steps": 8, "val_every": 4}))
    start = time.perf_counter()
    proc = subprocess.Popen(train_cli(2, config), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics, deleted = out / "metrics.jsonl", False
    try:
        while proc.poll() is None and time.perf_counter() - start < 300:
            if not deleted and metrics.is_file() and metrics.read_text().strip():
                os.remove(shards / "train-000005.tar")  # gone while the run reads
                deleted = True
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=max(1.0, 300 - (time.perf_counter() - start)))
    finally:
        if proc.poll() is None:
            proc.kill()
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, stderr[-4000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 8
    last = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
    assert last["step"] == 8 and last["data/corrupt_samples"] > 0 and np.isfinite(last["val/psnr"])
    assert "shard train-000003.tar: unexpected end of data" in stderr  # each rank says what it skipped
    print(f"damaged-shard training: {seconds:.1f} s, data/corrupt_samples={last['data/corrupt_samples']:.0f}, "
          f"deleted mid-run: {deleted}")
