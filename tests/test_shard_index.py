"""`lasers-shard index` and the manifest lookup on real tar shards: local paths and `pipe:` commands (the
http(s) cases are in test_http_shards.py)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest

from lasers_dist.cli.shard import main as shard_main
from lasers_dist.data import CountWarning, ShardStream, lookup_counts
from lasers_dist.data.remote import manifest_url, shard_name, split_prefix
from shard_fixtures import make_shards, truncate


def foreign_shards(folder: Path, n_shards: int, per_shard: int) -> list[str]:
    """Shards as another WebDataset tool leaves them: no manifest beside them."""
    paths = make_shards(folder, n_shards, per_shard, size=8)
    (folder / "train.json").unlink()
    return paths


def test_index_counts_hashes_and_records_damage(tmp_path, capsys):
    paths = foreign_shards(tmp_path, 4, 5)
    truncate(paths[1], 0.5)
    Path(paths[3]).write_bytes(b"this is not a tar file at all" * 30)
    assert shard_main(["index", str(tmp_path / "train-*.tar"), "--sha256", "--workers", "3", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "train.json").read_text())  # beside the shards, named after the split
    by_name = {s["name"]: s for s in manifest["shards"]}
    assert list(by_name) == [Path(p).name for p in paths]
    assert by_name["train-000000.tar"]["num_samples"] == by_name["train-000002.tar"]["num_samples"] == 5
    assert by_name["train-000000.tar"]["sha256"] == hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest()
    assert by_name["train-000000.tar"]["num_bytes"] == Path(paths[0]).stat().st_size
    assert 0 < by_name["train-000001.tar"]["num_samples"] < 5  # what is readable before the cut
    assert by_name["train-000003.tar"]["num_samples"] == 0
    damaged = {d["name"]: d["reason"] for d in manifest["damaged"]}
    assert set(damaged) == {"train-000001.tar", "train-000003.tar"} and all(damaged.values())
    assert manifest["num_samples"] == 10 + by_name["train-000001.tar"]["num_samples"]
    out = capsys.readouterr().out
    assert "2 damaged or unreadable" in out and "train-000003.tar" in out


def test_the_stream_uses_an_index_manifest_and_reads_nothing_to_count(tmp_path):
    paths = foreign_shards(tmp_path, 3, 4)
    with pytest.warns(CountWarning, match=r"lasers-shard index '.*train-\*\.tar' --out"):
        counted = lookup_counts(paths, pattern=str(tmp_path / "train-*.tar"))
    assert counted.counts == [4, 4, 4] and counted.counted == paths and counted.manifests == []
    assert shard_main(["index", str(tmp_path / "train-*.tar"), "--no-progress"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CountWarning)
        found = lookup_counts(paths)
        stream = ShardStream(str(tmp_path / "train-*.tar"), batch_size=4, image_size=8, mode="split")
    assert found.counts == [4, 4, 4] and found.counted == [] and found.manifests == [str(tmp_path / "train.json")]
    assert sorted(k for b in stream for k in b["keys"]) == [f"{i:08d}" for i in range(12)]


def test_explicit_manifest_and_its_errors(tmp_path):
    paths = foreign_shards(tmp_path, 2, 3)
    elsewhere = tmp_path / "meta" / "counts.json"
    elsewhere.parent.mkdir()
    assert shard_main(["index", *paths, "--out", str(elsewhere), "--no-progress"]) == 0
    assert lookup_counts(paths, str(elsewhere)).counts == [3, 3]
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        lookup_counts(paths, str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lookup_counts(paths, str(tmp_path / "bad.json"))


def test_index_refuses_to_replace_the_writers_manifest_and_asks_for_out(tmp_path, capsys):
    make_shards(tmp_path / "a", 2, 3)  # lasers-shard's own manifest, with its resume bookkeeping
    assert shard_main(["index", str(tmp_path / "a" / "train-*.tar"), "--no-progress"]) == 2
    assert "pass --out" in capsys.readouterr().err
    make_shards(tmp_path / "b", 1, 2, split="val")
    assert shard_main(["index", str(tmp_path / "a" / "train-*.tar"), str(tmp_path / "b" / "val-*.tar"),
                       "--no-progress"]) == 2
    assert "pass --out FILE" in capsys.readouterr().err
    assert shard_main(["index", str(tmp_path / "nothing-*.tar"), "--no-progress"]) == 2
    assert "no shard matches" in capsys.readouterr().err


def test_pipe_shards_and_their_manifest_go_through_the_same_command(tmp_path):
    paths = foreign_shards(tmp_path, 2, 3)
    pipes = [f"pipe:cat {p}" for p in paths]
    assert shard_name(pipes[1]) == "train-000001.tar"
    assert manifest_url(pipes[0]) == f"pipe:cat {tmp_path / 'train.json'}"
    with pytest.warns(CountWarning):  # no manifest yet: `cat` of train.json fails, the shards are read
        assert lookup_counts(pipes).counts == [3, 3]
    out = tmp_path / "pipe-index.json"
    assert shard_main(["index", f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar", "--out", str(out),
                       "--no-progress"]) == 0
    (tmp_path / "train.json").write_text(out.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CountWarning)
        stream = ShardStream(pipes, batch_size=3, image_size=8, mode="split", train=False)
    assert [k for b in stream for k in b["keys"]] == [f"{i:08d}" for i in range(6)]


def test_member_grouping_follows_webdataset(tmp_path):
    """Keys end at the first dot of the file name; __meta__ files and members without an extension are skipped;
    the manifest count and the stream agree on it."""
    path = tmp_path / "mixed-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in [("__meta__", b"x"), ("dir/a.b.png", b"1"), ("dir/a.b.cls", b"2"), ("README", b"y"),
                           ("dir/c.PNG", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    from lasers_dist.data.shards import iter_samples

    assert list(iter_samples(str(path))) == [("dir/a", {"b.png": b"1", "b.cls": b"2"}), ("dir/c", {"png": b"3"})]
    assert split_prefix("mixed-000000.tar") == "mixed" and split_prefix("shard7.tar") == "shard"


def test_shard_lists_are_looked_up_on_rank_0_and_its_error_is_raised_everywhere(tmp_path):
    from lasers_dist.data import shared_shard_lists

    paths = foreign_shards(tmp_path, 2, 3)
    specs = {"train": (str(tmp_path / "train-*.tar"), ""), "val": ("", "")}
    sent = []
    with pytest.warns(CountWarning):
        found = shared_shard_lists(specs, rank=0, broadcast=lambda obj: sent.append(obj) or obj)
    assert found == {"train": (paths, [3, 3])} and sent == [found]
    # Other ranks look nothing up (this pattern matches nothing): they take what rank 0 sends.
    assert shared_shard_lists({"train": (str(tmp_path / "none-*.tar"), "")}, rank=1,
                              broadcast=lambda obj: sent[0]) == found
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        shared_shard_lists({"train": (str(tmp_path / "none-*.tar"), "")}, rank=0, broadcast=sent.append)
    with pytest.raises(RuntimeError, match="rank 1: rank 0 could not list the shards .*no shard matches"):
        shared_shard_lists({"train": (str(tmp_path / "none-*.tar"), "")}, rank=1, broadcast=lambda obj: sent[-1])
