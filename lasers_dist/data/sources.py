"""Readers that turn a dataset on disk into a list of `Item`s (cheap references, loaded later in workers).

Kinds: `folder` (any folder of images, recursive), `archive` (zip or tar of images, any compression),
`ffhq` (the FFHQ folder layout), `flowers` (Oxford Flowers 102: `102flowers.tgz` or its `jpg/` folder, with
`imagelabels.mat` / `setid.mat` beside it), `cifar10` (`cifar-10-python.tar.gz` or its extracted folder),
`mnist` (a folder holding the four idx files, gzipped or not).

Listing is cheap and happens in the main process; `load_item` does the decoding and runs in worker processes.
Compressed tar archives are decompressed once into `cache_dir` so workers can seek to single members.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import re
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .pixels import IMAGE_EXTENSIONS, open_rgb

KINDS = ("folder", "archive", "ffhq", "flowers", "cifar10", "mnist")
# FFHQ's own metadata (ffhq-dataset-v2.json) marks images 0..59999 "training" and 60000..69999 "validation".
FFHQ_NUM_TRAIN = 60000
MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Item:
    """One source image. `ref` says how to load it: ("file", path), ("zip", archive, member),
    ("tar", archive, offset, size), ("pixels", uint8 array HxW or HxWx3) or ("crop", ...) for built-in data."""

    index: int  # position in the source's sorted listing: stable, becomes the shard key
    key: str  # human-readable origin (relative path, member name, batch/index)
    label: int | None
    split: str | None  # the source's official split, when it has one
    ref: tuple


@dataclass
class Source:
    kind: str
    path: str
    items: list[Item]
    has_official_split: bool
    errors: list[dict]  # problems found while listing (e.g. a truncated archive), kept for the manifest
    cleanup: list[str]  # cache files to delete once the job is complete


def _is_image_name(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and "." in base


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz"))


def detect_kind(path: str | os.PathLike) -> str:
    """Guess the kind of source from what `path` is; raises FileNotFoundError / ValueError."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"source {str(p)!r} does not exist")
    name = p.name.lower()
    if p.is_file():
        if name.startswith("cifar-10") and _is_tar_name(name):
            return "cifar10"
        if name.startswith("102flowers"):
            return "flowers"
        if any(name.startswith(f) for f in MNIST_FILES.values()):
            return "mnist"
        if name.endswith(".zip") or _is_tar_name(name):
            return "archive"
        raise ValueError(f"cannot tell what kind of source {str(p)!r} is: pass --kind ({', '.join(KINDS)})")
    entries = {e.name for e in p.iterdir()}
    if _find_mnist_files(p, required=False):
        return "mnist"
    if "data_batch_1" in entries or (p / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if "102flowers.tgz" in entries or "imagelabels.mat" in entries or (p / "jpg" / "image_00001.jpg").exists():
        return "flowers"
    # FFHQ: folders 00000, 01000, ... (plus its json / license files), or its own folder names.
    numbered = any(re.fullmatch(r"\d{5}", e) for e in entries)
    if "ffhq-dataset-v2.json" in entries or name in ("images1024x1024", "thumbnails128x128") or (
            numbered and all(re.fullmatch(r"\d{5}|.*\.(json|txt|md)", e) for e in entries)):
        return "ffhq"
    return "folder"


def read_source(path: str | os.PathLike, kind: str | None, cache_dir: str | os.PathLike) -> Source:
    """List the images of a source; `kind=None` detects it. Raises on a missing or empty source."""
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}: choose one of {', '.join(KINDS)}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"source {str(p)!r} does not exist")
    reader = {"folder": _read_folder, "archive": _read_archive, "ffhq": _read_ffhq,
              "flowers": _read_flowers, "cifar10": _read_cifar10, "mnist": _read_mnist}[kind]
    source = reader(p, Path(cache_dir))
    if not source.items:
        raise ValueError(f"source {str(p)!r} (kind {kind}) contains no images "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)}); check the path or pass --kind")
    return source


# ---- folders and archives -------------------------------------------------------------------------------

def _list_image_files(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in filenames if _is_image_name(f)]
    return sorted(found, key=lambda f: os.path.relpath(f, root))


def _read_folder(root: Path, cache_dir: Path) -> Source:
    if not root.is_dir():
        raise ValueError(f"source {str(root)!r} is not a folder; use --kind archive for zip/tar files")
    files = _list_image_files(root)
    items = [Item(i, os.path.relpath(f, root), None, None, ("file", f)) for i, f in enumerate(files)]
    return Source("folder", str(root), items, False, [], [])


def _decompressed_tar(path: Path, cache_dir: Path, errors: list[dict]) -> tuple[Path, list[str]]:
    """Return an uncompressed tar for `path` (itself, or a cached decompressed copy) and files to clean up."""
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic[:3] == b"BZh" else (
        lzma.open if magic == b"\xfd7zXZ\x00" else None)
    if opener is None:
        return path, []
    cache_dir.mkdir(parents=True, exist_ok=True)
    st = path.stat()
    cached = cache_dir / f"{path.name}.{st.st_size}.{int(st.st_mtime)}.tar"
    if not cached.exists():  # written under a temporary name: an interrupted copy is never reused
        tmp = cached.with_suffix(".tmp")
        try:
            with opener(path, "rb") as src, open(tmp, "wb") as dst:
                # read1: each call returns what one input block yields, so a truncated archive keeps all
                # the bytes before the damage (read(n) would drop the whole last n-byte request).
                while chunk := src.read1(1 << 20):
                    dst.write(chunk)
        except (OSError, EOFError, lzma.LZMAError) as e:
            # A truncated compressed archive: keep what decompressed, the tar index below stops at the damage.
            if not tmp.exists():
                raise ValueError(f"cannot decompress {str(path)!r}: {e}") from e
            errors.append({"source": str(path), "reason": f"decompression stopped early: {e}"})
        os.replace(tmp, cached)
    return cached, [str(cached)]


def _tar_members(tar_path: Path, errors: list[dict], origin: Path) -> list[tarfile.TarInfo]:
    members = []
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                members.append(m)
    except (tarfile.TarError, OSError, EOFError) as e:
        errors.append({"source": str(origin), "reason": f"archive damaged after {len(members)} members: {e}"})
    size = tar_path.stat().st_size
    complete = []
    for m in members:
        if not m.isfile():
            continue
        if m.offset_data + m.size > size:
            errors.append({"source": f"{origin}:{m.name}", "reason": "archive member truncated"})
        else:
            complete.append(m)
    return complete


def _read_archive(path: Path, cache_dir: Path) -> Source:
    if path.is_dir():
        raise ValueError(f"source {str(path)!r} is a folder; use --kind folder")
    errors: list[dict] = []
    if path.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = sorted(n for n in zf.namelist() if _is_image_name(n) and not n.startswith("__MACOSX/"))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{str(path)!r} is not a readable zip file: {e}") from e
        items = [Item(i, n, None, None, ("zip", str(path), n)) for i, n in enumerate(names)]
        return Source("archive", str(path), items, False, errors, [])
    tar_path, cleanup = _decompressed_tar(path, cache_dir, errors)
    members = sorted((m for m in _tar_members(tar_path, errors, path) if _is_image_name(m.name)), key=lambda m: m.name)
    items = [Item(i, m.name, None, None, ("tar", str(tar_path), m.offset_data, m.size)) for i, m in enumerate(members)]
    return Source("archive", str(path), items, False, errors, cleanup)


# ---- FFHQ and Oxford Flowers 102 ------------------------------------------------------------------------

def _read_ffhq(root: Path, cache_dir: Path) -> Source:
    files = _list_image_files(root)
    items = []
    for i, f in enumerate(files):
        stem = Path(f).stem
        number = int(stem) if stem.isdigit() else None
        split = None if number is None else ("train" if number < FFHQ_NUM_TRAIN else "val")
        items.append(Item(i, os.path.relpath(f, root), None, split, ("file", f)))
    official = all(it.split is not None for it in items)
    return Source("ffhq", str(root), items, official, [], [])


def _load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except Exception as e:  # scipy raises several types for damaged .mat files
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e


def _flowers_metadata(where: list[Path]) -> tuple[np.ndarray | None, dict[int, str] | None]:
    labels = split_of = None
    for d in where:
        if labels is None and (d / "imagelabels.mat").exists():
            labels = _load_mat(d / "imagelabels.mat")["labels"].reshape(-1).astype(np.int64) - 1  # 0-based
        if split_of is None and (d / "setid.mat").exists():
            mat = _load_mat(d / "setid.mat")
            split_of = {int(i): s for key, s in (("trnid", "train"), ("valid", "val"), ("tstid", "test"))
                        for i in mat[key].reshape(-1)}
    return labels, split_of


def _read_flowers(path: Path, cache_dir: Path) -> Source:
    errors: list[dict] = []
    cleanup: list[str] = []
    if path.is_dir() and (path / "102flowers.tgz").exists() and not (path / "jpg").is_dir():
        path = path / "102flowers.tgz"
    if path.is_file():
        tar_path, cleanup = _decompressed_tar(path, cache_dir, errors)
        refs = {m.name: ("tar", str(tar_path), m.offset_data, m.size)
                for m in _tar_members(tar_path, errors, path) if _is_image_name(m.name)}
        meta_dirs = [path.parent]
    else:
        image_dir = path / "jpg" if (path / "jpg").is_dir() else path
        refs = {os.path.relpath(f, path): ("file", f) for f in _list_image_files(image_dir)}
        meta_dirs = [path, path.parent]
    labels, split_of = _flowers_metadata(meta_dirs)
    items = []
    for i, name in enumerate(sorted(refs)):
        match = re.search(r"image_(\d+)\.", os.path.basename(name))
        number = int(match.group(1)) if match else None  # 1-based image id used by the .mat files
        label = int(labels[number - 1]) if labels is not None and number and number <= len(labels) else None
        split = split_of.get(number) if split_of and number else None
        items.append(Item(i, name, label, split, refs[name]))
    official = bool(items) and all(it.split is not None for it in items)
    return Source("flowers", str(path), items, official, errors, cleanup)


# ---- CIFAR-10 and MNIST ---------------------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10 ships as Python pickles; allow only the numpy classes they contain, nothing executable."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which a CIFAR file never does")
        return super().find_class(module, name)


def _cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, list[int]]:
    batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [int(v) for v in batch[b"labels"]]
    if len(labels) != len(pixels):
        raise ValueError(f"CIFAR-10 batch {name}: {len(pixels)} images but {len(labels)} labels")
    return pixels, labels


def _read_cifar10(path: Path, cache_dir: Path) -> Source:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    blobs: dict[str, bytes] = {}
    if path.is_file():
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                base = os.path.basename(m.name)
                if m.isfile() and base in names:
                    blobs[base] = tf.extractfile(m).read()
    else:
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        blobs = {n: (folder / n).read_bytes() for n in names if (folder / n).exists()}
    missing = [n for n in names if n not in blobs]
    if missing:
        raise ValueError(f"{str(path)!r} is not a complete CIFAR-10 python archive: missing {', '.join(missing)}")
    items = []
    for name in names:
        pixels, labels = _cifar_batch(blobs[name], name)
        split = "test" if name == "test_batch" else "train"
        start = len(items)
        items += [Item(start + j, f"{name}/{j}", labels[j], split, ("pixels", pixels[j])) for j in range(len(labels))]
    return Source("cifar10", str(path), items, True, [], [])


def _find_mnist_files(folder: Path, required: bool = True) -> dict | None:
    found = {}
    for key, stem in MNIST_FILES.items():
        for cand in (folder / stem, folder / f"{stem}.gz", folder / stem.replace("-idx", ".idx")):
            if cand.exists():
                found[key] = cand
                break
    if len(found) == len(MNIST_FILES):
        return found
    if required:
        names = ", ".join(f"{s}.gz" for s in MNIST_FILES.values())
        raise ValueError(f"MNIST needs the four idx files in {str(folder)!r}: {names}")
    return None


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise ValueError(f"{str(path)!r} is not an idx file of the expected type (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{str(path)!r} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _read_mnist(path: Path, cache_dir: Path) -> Source:
    files = _find_mnist_files(path if path.is_dir() else path.parent)
    items = []
    for split in ("train", "test"):
        images = _read_idx(files[(split, "images")], 0x803)
        labels = _read_idx(files[(split, "labels")], 0x801)
        if len(images) != len(labels):
            raise ValueError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
        start = len(items)
        items += [Item(start + j, f"{split}/{j}", int(labels[j]), split, ("pixels", images[j]))
                  for j in range(len(images))]
    return Source("mnist", str(path), items, True, [], [])


# ---- loading one item (runs in worker processes) ------------------------------------------------------

def load_item(item: Item) -> tuple[Image.Image, str]:
    """Decode one item to an RGB image; returns (image, original mode). Raises on bad data."""
    kind = item.ref[0]
    if kind == "file":
        with open(item.ref[1], "rb") as f:
            return open_rgb(f.read())
    if kind == "zip":
        with zipfile.ZipFile(item.ref[1]) as zf:
            return open_rgb(zf.read(item.ref[2]))
    if kind == "tar":
        _, tar_path, offset, size = item.ref
        with open(tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"archive member truncated ({len(data)} of {size} bytes)")
        return open_rgb(data)
    if kind == "pixels":
        pixels = item.ref[1]
        mode = "L" if pixels.ndim == 2 else "RGB"
        return Image.fromarray(pixels, mode=mode).convert("RGB"), mode
    if kind == "crop":
        from .builtin import load_crop

        return load_crop(item.ref), "RGB"
    raise ValueError(f"unknown item reference {kind!r}")
