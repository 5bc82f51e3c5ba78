"""`lasers-shard`: turn an image dataset into WebDataset tar shards plus a JSON manifest per split.

    lasers-shard SOURCE OUT_DIR [options]          folder, zip/tar, FFHQ, Oxford Flowers 102, CIFAR-10, MNIST
    lasers-shard --builtin photos OUT_DIR [options]  scikit-image photographs as random crops (no network)
    lasers-shard index PATTERN [--out FILE]        a manifest for shards written by any WebDataset tool

Writes OUT_DIR/{split}-000000.tar, ... and OUT_DIR/{split}.json. Rerunning the same command after an
interruption keeps the completed shards and continues. (A source folder named `index` is given as `./index`.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from lasers_dist.data.index import build_manifest, read_shards, write_manifest
from lasers_dist.data.remote import is_local, local_path, shard_name, split_prefix
from lasers_dist.data.shard_writer import write_builtin_photos, write_shards
from lasers_dist.data.shards import expand_urls
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


# ---- lasers-shard index ----------------------------------------------------------------------------------

INDEX_HELP = """Write the manifest that ShardStream reads (samples per shard, bytes, optional sha256) for WebDataset
shards written by any tool: local paths, http(s):// URLs, pipe: commands (e.g. 'pipe:aws s3 cp
s3://bucket/train-{000000..000999}.tar -'), gs://, ... Shards are read in parallel, end to end (counting
needs every tar header); damaged or unreadable shards are recorded with the reason, listed with the samples
readable before the damage. Quote patterns so that the shell does not expand them.

Without --out the manifest goes beside local shards as {split}.json (train-000012.tar -> train.json), where
the stream finds it by itself; for remote shards it goes to ./{split}.json: copy it beside the shards (the
stream looks for it through the same opener) or pass it as data.train_manifest / data.val_manifest."""


def build_index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lasers-shard index", description=INDEX_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="shards: brace pattern, glob, URL or pipe: command (several allowed)")
    p.add_argument("--out", default=None, help="manifest file to write (default: see above)")
    p.add_argument("--workers", type=int, default=16, help="shards read at once (default 16)")
    p.add_argument("--sha256", action="store_true", help="also record each shard's sha256")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a remote open or read may wait before the shard counts as unreadable (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _default_manifest_path(urls: list[str]) -> tuple[str, str]:
    """(manifest path, split name) when --out is not given."""
    splits = {split_prefix(shard_name(u)) for u in urls}
    folders = {os.path.dirname(local_path(u)) if is_local(u) else "remote" for u in urls}
    if len(splits) != 1 or len(folders) != 1:
        raise ValueError(f"the shards come from {len(folders)} folder(s) with {len(splits)} name prefix(es) "
                         f"({', '.join(sorted(splits)[:3])}); pass --out FILE")
    split, folder = splits.pop(), folders.pop()
    return (os.path.join(folder, f"{split}.json") if folder != "remote" else f"{split}.json"), split


def run_index(argv: list[str]) -> int:
    parser = build_index_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.timeout <= 0:
        parser.error("--workers must be >= 1 and --timeout > 0")
    try:
        urls = expand_urls(args.patterns, args.timeout)
        out, split = (args.out, split_prefix(shard_name(urls[0]))) if args.out else _default_manifest_path(urls)
        if os.path.exists(out) and "fingerprint" in json.loads(open(out).read() or "{}"):
            raise ValueError(f"{out} is the manifest lasers-shard wrote with these shards (it already lists their "
                             f"sample counts); pass --out to write another file")
    except (ValueError, OSError) as e:
        print(f"lasers-shard index: error: {e}", file=sys.stderr)
        return 2
    infos = read_shards(urls, sha256=args.sha256, workers=args.workers, timeout=args.timeout,
                        progress=not args.no_progress)
    try:
        manifest = build_manifest(infos, split, args.patterns)
    except ValueError as e:
        print(f"lasers-shard index: error: {e}", file=sys.stderr)
        return 2
    write_manifest(manifest, out)
    damaged = manifest["damaged"]
    print(f"{split}: {manifest['num_samples']} samples in {len(urls)} shards, {len(damaged)} damaged or unreadable "
          f"-> {out}")
    for entry in damaged[:10]:
        print(f"       {entry['name']}: {entry['reason']} ({entry['num_samples']} samples readable)")
    if len(damaged) > 10:
        print(f"       ... and {len(damaged) - 10} more (see 'damaged' in {out})")
    if not is_local(urls[0]) and not args.out:
        print(f"copy {out} beside the shards (as {split}.json) or pass data.train_manifest={out}")
    if manifest["num_samples"] == 0:
        print("lasers-shard index: error: no sample could be read from any shard", file=sys.stderr)
        return 1
    return 0


# ---- entry point ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["index"]:
        return run_index(argv[1:])
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
