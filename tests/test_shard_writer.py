"""lasers-shard's writer on real image files: modes, bad files, manifests, determinism, resume, limits."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lasers_dist.data import write_shards
from lasers_dist.data.pixels import to_rgb


def _save(path, img: Image.Image, fmt: str | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


@pytest.fixture()
def messy_folder(tmp_path):
    """A folder of images in every awkward mode, plus files that cannot be images."""
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    _save(root / "a_rgb.png", Image.fromarray(rgb))
    _save(root / "b_gray.jpg", Image.fromarray(rgb[..., 0]), quality=90)
    _save(root / "sub" / "c_rgba.png", Image.fromarray(np.dstack([rgb, np.full((24, 32), 0, np.uint8)]), "RGBA"))
    _save(root / "sub" / "d_la.png", Image.fromarray(rgb[..., :2].copy(), "LA"))
    _save(root / "sub" / "deeper" / "e_palette.png", Image.fromarray(rgb).convert("P"))
    sixteen = np.full((24, 32), 65535, np.uint16)
    sixteen[:, :16] = 32896  # 32896 / 257 = 128
    _save(root / "f_16bit.png", Image.fromarray(sixteen))
    _save(root / "g_bilevel.bmp", Image.fromarray(rgb[..., 0] > 128))
    _save(root / "h_cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    _save(root / "i_photo.webp", Image.fromarray(rgb), lossless=True)
    (root / "z_empty.png").write_bytes(b"")
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    (root / "z_truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "z_garbage.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def test_odd_modes_are_converted_and_bad_files_listed(messy_folder, tmp_path):
    out = tmp_path / "out"
    manifests = write_shards(messy_folder, out, size=16, max_count=4, split="fraction", val_fraction=0.0, seed=1)
    assert list(manifests) == ["train"]
    m = json.loads((out / "train.json").read_text())
    assert m["num_samples"] == 9 and m["image_size"] == 16
    assert [s["num_samples"] for s in m["shards"]] == [4, 4, 1]
    skipped = {s["source"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"z_empty.png", "z_truncated.png", "z_garbage.jpg"}
    assert "zero-byte" in skipped["z_empty.png"] and "truncated" in skipped["z_truncated.png"].lower()
    modes = {}
    for shard in m["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["num_bytes"]
        with tarfile.open(out / shard["name"]) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".png"):
                    img = Image.open(io.BytesIO(tf.extractfile(member).read()))
                    assert img.mode == "RGB" and img.size == (16, 16)
                    meta = json.loads(tf.extractfile(member.name.replace(".png", ".json")).read())
                    modes[meta["source"]] = (meta["mode"], np.asarray(img))
    assert modes["f_16bit.png"][0].startswith("I")
    sixteen = modes["f_16bit.png"][1]  # 16-bit range scaled (32896 -> 128), not clipped to 255
    assert (sixteen[:, :3] == 128).all() and (sixteen[:, -3:] == 255).all()
    assert (modes["sub/c_rgba.png"][1] == 255).all()  # fully transparent -> white
    assert modes["sub/deeper/e_palette.png"][0] == "P"


def test_to_rgb_handles_palette_transparency_and_float():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal)).tolist()[0][0] == [255, 255, 255]
    flt = Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")
    assert np.asarray(to_rgb(flt))[0, 0].tolist() == [128, 128, 128]


def test_resize_shorter_side_then_center_crop_and_keep_size(tmp_path):
    src = tmp_path / "src"
    stripes = np.zeros((30, 60, 3), np.uint8)
    stripes[:, :15] = (255, 0, 0)  # left quarter red, right quarter blue, middle green
    stripes[:, 15:45] = (0, 255, 0)
    stripes[:, 45:] = (0, 0, 255)
    _save(src / "wide.png", Image.fromarray(stripes))
    write_shards(src, tmp_path / "crop", size=10, val_fraction=0.0)
    write_shards(src, tmp_path / "keep", val_fraction=0.0)
    for folder, shape in (("crop", (10, 10, 3)), ("keep", (30, 60, 3))):
        sample = next(iter(wds.WebDataset(str(tmp_path / folder / "train-000000.tar"), shardshuffle=False)))
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert pixels.shape == shape
    assert (np.abs(pixels.astype(int) - stripes).max()) == 0  # keep-size PNG is lossless
    cropped = np.asarray(Image.open(io.BytesIO(next(iter(wds.WebDataset(
        str(tmp_path / "crop" / "train-000000.tar"), shardshuffle=False)))["png"])))
    assert (cropped[:, :, 1] > 200).all()  # the center crop of 20x10 keeps only the green middle


def test_output_is_identical_for_any_worker_count_and_readable_by_webdataset(messy_folder, tmp_path):
    one = write_shards(messy_folder, tmp_path / "w1", size=16, max_count=3, workers=1, image_format="jpeg",
                       quality=80)
    two = write_shards(messy_folder, tmp_path / "w2", size=16, max_count=3, workers=2, image_format="jpeg",
                       quality=80)
    assert [s["sha256"] for s in one["train"]["shards"]] == [s["sha256"] for s in two["train"]["shards"]]
    samples = list(wds.WebDataset(str(tmp_path / "w2" / "train-{000000..000002}.tar"), shardshuffle=False)
                   .decode("rgb8"))
    assert len(samples) == two["train"]["num_samples"] and all(s["jpg"].shape == (16, 16, 3) for s in samples)
    assert sorted(s["__key__"] for s in samples) == sorted({s["__key__"] for s in samples})
    # default split: val fraction 0.05 of the 12 files is 1 file; 9 of the 12 are readable
    assert sum(m["num_samples"] + len(m["skipped"]) for m in one.values()) == 12
    assert sum(m["num_samples"] for m in one.values()) == 9


class _Interrupt(Exception):
    pass


def test_interrupted_run_keeps_completed_shards_and_finishes_identically(messy_folder, tmp_path):
    kw = dict(size=16, max_count=2, split="fraction", val_fraction=0.0, workers=2)
    reference = write_shards(messy_folder, tmp_path / "ref", **kw)["train"]
    out = tmp_path / "out"

    def stop_after_second(entry):
        if entry["name"] == "train-000001.tar":
            raise _Interrupt

    with pytest.raises(_Interrupt):
        write_shards(messy_folder, out, on_shard=stop_after_second, **kw)
    assert not (out / "train.json").exists() and (out / ".train.progress.json").exists()
    before = {n: (out / n).stat() for n in ("train-000000.tar", "train-000001.tar")}
    (out / "train-000002.tar.tmp").write_bytes(b"what a killed run leaves behind")
    resumed = write_shards(messy_folder, out, **kw)["train"]
    for name, st in before.items():  # kept, not rewritten
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["skipped"] == reference["skipped"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    again = write_shards(messy_folder, out, **kw)["train"]  # a complete run is a no-op
    assert again == resumed and (out / "train-000000.tar").stat().st_mtime_ns == before["train-000000.tar"].st_mtime_ns


def test_other_options_in_the_same_folder_need_overwrite(messy_folder, tmp_path):
    write_shards(messy_folder, tmp_path / "out", size=16)
    with pytest.raises(ValueError, match="--overwrite"):
        write_shards(messy_folder, tmp_path / "out", size=8)
    m = write_shards(messy_folder, tmp_path / "out", size=8, overwrite=True)
    assert m["train"]["image_size"] == 8


def test_shards_are_cut_by_bytes(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for i in range(30):
        _save(src / f"{i:02d}.png", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    m = write_shards(src, tmp_path / "out", val_fraction=0.0, max_bytes=40_000)["train"]
    assert len(m["shards"]) > 3 and sum(s["num_samples"] for s in m["shards"]) == 30
    for shard in m["shards"]:  # noise PNGs are ~3.2 kB; tar's final padding rounds files up to 10 KiB
        assert shard["num_bytes"] <= 40_000 + 10_240


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no images"):
        write_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no image of the source could be read"):
        write_shards(tmp_path / "bad", tmp_path / "out2", val_fraction=0.0)
