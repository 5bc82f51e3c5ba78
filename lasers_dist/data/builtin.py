"""The built-in `photos` set: random crops of the photographs that ship inside scikit-image (no network).

Train / val / test are split by source photo (each LFW face counts as its own photo), so no photo appears
in two splits. Crop positions and scales are drawn from a generator seeded by `seed`, so the set is
reproducible bit for bit.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from .sources import Item

# Photographs that load offline from scikit-image 0.2x (others need pooch and a download).
COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "stereo_motorcycle")
GRAY_PHOTOS = ("camera", "moon", "coins", "page", "text", "clock", "grass", "gravel", "brick", "cell")
PHOTOS = COLOR_PHOTOS + GRAY_PHOTOS
NUM_FACES = 200  # skimage.data.lfw_subset(): 200 grayscale 25x25 faces
MAX_ZOOM_OUT = 4.0  # crops cover between size and 4*size source pixels per side (then resized to size)


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One scikit-image photograph as uint8 (H, W, 3)."""
    import skimage.data

    if name == "lfw_subset":
        faces = skimage.data.lfw_subset()  # float64 in [0, 1], (200, 25, 25)
        return np.rint(faces * 255).astype(np.uint8)
    photo = getattr(skimage.data, name)()
    if isinstance(photo, tuple):  # stereo_motorcycle returns (left, right, disparity): use the left view
        photo = photo[0]
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.ascontiguousarray(photo[:, :, :3].astype(np.uint8))


def _scaled_shape(shape: tuple[int, ...], size: int) -> tuple[int, int, float]:
    # Photos whose shorter side is below the crop size are upscaled first (e.g. 'text' at --size 256).
    h, w = shape[:2]
    scale = max(1.0, size / min(h, w))
    return round(h * scale), round(w * scale), scale


@functools.lru_cache(maxsize=None)
def _photo_image(name: str, size: int) -> Image.Image:
    photo = load_photo(name)
    h, w, scale = _scaled_shape(photo.shape, size)
    img = Image.fromarray(photo)
    return img.resize((w, h), Image.Resampling.BICUBIC) if scale > 1.0 else img


def load_crop(ref: tuple) -> Image.Image:
    """Materialise a ("crop", photo, top, left, side, size) or ("crop", "lfw_subset", index, size) ref."""
    if ref[1] == "lfw_subset":
        _, _, index, size = ref
        face = Image.fromarray(load_photo("lfw_subset")[index], mode="L").convert("RGB")
        return face.resize((size, size), Image.Resampling.BICUBIC)
    _, name, top, left, side, size = ref
    crop = _photo_image(name, size).crop((left, top, left + side, top + side))
    return crop if side == size else crop.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def _photo_crops(name: str, count: int, size: int, rng: np.random.Generator) -> list[tuple]:
    w, h = _photo_image(name, size).size  # also caches the image for forked encoder workers
    largest = min(h, w, round(size * MAX_ZOOM_OUT))
    # Log-uniform side lengths: as many zoomed-out views as close-ups.
    sides = np.rint(np.exp(rng.uniform(math.log(size), math.log(largest), count))).astype(int) if largest > size \
        else np.full(count, size)
    tops = (rng.random(count) * (h - sides + 1)).astype(int)
    lefts = (rng.random(count) * (w - sides + 1)).astype(int)
    return [("crop", name, int(top), int(left), int(side), size) for top, left, side in zip(tops, lefts, sides)]


def builtin_photo_items(size: int, crops_per_photo: int, val_fraction: float, test_fraction: float,
                        seed: int) -> tuple[dict[str, list[Item]], dict[str, list[str]]]:
    """Items per split, and which photos went to which split (for the manifest)."""
    if size < 8:
        raise ValueError(f"--size {size} is too small for the built-in photos (use 8 or more)")
    if crops_per_photo < 1:
        raise ValueError("--crops-per-photo must be at least 1")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    load_photo("lfw_subset")  # load now, so forked encoder workers inherit every photo already decoded
    photos = [(name, name) for name in PHOTOS] + [(f"lfw_{i:03d}", "lfw_subset") for i in range(NUM_FACES)]

    def assign(names: list[str]) -> dict[str, str]:
        order = rng.permutation(len(names))
        n_test = math.ceil(test_fraction * len(names)) if test_fraction > 0 else 0
        n_val = math.ceil(val_fraction * len(names)) if val_fraction > 0 else 0
        return {names[j]: ("test" if k < n_test else "val" if k < n_test + n_val else "train")
                for k, j in enumerate(order)}

    # Split big photos and faces separately so that each split gets some of both.
    split_of = assign(list(PHOTOS)) | assign([p for p, _ in photos[len(PHOTOS):]])
    items: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    members: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    index = 0
    for photo_id, origin in photos:
        split = split_of[photo_id]
        members[split].append(photo_id)
        if origin == "lfw_subset":
            refs = [("crop", "lfw_subset", int(photo_id[4:]), size)]
        else:
            refs = _photo_crops(origin, crops_per_photo, size, rng)
        for j, ref in enumerate(refs):
            items[split].append(Item(index, f"{photo_id}/{j}", None, split, ref))
            index += 1
    # Mix photos across shards: a shard (and so a resampled draw, or the first val batch) spans many photos.
    items = {s: [v[i] for i in rng.permutation(len(v))] for s, v in items.items()}
    return {s: v for s, v in items.items() if v}, {s: v for s, v in members.items() if v}
