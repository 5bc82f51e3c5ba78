"""`lasers-bench data` runs end to end at a tiny size and writes its JSON (the numbers are not asserted)."""

import json

from lasers_dist.data.bench import main


def test_data_bench_writes_table_and_json(tmp_path, capsys):
    report = main(["--size", "32", "--formats", "png", "jpeg", "--workers", "0", "1", "--images", "64",
                   "--batch-size", "16", "--crops-per-photo", "1", "--work-dir", str(tmp_path / "work"),
                   "--out", str(tmp_path / "data.json")])
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved == report
    assert [(r["format"], r["workers"]) for r in saved["results"]] == [("png", 0), ("png", 1), ("jpeg", 0), ("jpeg", 1)]
    assert all(r["images"] == 64 and r["images_per_s"] > 0 for r in saved["results"])
    assert "img/s/worker" in capsys.readouterr().out
