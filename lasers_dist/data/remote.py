"""Opening shard and manifest URLs: local paths, http(s) with timeouts, anything else through WebDataset.

    local paths and file://   opened directly
    http:// and https://      urllib with a per-operation timeout and a few retries on transient failures
                              (WebDataset's curl opener retries 30 times and has no read timeout: a server that
                              stops answering would hang a DataLoader worker for good)
    pipe:COMMAND              WebDataset's gopen (e.g. `pipe:aws s3 cp s3://bucket/train-000000.tar -`)
    gs://, hf://, ais://, ... WebDataset's gopen

A shard's *name* (what manifests list) is the basename of its file: the path's last segment for URLs, and for a
`pipe:` command the basename of the word that names the tar file. The manifest of `.../train-000012.tar` is
`.../train.json`, found by replacing that name, so it is looked up through the same opener as the shards.
"""

from __future__ import annotations

import os
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO

DEFAULT_TIMEOUT_S = 60.0
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_SHARD_NUMBER = re.compile(r"^(?P<prefix>.*?)[-_.]?\d+\.tar$")


class NotFound(OSError):
    """The URL answered that there is nothing there for us (HTTP 403/404/410, a missing local file)."""


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def open_url(url: str, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 3) -> IO[bytes]:
    """A binary file object reading `url` from its start. Raises NotFound or OSError naming the URL."""
    if is_local(url) or url.startswith("file://"):
        try:
            return open(local_path(url), "rb", buffering=1 << 20)
        except FileNotFoundError:
            raise NotFound(f"{url}: no such file") from None
    if url.startswith(("http://", "https://")):
        return _open_http(url, timeout, retries)
    import webdataset

    return webdataset.gopen(url, "rb")


def _open_http(url: str, timeout: float, retries: int) -> IO[bytes]:
    request = urllib.request.Request(url, headers={"User-Agent": "lasers-dist"})
    reason = ""
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))  # 0.5 s, 1 s, 2 s, ...
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code in (403, 404, 410):  # object stores answer 403 for a missing key one may not list
                raise NotFound(f"{url}: HTTP {err.code} {err.reason}") from None
            if err.code not in _RETRY_STATUS:
                raise OSError(f"{url}: HTTP {err.code} {err.reason}") from None
            reason = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            cause = getattr(err, "reason", err)
            reason = "no answer within the timeout" if isinstance(cause, TimeoutError) else str(cause)
    raise OSError(f"{url}: {reason} ({max(1, retries)} tries, {timeout:g} s timeout each)")


def read_bytes(url: str, timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
    """The whole content of a (small) file at `url`. A `pipe:` command that fails counts as NotFound (its exit
    status cannot tell a missing object from other trouble)."""
    try:
        stream = open_url(url, timeout)
        try:
            data = stream.read()
        finally:
            stream.close()  # webdataset's Pipe raises here (or in read) when the command exited non-zero
    except NotFound:
        raise
    except OSError as err:
        if url.startswith("pipe:"):
            raise NotFound(f"{url}: {err}") from None
        raise
    if url.startswith("pipe:") and not data:
        raise NotFound(f"{url}: the command printed nothing")
    return data


def _pipe_target(command: str) -> str | None:
    """The word of a `pipe:` command that names the tar file (the last one containing '.tar')."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    found = [w for w in words if ".tar" in w]
    return found[-1] if found else None


def shard_name(url: str) -> str:
    """The file name of a shard, e.g. 'train-000012.tar', whatever opener reads it."""
    if url.startswith("pipe:"):
        target = _pipe_target(url[len("pipe:"):])
        return target.rstrip("/").rsplit("/", 1)[-1] if target else url
    if not is_local(url):
        return urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(local_path(url))


def sibling_url(url: str, name: str) -> str | None:
    """The URL of file `name` in the same folder as shard `url`, read the same way (None when it cannot be
    derived, e.g. a `pipe:` command that names no tar file)."""
    if url.startswith("pipe:"):
        target = _pipe_target(url[len("pipe:"):])
        if target is None:
            return None
        head = target.rsplit("/", 1)[0] + "/" if "/" in target else ""
        return url.replace(target, head + name)
    if not is_local(url):
        parts = urllib.parse.urlsplit(url)
        folder = parts.path.rsplit("/", 1)[0]
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{folder}/{name}", "", ""))
    return os.path.join(os.path.dirname(url), name)


def split_prefix(name: str) -> str:
    """'train-000012.tar' -> 'train' (the split's manifest is 'train.json'); names without a number keep
    everything before '.tar'."""
    match = _SHARD_NUMBER.match(name)
    return match.group("prefix") if match and match.group("prefix") else name.rsplit(".tar", 1)[0]


def manifest_url(url: str) -> str | None:
    """Where the manifest of shard `url` would be: `{split}.json` beside it, read through the same opener."""
    return sibling_url(url, split_prefix(shard_name(url)) + ".json")
