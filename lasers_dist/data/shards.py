"""Finding shards, their sample counts, and reading samples out of a tar stream.

A shard list can be given as a brace pattern (`train-{000000..000127}.tar`), a glob (`data/photos/train-*.tar`),
a manifest path (`data/photos/train.json`), a single URL, or a list of any of these. Sample counts come from the
manifest that `lasers-shard` writes beside the shards (`{split}.json`); shards without one are counted by
reading their tar headers once.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import IO, Iterator

from braceexpand import braceexpand

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


class ShardReadError(Exception):
    """A shard ended early or could not be opened; `samples_read` complete samples came before the damage."""

    def __init__(self, url: str, samples_read: int, cause: BaseException | str):
        super().__init__(f"{url}: damaged after {samples_read} samples ({cause})")
        self.url, self.samples_read = url, samples_read


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand_urls(urls: str | os.PathLike | list) -> list[str]:
    """Expand brace patterns, globs and manifest paths into a flat list of shard URLs (order kept)."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand(str(item)):
            if url.endswith(".json") and _is_local(url):
                manifest = _read_manifest(url)
                base = os.path.dirname(url)
                out += [os.path.join(base, s["name"]) for s in manifest["shards"]]
            elif _is_local(url) and any(c in url for c in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"no shard matches {url!r}; run lasers-shard first or fix the path")
                out += matches
            else:
                out.append(url)
    if not out:
        raise ValueError(f"no shards given ({urls!r})")
    for url in out:
        if _is_local(url) and not os.path.exists(_local_path(url)):
            raise FileNotFoundError(f"shard {url!r} does not exist; run lasers-shard first or fix the path")
    return out


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"manifest {path!r} is not valid JSON: {e}") from e
    if "shards" not in manifest:
        raise ValueError(f"{path!r} is not a lasers-shard manifest (no 'shards' list)")
    return manifest


def _manifest_path(url: str) -> str:
    # train-000012.tar -> train.json in the same folder
    head, name = os.path.split(url)
    return os.path.join(head, name.rsplit("-", 1)[0] + ".json")


def sample_counts(urls: list[str]) -> list[int]:
    """Samples per shard, from the manifests beside the shards, else by reading each shard once."""
    manifests: dict[str, dict[str, int] | None] = {}
    counts = []
    for url in urls:
        mpath = _manifest_path(url)
        if mpath not in manifests:
            manifests[mpath] = None
            if _is_local(mpath) and os.path.exists(_local_path(mpath)):
                shards = _read_manifest(_local_path(mpath))["shards"]
                manifests[mpath] = {s["name"]: int(s["num_samples"]) for s in shards}
        known = manifests[mpath]
        name = os.path.basename(url)
        if known is not None and name in known:
            counts.append(known[name])
        else:
            counts.append(count_samples(url))
    return counts


def count_samples(url: str) -> int:
    """Number of samples in one shard, reading it through (damage ends the count)."""
    n = 0
    try:
        for _ in iter_samples(url):
            n += 1
    except ShardReadError as e:
        return e.samples_read
    return n


def _open(url: str) -> IO[bytes]:
    if _is_local(url):
        return open(_local_path(url), "rb", buffering=1 << 20)
    import webdataset

    return webdataset.gopen(url, "rb")


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset convention: key = folder + basename up to its first dot; the rest is the extension.
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(url: str, stop_after: int | None = None) -> Iterator[Sample]:
    """Yield (key, {ext: bytes}) for consecutive members sharing a key; raises ShardReadError on damage.

    `stop_after` ends the read after that many samples, so a reader never pulls bytes it will not use.
    """
    count = 0
    try:
        stream = _open(url)
    except OSError as e:
        raise ShardReadError(url, 0, e) from e
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            key, parts = None, {}
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key and key is not None:
                    yield key, parts
                    count += 1
                    if stop_after is not None and count >= stop_after:
                        return
                    parts = {}
                key = k
                parts[ext] = tf.extractfile(member).read()
            if key is not None:
                yield key, parts
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ShardReadError(url, count, e) from e
