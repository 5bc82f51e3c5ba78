"""`lasers-bench omp|step` run end to end through the console-script dispatcher and write their JSON."""

import json
from pathlib import Path

import pytest

from lasers_dist.cli.bench import main


def test_omp_bench_prints_a_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "omp.json"
    args = ["omp", "--n", "1024", "--atoms", "64", "--sklearn-subset", "128", "--repeats", "1", "--backend", "all",
            "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    rows = {row["backend"]: row for row in result["rows"]}
    assert {"torch", "sklearn"} <= set(rows)
    assert rows["torch"]["N"] == 1024 and rows["torch"]["vectors_per_s"] > 0
    assert "triton" in {row["backend"] for row in result["skipped"]}  # no CUDA here: listed, not crashed
    assert 0 < result["step"]["omp_share"] < 1 and result["step"]["vqgan_step_ms"] > 0  # --backend all adds it
    assert (tmp_path / "step.json").is_file()
    assert "vectors_per_s" in capsys.readouterr().out


def test_step_bench_compares_dl_and_vq_steps(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    assert main(["step", "--batch", "1", "--image-size", "32", "--steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result and out.stat().st_size > 0
    text = json.dumps(result)
    assert "omp" in text.lower() and "vq" in text.lower()


def test_unknown_benchmark_is_an_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["gpu"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
