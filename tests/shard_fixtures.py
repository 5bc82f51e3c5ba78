"""Helpers for the data tests: real tar shards written through the library's writer, and ways to damage them."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from lasers_dist.data.shard_writer import ShardOptions, write_split
from lasers_dist.data.sources import Item


def pattern(index: int, size: int, smooth: bool = False) -> np.ndarray:
    """The (size, size, 3) uint8 picture of sample `index`: random noise, or a smooth colour ramp (for JPEG)."""
    rng = np.random.default_rng(index)
    if not smooth:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    y, x = np.linspace(0, 1, size)[:, None, None], np.linspace(0, 1, size)[None, :, None]
    return np.rint(rng.uniform(70, 180, 3) + y * rng.uniform(-60, 60, 3) + x * rng.uniform(-60, 60, 3)).astype(np.uint8)


def make_shards(out_dir: Path, n_shards: int, per_shard: int, *, size: int = 16, split: str = "train",
                image_format: str = "png", smooth: bool = False) -> list[str]:
    """Write n_shards x per_shard labelled samples (label = index % 10); returns the shard paths."""
    items = [Item(i, f"sample{i}", i % 10, None, ("pixels", pattern(i, size, smooth)))
             for i in range(n_shards * per_shard)]
    manifest = write_split(items, out_dir, split, ShardOptions(None, image_format, 95, per_shard),
                           source_info={"path": "test"})
    return [str(Path(out_dir) / s["name"]) for s in manifest["shards"]]


def corrupt_sample(shard: str, which: int) -> str:
    """Replace the image bytes of the `which`-th sample of a shard by garbage; returns that sample's key."""
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    victim = keys[which]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name == f"{victim}.png":
                data = b"\x89PNG not really a png" + bytes(200)
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return victim


def truncate(shard: str, fraction: float = 0.5) -> None:
    path = Path(shard)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


class ShardServer:
    """A real `http.server` on 127.0.0.1 serving a folder, counting GET requests per path.

    `stall` holds paths for which the server accepts the request and then sends nothing until it stops (a
    server that does not answer). Use as a context manager; `url(name)` is the address of a file.
    """

    def __init__(self, root: Path, stall: tuple[str, ...] = ()):
        import http.server
        import threading
        from collections import Counter

        self.root, self.stall, self.gets = Path(root), set(stall), Counter()
        self.stopping = threading.Event()
        lock, server = threading.Lock(), self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.root), **kwargs)

            def do_GET(self):
                path = self.path.split("?", 1)[0].lstrip("/")
                with lock:
                    server.gets[path] += 1
                if path in server.stall:
                    server.stopping.wait(60)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def shard_gets(self, prefix: str = "") -> dict[str, int]:
        """GETs per shard file (names starting with `prefix` and ending in .tar)."""
        return {p: n for p, n in self.gets.items() if p.startswith(prefix) and p.endswith(".tar")}

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """A real tar shard with the given samples (key, {extension: bytes}), members in the given order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def encode_image(img, fmt: str, **options) -> bytes:
    """Pillow image -> file bytes in `fmt` ("PNG", "JPEG", ...)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def cut_before_sample(shard: str, index: int, into_data: bool = False) -> None:
    """Truncate a shard so that exactly `index` samples stay complete: at the header of sample `index`'s first
    member (tarfile then sees a short but valid-looking archive), or `into_data` 100 bytes into its data (a read
    error; the sample before it is then incomplete as far as a reader can tell)."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    first = next(m for m in members if m.name.split(".")[0] == keys[index])
    cut = first.offset_data + min(100, first.size - 1) if into_data else first.offset
    path = Path(shard)
    path.write_bytes(path.read_bytes()[:cut])
