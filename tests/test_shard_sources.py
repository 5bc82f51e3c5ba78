"""Every source kind of lasers-shard, in its real on-disk format (small), the built-in photos and the CLI."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import scipy.io
import webdataset as wds
from PIL import Image

from lasers_dist.cli.shard import main as shard_main
from lasers_dist.data import ShardStream, detect_kind, read_source, write_shards


def _png(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def _image(i: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _samples(out, split):
    manifest = json.loads((out / f"{split}.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return manifest, list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_zip_and_compressed_tar_archives(tmp_path):
    with zipfile.ZipFile(tmp_path / "pics.zip", "w") as zf:
        for i in range(5):
            zf.writestr(f"photos/{i}.png", _png(_image(i)))
        zf.writestr("__MACOSX/photos/._0.png", b"resource fork junk")
        zf.writestr("photos/readme.txt", "not an image")
    with tarfile.open(tmp_path / "pics.tar.gz", "w:gz") as tf:
        for i in range(4):
            _add(tf, f"a/{i}.jpg", _png(_image(i), "JPEG"))
    assert detect_kind(tmp_path / "pics.zip") == detect_kind(tmp_path / "pics.tar.gz") == "archive"
    zipped = write_shards(tmp_path / "pics.zip", tmp_path / "z", val_fraction=0.0)["train"]
    tarred = write_shards(tmp_path / "pics.tar.gz", tmp_path / "t", val_fraction=0.0, size=8)["train"]
    assert zipped["num_samples"] == 5 and tarred["num_samples"] == 4 and tarred["image_size"] == 8
    _, samples = _samples(tmp_path / "z", "train")
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(by_source["photos/3.png"]["png"]))), _image(3))
    assert not (tmp_path / "t" / ".cache").exists()  # the decompressed copy is removed when done


def test_ffhq_layout_uses_the_official_split(tmp_path):
    root = tmp_path / "images1024x1024"
    for number in (0, 1, 2, 60000, 60001):
        folder = root / f"{number // 1000 * 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number:05d}.png").write_bytes(_png(_image(number, 16)))
    (root / "LICENSE.txt").write_text("license")
    assert detect_kind(root) == "ffhq"
    manifests = write_shards(root, tmp_path / "out", size=8)
    assert {s: m["num_samples"] for s, m in manifests.items()} == {"train": 3, "val": 2}
    _, val = _samples(tmp_path / "out", "val")
    assert sorted(json.loads(s["json"])["source"] for s in val) == ["60000/60000.png", "60000/60001.png"]


def test_oxford_flowers_tgz_with_labels_and_setid(tmp_path):
    with tarfile.open(tmp_path / "102flowers.tgz", "w:gz") as tf:
        for i in range(1, 7):
            _add(tf, f"jpg/image_{i:05d}.jpg", _png(_image(i), "JPEG"))
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": np.array([[77, 77, 3, 3, 102, 1]])})
    scipy.io.savemat(tmp_path / "setid.mat", {"trnid": np.array([[1, 3]]), "valid": np.array([[2, 5]]),
                                              "tstid": np.array([[4, 6]])})
    assert detect_kind(tmp_path / "102flowers.tgz") == "flowers"
    manifests = write_shards(tmp_path / "102flowers.tgz", tmp_path / "out")
    labels = {}
    for split in ("train", "val", "test"):
        _, samples = _samples(tmp_path / "out", split)
        labels[split] = sorted((json.loads(s["json"])["source"][-9:-4], int(s["cls"])) for s in samples)
    assert labels == {"train": [("00001", 76), ("00003", 2)], "val": [("00002", 76), ("00005", 101)],
                      "test": [("00004", 2), ("00006", 0)]}  # labels 0-based
    assert manifests["train"]["num_classes"] == 77
    with tarfile.open(tmp_path / "102flowers.tgz") as tf:  # the extracted layout: jpg/ beside the .mat files
        tf.extractall(tmp_path / "extracted", filter="data")
    for mat in ("imagelabels.mat", "setid.mat"):
        (tmp_path / "extracted" / mat).write_bytes((tmp_path / mat).read_bytes())
    assert detect_kind(tmp_path / "extracted") == "flowers"
    from_folder = write_shards(tmp_path / "extracted", tmp_path / "out_folder")
    assert {s: m["num_samples"] for s, m in from_folder.items()} == {"train": 2, "val": 2, "test": 2}
    (tmp_path / "setid.mat").unlink()  # without setid.mat there is no official split
    with pytest.raises(ValueError, match="setid.mat"):
        write_shards(tmp_path / "102flowers.tgz", tmp_path / "out2", split="official")


def test_cifar10_python_archive_keeps_pixels_labels_and_split(tmp_path):
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tf:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, 2).tolist()
            batches[name] = (data, labels)
            _add(tf, f"cifar-10-batches-py/{name}",
                 pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels}))
        _add(tf, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": []}))
    manifests = write_shards(tmp_path / "cifar-10-python.tar.gz", tmp_path / "out")
    assert {s: m["num_samples"] for s, m in manifests.items()} == {"test": 2, "train": 10}
    _, test = _samples(tmp_path / "out", "test")
    for s in test:
        j = int(json.loads(s["json"])["source"].split("/")[1])
        expected = batches["test_batch"][0][j].reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), expected)
        assert int(s["cls"]) == batches["test_batch"][1][j]


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_source(tmp_path, "cifar10", tmp_path / "cache")


def test_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    digits = {}
    for split, stem, n in (("train", "train", 3), ("test", "t10k", 2)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        digits[split] = (images, labels)
        with gzip.open(tmp_path / f"{stem}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(tmp_path / f"{stem}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    assert detect_kind(tmp_path) == "mnist"
    manifests = write_shards(tmp_path, tmp_path / "out")
    assert {s: m["num_samples"] for s, m in manifests.items()} == {"test": 2, "train": 3}
    _, train = _samples(tmp_path / "out", "train")
    for s in train:
        j = int(json.loads(s["json"])["source"].split("/")[1])
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert pixels.shape == (28, 28, 3)
        assert all(np.array_equal(pixels[..., c], digits["train"][0][j]) for c in range(3))
        assert int(s["cls"]) == digits["train"][1][j]


def test_builtin_photos_split_by_photo_and_stream(tmp_path):
    out = tmp_path / "photos"
    rc = shard_main(["--builtin", "photos", str(out), "--size", "32", "--crops-per-photo", "4", "--workers", "2",
                     "--max-count", "10", "--no-progress"])
    assert rc == 0
    train, val = (json.loads((out / f"{s}.json").read_text()) for s in ("train", "val"))
    photos = train["source"]["photos"]
    assert not set(photos["train"]) & set(photos["val"])
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= set(photos["train"]) | set(photos["val"])
    assert train["num_samples"] + val["num_samples"] == 18 * 4 + 200  # crops, plus one per LFW face
    assert train["image_size"] == val["image_size"] == 32
    stream = ShardStream(str(out / "val-*.tar"), batch_size=4, image_size=32, mode="split", train=False,
                         num_workers=2, world_size=2, rank=1)
    batch = next(iter(stream))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].std() > 0.1  # real pictures, not blank


def test_cli_reports_errors_and_runs_as_console_script(tmp_path, capsys):
    assert shard_main([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shard_main(["--builtin", "photos", "a", "b"])
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.png").write_bytes(_png(_image(i)))
    result = subprocess.run([sys.executable, "-m", "lasers_dist.cli.shard", str(src), str(tmp_path / "out"),
                             "--size", "8", "--format", "jpeg", "--quality", "90", "--max-count", "2",
                             "--max-bytes", "1MB", "--val-fraction", "0.34", "--seed", "3", "--workers", "2",
                             "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train:       4 samples in    2 shards (8px)" in result.stdout
    val = json.loads((tmp_path / "out" / "val.json").read_text())
    assert val["options"] == {"size": 8, "image_format": "jpeg", "quality": 90, "max_count": 2,
                              "max_bytes": 1_000_000}
    assert val["num_samples"] == 2 and val["shards"][0]["name"] == "val-000000.tar"


def test_truncated_compressed_archive_keeps_what_is_readable(tmp_path):
    with tarfile.open(tmp_path / "pics.tar.gz", "w:gz") as tf:
        for i in range(12):
            _add(tf, f"{i:02d}.png", _png(_image(i, 24)))
    data = (tmp_path / "pics.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    first = write_shards(tmp_path / "cut.tar.gz", tmp_path / "out", val_fraction=0.0)["train"]
    assert 0 < first["num_samples"] < 12
    assert first["listing_errors"] and "decompression stopped early" in first["listing_errors"][0]["reason"]
    again = write_shards(tmp_path / "cut.tar.gz", tmp_path / "out", val_fraction=0.0)["train"]  # rerun: no-op
    assert again["shards"] == first["shards"]
