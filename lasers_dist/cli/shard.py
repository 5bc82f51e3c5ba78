"""`lasers-shard`: turn an image dataset into WebDataset tar shards plus a JSON manifest per split.

    lasers-shard SOURCE OUT_DIR [options]          folder, zip/tar, FFHQ, Oxford Flowers 102, CIFAR-10, MNIST
    lasers-shard --builtin photos OUT_DIR [options]  scikit-image photographs as random crops (no network)

Writes OUT_DIR/{split}-000000.tar, ... and OUT_DIR/{split}.json. Rerunning the same command after an
interruption keeps the completed shards and continues.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from lasers_dist.data.shard_writer import write_builtin_photos, write_shards
from lasers_dist.data.sources import KINDS

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """'500MB', '1GiB', '2000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; use e.g. 500MB, 1GB or 2000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lasers-shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="SOURCE OUT_DIR",
                   help="the source and the output folder (only OUT_DIR with --builtin)")
    p.add_argument("--builtin", choices=["photos"], help="build a built-in dataset instead of reading SOURCE")
    p.add_argument("--kind", choices=KINDS, help="force the kind of source instead of detecting it")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int,
                      help="output side: resize the shorter side, then center crop (builtin: crop size, default 64)")
    size.add_argument("--keep-size", action="store_true", help="keep each image's original size (the default "
                      "for sources; not allowed with --builtin)")
    p.add_argument("--format", choices=["png", "jpeg"], default="png", help="PNG (lossless, default) or JPEG")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--max-count", type=int, default=None,
                   help="samples per shard (default 1000; builtin 128)")
    p.add_argument("--max-bytes", type=parse_bytes, default=None,
                   help="approximate bytes per shard, e.g. 500MB (default: no limit)")
    p.add_argument("--split", choices=["official", "fraction"], default=None,
                   help="the source's official split or a seeded split by fraction (default: official when "
                        "the source has one and no fraction is given)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction for val (default 0.05; builtin 0.15 of the photos)")
    p.add_argument("--test-fraction", type=float, default=None, help="fraction for test (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and split (default 0)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="encoder processes (default: CPU count, at most 8)")
    p.add_argument("--crops-per-photo", type=int, default=200,
                   help="builtin: random crops per photograph (default 200; LFW faces give one each)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards that OUT_DIR holds from another source or other options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    common = dict(image_format=args.format, quality=args.quality, max_bytes=args.max_bytes, seed=args.seed,
                  workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite)
    if args.builtin:
        if len(args.paths) != 1:
            parser.error("with --builtin give only OUT_DIR")
        if args.keep_size or args.kind or args.split:
            parser.error("--keep-size, --kind and --split do not apply to --builtin")
        return write_builtin_photos(
            args.paths[0], size=args.size or 64, crops_per_photo=args.crops_per_photo,
            val_fraction=0.15 if args.val_fraction is None else args.val_fraction,
            test_fraction=args.test_fraction or 0.0, max_count=args.max_count or 128, **common)
    if len(args.paths) != 2:
        parser.error("give SOURCE and OUT_DIR (or --builtin photos OUT_DIR)")
    return write_shards(args.paths[0], args.paths[1], kind=args.kind, size=args.size, max_count=args.max_count or 1000,
                        split=args.split, val_fraction=args.val_fraction, test_fraction=args.test_fraction, **common)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        manifests = _run(args, parser)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"lasers-shard: error: {e}", file=sys.stderr)
        return 2
    out_dir = args.paths[-1]
    for split, m in manifests.items():
        size = f"{m['image_size']}px" if m["image_size"] else "original size"
        print(f"{split:5s}: {m['num_samples']:7d} samples in {len(m['shards']):4d} shards ({size}), "
              f"{len(m['skipped'])} skipped -> {os.path.join(out_dir, split)}-*.tar, {split}.json")
        for s in m["skipped"][:5]:
            print(f"       skipped {s['source']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
