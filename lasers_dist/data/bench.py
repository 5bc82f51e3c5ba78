"""`lasers-bench data`: decoded images per second per DataLoader worker, for PNG and JPEG shards.

Builds shards of the built-in photos at the chosen size (once, in --work-dir), then times ShardStream
end to end (tar read, decode, crop + flip, float batch) with 0 workers (in-process: the pure per-worker
rate) and with the requested worker counts. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from .shard_writer import write_builtin_photos
from .stream import ShardStream


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lasers-bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--formats", nargs="+", choices=["png", "jpeg"], default=["png", "jpeg"])
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the bench shards (default 90)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader worker counts to time (default: 0 2)")
    p.add_argument("--images", type=int, default=1024, help="decoded images timed per configuration")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--crops-per-photo", type=int, default=16, help="size of the bench dataset")
    p.add_argument("--work-dir", default=None, help="where the bench shards go (default: a temporary folder)")
    p.add_argument("--out", default="bench_results/data.json", help="JSON output (default bench_results/data.json)")
    return p.parse_args(argv)


def _time_stream(shards: str, size: int, batch_size: int, workers: int, images: int) -> dict:
    batches = max(2, images // batch_size)
    stream = ShardStream(shards, batch_size=batch_size, image_size=size, mode="resampled", train=True,
                         num_workers=workers, batches_per_epoch=batches + 1, shuffle_buffer=64, pin_memory=False)
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


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lasers-bench-data-")
    work = Path(args.work_dir or tmp.name)
    rows = []
    try:
        for fmt in args.formats:
            folder = work / f"{fmt}-{args.size}"
            manifest = write_builtin_photos(folder, size=args.size, crops_per_photo=args.crops_per_photo,
                                            val_fraction=0.0, image_format=fmt, quality=args.quality,
                                            max_count=64, workers=min(8, os.cpu_count() or 1))["train"]
            mean_bytes = sum(s["num_bytes"] for s in manifest["shards"]) / manifest["num_samples"]
            for workers in args.workers:
                result = _time_stream(str(folder / "train-*.tar"), args.size, args.batch_size, workers, args.images)
                rows.append({"format": fmt, "size": args.size, "workers": workers,
                             "bytes_per_image": round(mean_bytes), **result})
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = {"benchmark": "data", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                "torch": torch.__version__},
              "note": "workers=0 decodes in the main process with 1 torch thread, like one DataLoader worker: "
                      "its rate is the per-worker rate; rates on a shared CPU are noisy", "results": rows}
    print(f"{'format':6s} {'size':>5s} {'workers':>7s} {'KB/img':>7s} {'img/s':>8s} {'img/s/worker':>13s} "
          f"{'img/cpu-s':>10s}")
    for r in rows:
        cpu = f"{r['images_per_cpu_s']:10.1f}" if "images_per_cpu_s" in r else f"{'-':>10s}"
        print(f"{r['format']:6s} {r['size']:5d} {r['workers']:7d} {r['bytes_per_image'] / 1000:7.1f} "
              f"{r['images_per_s']:8.1f} {r['images_per_s_per_worker']:13.1f} {cpu}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return report
