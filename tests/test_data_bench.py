"""`lasers-bench data` (rates and --startup) runs end to end at a tiny size and writes its JSON (numbers are
not asserted: the machine is shared)."""

import json

from lasers_dist.cli.bench_data import main, workers_needed


def test_data_bench_writes_table_and_json(tmp_path, capsys):
    report = main(["--size", "32", "--formats", "png", "jpeg", "--workers", "0", "1", "--images", "64",
                   "--batch-size", "16", "--num-photos", "16", "--work-dir", str(tmp_path / "work"),
                   "--out", str(tmp_path / "data.json")])
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved == report
    assert [(r["format"], r["workers"]) for r in saved["results"]] == [("png", 0), ("png", 1), ("jpeg", 0), ("jpeg", 1)]
    assert all(r["images"] == 64 and r["images_per_s"] > 0 for r in saved["results"])
    assert {d["decoder"] for d in saved["decoders"]} >= {"pillow", saved["jpeg_decoder"]}
    assert [s["format"] for s in saved["workers_needed"]] == ["png", "jpeg"]
    out = capsys.readouterr().out
    assert "img/s/worker" in out and "DataLoader workers per GPU" in out


def test_workers_needed_is_the_ceiling_of_demand_over_rate():
    assert workers_needed(30.0, 250.0, 2) == 1  # 8 images/s needed
    assert workers_needed(10.0, 50.0, 2) == 4  # 40 images/s needed, 10 per worker
    assert workers_needed(1000.0, 1000.0, 2) == 1  # never fewer than one


def test_startup_bench_times_first_batch_with_and_without_manifest(tmp_path, capsys):
    report = main(["--startup", "--startup-shards", "20", "--work-dir", str(tmp_path / "work"),
                   "--out", str(tmp_path / "startup.json")])
    rows = {r["counts_from"]: r for r in report["results"]}
    assert set(rows) == {"manifest", "no manifest"} and all(r["shards"] == 20 for r in rows.values())
    assert all(r["first_batch_s"] >= r["construct_s"] >= 0 for r in rows.values())
    assert "first batch s" in capsys.readouterr().out
