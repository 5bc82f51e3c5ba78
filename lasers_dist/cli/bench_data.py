"""`lasers-bench data`: decoded images per second per DataLoader worker, and the workers a GPU step needs.

    lasers-bench data [--size 1024] [--formats jpeg png] [--workers 0 2] [--step-ms 250 500 1000]
    lasers-bench data --startup [--startup-shards 1000]

Rates: builds shards of photo crops at the chosen size (the photos that ship with scikit-image, resized, plus
a little Gaussian grain so that file sizes resemble camera photos: JPEG quality --quality), then times
ShardStream end to end (tar read, decode, crop + flip, float batch) with 0 workers (in-process, one torch thread:
the pure per-worker rate) and with the requested worker counts. Also times each installed JPEG decoder alone
on the same files. From the per-worker rate it derives how many DataLoader workers keep up with a GPU step of
--step-ms milliseconds at --gpu-batch images per GPU.

--startup: time from constructing the stream to its first batch with --startup-shards small local shards, with
their manifest and without (then every shard is read once to count its samples).

Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lasers_dist.data.shard_writer import ShardOptions, write_split
from lasers_dist.data.sources import Item
from lasers_dist.data.stream import ShardStream


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lasers-bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--formats", nargs="+", choices=["png", "jpeg"], default=["png", "jpeg"])
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the bench shards (default 95)")
    p.add_argument("--grain", type=float, default=3.0,
                   help="std of the Gaussian grain added to the resized photos, in grey levels (default 3)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader worker counts to time (default: 0 2)")
    p.add_argument("--images", type=int, default=None,
                   help="decoded images timed per configuration (default: 1024, 256 from 512 px up)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32, 8 from 512 px up")
    p.add_argument("--num-photos", type=int, default=None,
                   help="distinct images in the bench shards (default: 128, 48 from 512 px up)")
    p.add_argument("--step-ms", type=float, nargs="+", default=[250.0, 500.0, 1000.0],
                   help="GPU step times to size the worker count for (default: 250 500 1000)")
    p.add_argument("--gpu-batch", type=int, default=2, help="images per GPU per step (default 2, as at 1024^2)")
    p.add_argument("--startup", action="store_true", help="time to the first batch instead (see above)")
    p.add_argument("--startup-shards", type=int, default=1000, help="shards for --startup (default 1000)")
    p.add_argument("--work-dir", default=None, help="where the bench shards go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON output (default bench_results/data.json, "
                                               "bench_results/data_startup.json with --startup)")
    args = p.parse_args(argv)
    large = args.size >= 512
    args.images = args.images or (256 if large else 1024)
    args.batch_size = args.batch_size or (8 if large else 32)
    args.num_photos = args.num_photos or (48 if large else 128)
    args.out = args.out if args.out is not None else \
        ("bench_results/data_startup.json" if args.startup else "bench_results/data.json")
    return args


# ---- the bench data ---------------------------------------------------------------------------------------

def bench_items(size: int, count: int, grain: float, seed: int = 0) -> list[Item]:
    """`count` (size, size, 3) uint8 crops of the built-in colour photos, resized, with Gaussian grain."""
    from lasers_dist.data.builtin import COLOR_PHOTOS, load_photo

    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        photo = load_photo(COLOR_PHOTOS[i % len(COLOR_PHOTOS)])
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(crop, dtype=np.float32)
        if grain > 0:
            pixels = pixels + rng.normal(0.0, grain, pixels.shape).astype(np.float32)
        items.append(Item(i, f"bench{i}", None, None, ("pixels", np.clip(np.rint(pixels), 0, 255).astype(np.uint8))))
    return items


def _build_shards(folder: Path, items: list[Item], image_format: str, quality: int) -> dict:
    manifest_path = folder / "train.json"
    if manifest_path.is_file():  # a --work-dir kept from an earlier run with the same settings
        return json.loads(manifest_path.read_text())
    return write_split(items, folder, "train", ShardOptions(None, image_format, quality, 16),
                       source_info={"path": "bench"}, workers=min(4, os.cpu_count() or 1))


# ---- rates ----------------------------------------------------------------------------------------------

def _time_stream(shards: str, size: int, batch_size: int, workers: int, images: int) -> dict:
    batches = max(2, images // batch_size)
    stream = ShardStream(shards, batch_size=batch_size, image_size=size, mode="resampled", train=True,
                         num_workers=workers, batches_per_epoch=batches + 1, shuffle_buffer=16, pin_memory=False)
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # what torch gives each DataLoader worker
    try:
        it = iter(stream)
        next(it)  # worker start-up and the first shard open are not part of the rate
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.set_num_threads(threads)
        stream.close()
    rate = batches * batch_size / seconds
    result = {"images": batches * batch_size, "seconds": round(seconds, 3), "images_per_s": round(rate, 1),
              "images_per_s_per_worker": round(rate / max(1, workers), 1)}
    if workers == 0:  # all the work ran in this process: its CPU time gives a rate less hurt by other load
        result["images_per_cpu_s"] = round(batches * batch_size / cpu_seconds, 1)
    return result


def _jpeg_decoders() -> dict:
    """Every JPEG decoder that imports here: name -> bytes -> (H, W, 3) uint8."""
    from lasers_dist.data.augment import jpeg_decoders

    def pillow(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))

    return {"pillow": pillow, **jpeg_decoders()}


def _time_decoders(items: list[Item], quality: int, images: int) -> list[dict]:
    """Decode alone (no tar, crop or batch), one thread: images/s per JPEG decoder on the bench images."""
    blobs = []
    for item in items[:16]:
        buf = io.BytesIO()
        Image.fromarray(item.ref[1]).save(buf, format="JPEG", quality=quality)
        blobs.append(buf.getvalue())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, decode in _jpeg_decoders().items():
            decode(blobs[0])
            start = time.perf_counter()
            for i in range(images):
                decode(blobs[i % len(blobs)])
            rows.append({"decoder": name, "images_per_s": round(images / (time.perf_counter() - start), 1)})
    finally:
        torch.set_num_threads(threads)
    return rows


def workers_needed(per_worker: float, step_ms: float, gpu_batch: int) -> int:
    """DataLoader workers that decode `gpu_batch` images within one GPU step of `step_ms`."""
    return max(1, math.ceil(gpu_batch / (step_ms / 1000.0) / per_worker))


def run_rates(args: argparse.Namespace, work: Path) -> dict:
    from lasers_dist.data.augment import JPEG_DECODER

    items = bench_items(args.size, args.num_photos, args.grain)
    rows = []
    for fmt in args.formats:
        folder = work / f"{fmt}-{args.size}-q{args.quality}-g{args.grain:g}-n{args.num_photos}"
        manifest = _build_shards(folder, items, fmt, args.quality)
        mean_bytes = sum(s["num_bytes"] for s in manifest["shards"]) / manifest["num_samples"]
        for workers in args.workers:
            result = _time_stream(str(folder / "train.json"), args.size, args.batch_size, workers, args.images)
            rows.append({"format": fmt, "size": args.size, "workers": workers, "bytes_per_image": round(mean_bytes),
                         **result})
    decoders = _time_decoders(items, args.quality, max(16, args.images // 4)) if "jpeg" in args.formats else []
    sizing = []
    for fmt in args.formats:
        single = next((r for r in rows if r["format"] == fmt and r["workers"] == 0), None)
        if single is not None:
            per_worker = single.get("images_per_cpu_s", single["images_per_s"])
            sizing.append({"format": fmt, "images_per_s_per_worker": per_worker, "gpu_batch": args.gpu_batch,
                           "workers_needed": {f"{ms:g}": workers_needed(per_worker, ms, args.gpu_batch)
                                              for ms in args.step_ms}})
    print(f"{'format':6s} {'size':>5s} {'workers':>7s} {'KB/img':>7s} {'img/s':>8s} {'img/s/worker':>13s} "
          f"{'img/cpu-s':>10s}")
    for r in rows:
        cpu = f"{r['images_per_cpu_s']:10.1f}" if "images_per_cpu_s" in r else f"{'-':>10s}"
        print(f"{r['format']:6s} {r['size']:5d} {r['workers']:7d} {r['bytes_per_image'] / 1000:7.1f} "
              f"{r['images_per_s']:8.1f} {r['images_per_s_per_worker']:13.1f} {cpu}")
    if decoders:
        print(f"JPEG decode alone, one thread ({args.size}^2, q{args.quality}; the stream uses {JPEG_DECODER}): "
              + ", ".join(f"{d['decoder']} {d['images_per_s']:.1f} img/s" for d in decoders))
    for s in sizing:
        need = ", ".join(f"{ms} ms -> {n}" for ms, n in s["workers_needed"].items())
        print(f"{s['format']}: DataLoader workers per GPU for a step of ({s['gpu_batch']} images/GPU): {need}")
    return {"benchmark": "data", "jpeg_decoder": JPEG_DECODER, "grain": args.grain, "quality": args.quality,
            "note": "workers=0 decodes in the main process with 1 torch thread, like one DataLoader worker: its "
                    "rate (per CPU second) is the per-worker rate; workers needed = ceil(gpu_batch / step time / "
                    "per-worker rate), assuming one free CPU core per worker; rates on a shared CPU are noisy",
            "results": rows, "decoders": decoders, "workers_needed": sizing}


# ---- start-up -------------------------------------------------------------------------------------------

def run_startup(args: argparse.Namespace, work: Path) -> dict:
    folder = work / f"startup-{args.startup_shards}"
    items = [Item(i, f"s{i}", None, None, ("pixels", np.full((16, 16, 3), i % 251, np.uint8)))
             for i in range(args.startup_shards * 4)]
    if not (folder / "train.json").is_file():
        write_split(items, folder, "train", ShardOptions(None, "png", 95, 4), source_info={"path": "bench-startup"})
    bare = work / f"startup-{args.startup_shards}-no-manifest"
    if not bare.is_dir():
        shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("*.json"))
    rows = []
    for label, pattern in (("manifest", folder / "train-*.tar"), ("no manifest", bare / "train-*.tar")):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-manifest warning is the point here, not news
            stream = ShardStream(str(pattern), batch_size=8, image_size=16, mode="resampled", num_workers=2,
                                 batches_per_epoch=10, shuffle_buffer=8, pin_memory=False)
        built = time.perf_counter()
        next(iter(stream))
        first = time.perf_counter()
        stream.close()
        rows.append({"shards": args.startup_shards, "counts_from": label,
                     "construct_s": round(built - start, 3), "first_batch_s": round(first - start, 3)})
    print(f"{'counts from':12s} {'shards':>7s} {'construct s':>12s} {'first batch s':>14s}")
    for r in rows:
        print(f"{r['counts_from']:12s} {r['shards']:7d} {r['construct_s']:12.3f} {r['first_batch_s']:14.3f}")
    return {"benchmark": "data-startup", "note": "time from ShardStream(...) to its first batch (2 DataLoader "
            "workers); without a manifest every shard is read once (16 threads) to count its samples",
            "results": rows}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lasers-bench-data-")
    work = Path(args.work_dir or tmp.name)
    try:
        report = run_startup(args, work) if args.startup else run_rates(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return report
