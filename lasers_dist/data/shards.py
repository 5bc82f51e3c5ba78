"""Finding shards, reading manifests, and reading samples out of a tar stream.

A shard list can be given as a brace pattern (`train-{000000..000127}.tar`), a glob (`data/photos/train-*.tar`),
a manifest (`data/photos/train.json`, or its URL: the shards it lists, beside it), a single URL, or a list of
any of these. URLs may be local paths, `http(s)://`, `pipe:` commands or any other scheme WebDataset opens
(see `remote.py`). Sample counts per shard come from manifests (see `index.py`).

The members of a tar are iterated by WebDataset's own `tar_file_iterator`; grouping them into samples follows
WebDataset's convention (key = path up to the first dot of the file name, consecutive members with the same key
form one sample) and is done here, because the stream must know exactly how many samples a damaged shard gave
before the damage.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import IO, Callable, Iterator

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .remote import DEFAULT_TIMEOUT_S, NotFound, is_local, local_path, open_url, read_bytes

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes})


class ShardReadError(Exception):
    """A shard ended early or could not be opened; `samples_read` complete samples came before the damage."""

    def __init__(self, url: str, samples_read: int, cause: BaseException | str):
        cause = str(cause).split(" @ <", 1)[0]  # WebDataset appends the file object's repr to its errors
        super().__init__(f"{url}: damaged after {samples_read} samples ({cause})")
        self.url, self.samples_read, self.cause = url, samples_read, cause


def expand_urls(urls: str | os.PathLike | list, timeout: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Expand brace patterns, globs and manifests into a flat list of shard URLs (order kept)."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand(str(item)):
            if url.endswith(".json"):
                manifest = read_manifest(url, timeout)
                base = url.rsplit("/", 1)[0] + "/" if "/" in url else ""
                out += [base + s["name"] for s in manifest["shards"]]
            elif is_local(url) and glob.has_magic(url):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"no shard matches {url!r}; run lasers-shard first or fix the path")
                out += matches
            else:
                out.append(url)
    if not out:
        raise ValueError(f"no shards given ({urls!r})")
    for url in out:
        if is_local(url) and not os.path.exists(local_path(url)):
            raise FileNotFoundError(f"shard {url!r} does not exist; run lasers-shard first or fix the path")
    return out


def read_manifest(url: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """A manifest written by `lasers-shard` or `lasers-shard index`, from a path or any URL.

    Raises NotFound when there is none, ValueError when the file is not a manifest."""
    try:
        text = read_bytes(url, timeout)
    except NotFound:
        raise NotFound(f"manifest {url!r} does not exist") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest {url!r} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{url!r} is not a lasers-shard manifest (no 'shards' list)")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("num_samples"), int) or entry["num_samples"] < 0:
            raise ValueError(f"manifest {url!r}: every shard entry needs a 'name' and a 'num_samples' >= 0, "
                             f"got {entry!r}")
    return manifest


def manifest_counts(manifest: dict) -> dict[str, int]:
    """{shard name: samples} of a manifest."""
    return {s["name"]: int(s["num_samples"]) for s in manifest["shards"]}


def sample_key(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a tar member name, WebDataset's convention; None for names it skips."""
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext.lower())


def iter_samples(url: str, stop_after: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 opener: Callable[[str, float], IO[bytes]] = open_url) -> Iterator[Sample]:
    """Yield (key, {ext: bytes}) for consecutive members sharing a key; raises ShardReadError on damage.

    `stop_after` ends the read after that many samples, so a reader never pulls bytes it will not use.
    `opener(url, timeout)` opens the byte stream (the indexer wraps it to count and hash the bytes).
    """
    count = 0
    try:
        stream = opener(url, timeout)
    except (OSError, ValueError) as e:
        raise ShardReadError(url, 0, e) from e
    try:
        key, parts = None, {}
        for member in tar_file_iterator(stream):
            split = sample_key(member["fname"])
            if split is None:
                continue
            if split[0] != key and key is not None:
                yield key, parts
                count += 1
                if stop_after is not None and count >= stop_after:
                    return
                parts = {}
            key = split[0]
            parts[split[1]] = member["data"]
        if key is not None:
            yield key, parts
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # OSError includes socket timeouts
        raise ShardReadError(url, count, e) from e
    finally:
        try:
            stream.close()
        except OSError:
            pass  # a pipe: command that failed after we stopped reading; the samples read are fine

