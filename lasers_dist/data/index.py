"""Sample counts per shard: from manifests, or by reading the shards once, in parallel.

The stream needs every shard's sample count before it reads anything (its sample orders are computed from
them, see `order.py`). They come from, in this order:
  1. an explicit manifest (`data.train_manifest`: a path or URL),
  2. the `{split}.json` manifest beside the shards, looked up through the shards' own opener (so
     `http://host/d/train-000000.tar` finds `http://host/d/train.json`),
  3. reading the shards that no manifest lists, once, in parallel threads (a warning says how to write a
     manifest instead: `lasers-shard index PATTERN`).
`lasers-shard index` writes such a manifest for shards written by any WebDataset tool, local or remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable

from .remote import DEFAULT_TIMEOUT_S, NotFound, is_local, local_path, manifest_url, open_url, shard_name
from .shards import ShardReadError, expand_urls, iter_samples, manifest_counts, read_manifest

MANIFEST_VERSION = 1
_BLOCK = 512  # tar block; a complete archive ends with zero blocks (its end-of-archive marker)


class CountWarning(UserWarning):
    """Shards had to be read to count their samples (no manifest lists them)."""


@dataclass
class ShardInfo:
    """What reading one shard found. `error` is set when the shard is damaged or unreadable; `num_samples`
    then counts the complete samples before the damage."""

    url: str
    name: str
    num_samples: int = 0
    num_bytes: int = 0
    sha256: str | None = None
    error: str | None = None


class _CountingReader:
    """Wraps a binary stream: counts (and optionally hashes) the bytes read through it. `close()` is left to
    the owner (`really_close`), which first reads the padding after the tar's end marker into the hash."""

    def __init__(self, stream: IO[bytes], digest: "hashlib._Hash | None"):
        self.stream, self.digest, self.num_bytes, self.tail = stream, digest, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.num_bytes += len(data)
        self.tail = data[-_BLOCK:] if len(data) >= _BLOCK else (self.tail + data)[-_BLOCK:]
        if self.digest is not None:
            self.digest.update(data)
        return data

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass  # a pipe: command that exited non-zero: the read already failed or succeeded on its own terms


def read_shard(url: str, sha256: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> ShardInfo:
    """Read one shard end to end: samples (the stream's own grouping rules), bytes, optional sha256."""
    info = ShardInfo(url, shard_name(url))
    digest = hashlib.sha256() if sha256 else None
    reader: list[_CountingReader] = []

    def opener(u: str, t: float) -> _CountingReader:
        reader.append(_CountingReader(open_url(u, t), digest))
        return reader[0]

    try:
        for _ in iter_samples(url, timeout=timeout, opener=opener):
            info.num_samples += 1
        while reader[0].read(1 << 20):  # the padding after the end marker belongs to the file's size and hash
            pass
        if reader[0].tail.strip(b"\0"):
            # tarfile takes a file cut at a member boundary for a complete one; the missing end marker tells.
            info.error = f"no end-of-archive marker after {info.num_samples} samples: the file is truncated"
    except ShardReadError as e:
        info.num_samples, info.error = e.samples_read, e.cause
    except OSError as e:
        info.error = str(e)
    finally:
        if reader:
            reader[0].really_close()
    if reader:
        info.num_bytes = reader[0].num_bytes
        info.sha256 = digest.hexdigest() if digest is not None and info.error is None else None
    return info


def read_shards(urls: list[str], *, sha256: bool = False, workers: int = 8, timeout: float = DEFAULT_TIMEOUT_S,
                progress: bool = False) -> list[ShardInfo]:
    """`read_shard` for every URL, `workers` at a time (threads: the work is I/O, tar parsing and hashing,
    which release the GIL for large buffers). Results in the order of `urls`."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, min(workers, len(urls)))) as pool, \
            tqdm(total=len(urls), desc="shards", unit="shard", disable=not progress) as bar:
        def one(url: str) -> ShardInfo:
            try:
                return read_shard(url, sha256, timeout)
            finally:
                bar.update(1)

        return list(pool.map(one, urls))


# ---- counts for the stream ----------------------------------------------------------------------------


@dataclass
class ShardCounts:
    """Samples per shard of a shard list, and where they came from."""

    counts: list[int]
    manifests: list[str] = field(default_factory=list)  # manifests that were used
    counted: list[str] = field(default_factory=list)  # shards read to count them
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> what reading it found (counted shards)
    seconds: float = 0.0  # time spent reading shards to count them


def _manifest_table(url: str, timeout: float, explicit: bool) -> dict[str, int] | None:
    try:
        return manifest_counts(read_manifest(url, timeout))
    except NotFound:
        if explicit:
            raise FileNotFoundError(f"manifest {url} does not exist (check data.*_manifest)") from None
        return None
    except OSError as err:
        raise OSError(f"could not look up the shards' manifest ({err}); is the server up and the URL right?") \
            from None


def lookup_counts(urls: list[str], manifest: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                  workers: int = 16, pattern: str | None = None) -> ShardCounts:
    """Sample counts of `urls` from `manifest` (if given), else from each shard's `{split}.json`; shards that
    no manifest lists are read once, in parallel, with a CountWarning (`pattern` makes its hint exact).

    A manifest that answers with an error other than "not found" is an error: silently reading a whole data
    set instead could take hours."""
    found = ShardCounts([0] * len(urls))
    tables: dict[str, dict[str, int] | None] = {}
    if manifest:
        tables[manifest] = _manifest_table(manifest, timeout, explicit=True)
        found.manifests.append(manifest)
    missing = []
    for i, url in enumerate(urls):
        name = shard_name(url)
        candidates = [manifest] if manifest else []
        beside = manifest_url(url)
        if beside is not None and not manifest:
            candidates.append(beside)
        for where in candidates:
            if where not in tables:
                tables[where] = _manifest_table(where, timeout, explicit=False)
                if tables[where] is not None:
                    found.manifests.append(where)
            table = tables[where]
            if table is not None and name in table:
                found.counts[i] = table[name]
                break
        else:
            missing.append(i)
    if missing:
        start = time.perf_counter()
        infos = read_shards([urls[i] for i in missing], workers=workers, timeout=timeout)
        found.seconds = time.perf_counter() - start
        for i, info in zip(missing, infos):
            found.counts[i] = info.num_samples
            found.counted.append(urls[i])
            if info.error:
                found.damaged[urls[i]] = info.error
        warnings.warn(_count_warning(found, len(urls), pattern), CountWarning, stacklevel=2)
    return found


def _count_warning(found: ShardCounts, total: int, pattern: str | None) -> str:
    first = found.counted[0]
    spec = pattern or first
    out = "OUT.json" if not is_local(first) else os.path.join(os.path.dirname(local_path(first)) or ".",
                                                               "SPLIT.json")
    text = (f"no manifest lists {len(found.counted)} of {total} shards (first: {first}); they were read once to "
            f"count their samples ({found.seconds:.1f} s). To skip this next time write a manifest: "
            f"lasers-shard index '{spec}' --out {out}, and put it beside the shards as {{split}}.json or pass it "
            f"as data.train_manifest / data.val_manifest")
    if found.damaged:
        shown = "; ".join(f"{shard_name(u)}: {why}" for u, why in list(found.damaged.items())[:3])
        text += f". {len(found.damaged)} shard(s) are damaged or unreadable ({shown})"
    return text


def shared_shard_lists(specs: dict[str, tuple[str, str]], *, rank: int, broadcast: Callable[[object], object],
                       timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, tuple[list[str], list[int]]]:
    """{name: (shard URLs, samples per shard)} for each {name: (pattern, manifest or "")} with a pattern, looked up
    on rank 0 only and handed to every rank by `broadcast` (rank 0's object on every rank; a collective, so
    every rank calls this). No other rank, and nothing later in the job, reads a shard just to count it. An error
    on rank 0 is raised on every rank, instead of leaving the others waiting in the broadcast."""
    found: dict | str = {}
    error: Exception | None = None
    if rank == 0:
        try:
            for name, (pattern, manifest) in specs.items():
                if pattern:
                    urls = expand_urls(pattern, timeout)
                    found[name] = (urls, lookup_counts(urls, manifest or None, timeout=timeout, pattern=pattern).counts)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it
            error, found = err, f"{type(err).__name__}: {err}"
    found = broadcast(found)
    if error is not None:
        raise error
    if isinstance(found, str):
        raise RuntimeError(f"rank {rank}: rank 0 could not list the shards and their sample counts: {found}")
    return found


def sample_counts(urls: list[str], manifest: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """Samples per shard (see `lookup_counts`)."""
    return lookup_counts(urls, manifest, timeout=timeout).counts


# ---- manifests for foreign shards (`lasers-shard index`) -----------------------------------------------


def build_manifest(infos: Iterable[ShardInfo], split: str, patterns: list[str]) -> dict:
    """The manifest format the stream reads (the same keys `lasers-shard` writes, where they apply).

    Damaged shards stay listed with the samples that can be read before the damage (unreadable ones with 0),
    so the stream's orders use exactly what is there; `damaged` says what was wrong with each."""
    infos = list(infos)
    shards = []
    for info in infos:
        entry = {"name": info.name, "num_samples": info.num_samples, "num_bytes": info.num_bytes}
        if info.sha256:
            entry["sha256"] = info.sha256
        shards.append(entry)
    names = [s["name"] for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several shards share the name(s) {duplicates[:3]}: a manifest lists shards by file "
                         f"name, so index each folder on its own")
    return {
        "format_version": MANIFEST_VERSION,
        "split": split,
        "complete": True,
        "indexed_from": patterns,
        "image_size": None,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_classes": None,
        "shards": shards,
        "damaged": [{"name": i.name, "url": i.url, "num_samples": i.num_samples, "reason": i.error}
                    for i in infos if i.error],
        "skipped": [],
    }


def write_manifest(manifest: dict, path: str) -> None:
    """Write atomically (a reader never sees half a manifest)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
