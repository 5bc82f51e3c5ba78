"""Exact resume through the real `lasers-train` entry point (torchrun, 2 ranks, gloo, DeepSpeed ZeRO-2):
2T uninterrupted steps and T steps + stop + resume to 2T give bit-identical weights on CPU.

The stop uses the graceful-stop path (train.stop_at_step requests it like a signal: agree, save, exit 0), and
the run covers what an exact resume needs: the data stream position (one DataLoader worker per rank), RNG
states, both engines' optimizer and LR-schedule states, and module buffers (usage windows, dead-atom revival
every 2 steps, which also edits the ZeRO fp32 master copy of the dictionary).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lasers_dist.train import checkpoint as ckpt
from train_support import run, session_shards, tiny_config, train_cli, write_config

pytestmark = pytest.mark.slow
T = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = session_shards(tmp_path_factory)
    root = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(
        shards, root / "unused",
        data={"num_workers": 1, "batches_per_epoch": 4},  # the resume crosses an epoch boundary (8 batches)
        model={"revive_dead_every": 2},
        train={"max_steps": 2 * T, "checkpoint_every": 2, "keep_checkpoints": 2, "sample_every": 2},
        deepspeed={"zero_stage": 2},
    )
    config = write_config(root / "cfg.yaml", cfg)
    whole, parts = root / "whole", root / "parts"
    run(train_cli(2, config, f"train.out_dir={whole}"))
    stopped = run(train_cli(2, config, f"train.out_dir={parts}", f"train.stop_at_step={T}"))
    status_after_stop = json.loads((parts / "status.json").read_text())
    checkpoints_after_stop = [p.name for _, p in ckpt.list_checkpoints(parts / "checkpoints")]
    resumed = run(train_cli(2, config, f"train.out_dir={parts}", "--resume", "auto"))
    return {"whole": whole, "parts": parts, "stopped": stopped, "resumed": resumed,
            "status_after_stop": status_after_stop, "checkpoints_after_stop": checkpoints_after_stop}


def test_stop_saves_a_resumable_checkpoint(runs):
    assert runs["status_after_stop"]["state"] == "stopped"
    assert runs["status_after_stop"]["step"] == T
    assert runs["checkpoints_after_stop"] == ["step-00000002", "step-00000003"]
    out = runs["stopped"].stdout + runs["stopped"].stderr
    assert "stopped early at step 3" in out and "--resume auto" in out
    assert "resumed from" in runs["resumed"].stdout + runs["resumed"].stderr


def test_resumed_weights_bit_identical(runs):
    final = ckpt.step_name(2 * T)
    whole = load_file(runs["whole"] / "checkpoints" / final / "model.safetensors")
    parts = load_file(runs["parts"] / "checkpoints" / final / "model.safetensors")
    assert whole.keys() == parts.keys()
    assert any(k.startswith("discriminator.") for k in whole)
    different = [k for k in whole if not torch.equal(whole[k], parts[k])]
    assert different == [], f"resumed run differs from the uninterrupted one in {different}"


def test_resumed_optimizer_and_stream_state_identical(runs):
    final = ckpt.step_name(2 * T)
    for rank in (0, 1):
        a = ckpt.read_rank_state(runs["whole"] / "checkpoints" / final, rank)
        b = ckpt.read_rank_state(runs["parts"] / "checkpoints" / final, rank)
        assert a["stream"] == b["stream"] and a["stream"]["epoch"] == 1
        assert a["rng"] == b["rng"]
        optim = f"generator/{final}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        sa = torch.load(runs["whole"] / "checkpoints" / final / optim, weights_only=False)["optimizer_state_dict"]
        sb = torch.load(runs["parts"] / "checkpoints" / final / optim, weights_only=False)["optimizer_state_dict"]
        for key in ("base_optimizer_state", "single_partition_of_fp32_groups"):
            assert _same(sa[key], sb[key]), key


def _same(a, b) -> bool:
    """Exact equality of nested containers of tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_metrics_continue_the_same_curve(runs):
    def lines(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    whole, parts = lines(runs["whole"]), lines(runs["parts"])
    assert [r["step"] for r in parts] == [r["step"] for r in whole] == list(range(1, 2 * T + 1))
    for a, b in zip(whole, parts):
        for key in ("train/loss", "train/d_loss", "train/lambda", "lr"):
            assert a.get(key) == b.get(key), (a["step"], key)


def test_checkpoint_layout(runs):
    folder = runs["parts"] / "checkpoints" / ckpt.step_name(2 * T)
    kept = [p.name for _, p in ckpt.list_checkpoints(runs["parts"] / "checkpoints")]
    assert kept == ["step-00000004", "step-00000006"]
    assert not list((runs["parts"] / "checkpoints").glob(".tmp-*"))
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for expected in ("meta.json", "model.safetensors", "ranks/rank-00000.json", "ranks/rank-00001.json",
                     "generator/latest", "discriminator/latest",
                     "generator/step-00000006/mp_rank_00_model_states.pt",
                     "discriminator/step-00000006/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert expected in names, expected
    meta = ckpt.read_meta(folder)
    assert (meta["step"], meta["world_size"], meta["zero_stage"], meta["stream_mode"]) == (6, 2, 2, "resampled")
    assert meta["config"]["train"]["max_steps"] == 2 * T and "torch_version" in meta and "deepspeed_version" in meta
    assert (runs["parts"] / "config.yaml").is_file()
    assert (runs["parts"] / "samples" / "step-00000006.png").is_file()
    weights = load_file(folder / "model.safetensors")
    assert weights["bottleneck.dictionary"].dtype == torch.float32
    assert weights["bottleneck.train_steps"].dtype == torch.int64


def test_run_records_its_omp_backend(runs):
    """The OMP backend on a real 2-rank CPU run: resolved to torch without a self-check, logged once (rank 0),
    recorded in every checkpoint's meta.json and in provenance.json (the resumed start keeps the first one's)."""
    for _, folder in ckpt.list_checkpoints(runs["parts"] / "checkpoints"):
        assert ckpt.read_meta(folder)["omp_backend"] == "torch"
    record = json.loads((runs["parts"] / "provenance.json").read_text())
    assert (record["omp_backend"], record["omp_backend_requested"]) == ("torch", "auto")
    assert record["omp_self_check"] is None and "CUDA only" in record["omp_backend_reason"]
    assert (record["world_size"], record["device"], record["torch"]) == (2, "cpu", torch.__version__)
    assert len(record["previous_starts"]) == 1 and record["previous_starts"][0]["omp_backend"] == "torch"
    out = runs["resumed"].stdout + runs["resumed"].stderr
    assert out.count("omp backend: torch (model.omp_backend=auto; cpu device") == 1


def test_resume_on_another_world_size_is_refused(runs, monkeypatch, capsys):
    from lasers_dist.cli.train import main

    config = str(runs["parts"] / "config.yaml")
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    # ZeRO-2 partitions the optimizer state over the 2 ranks that wrote it: refused even when resampled.
    assert main(["--config", config, "train.batch_size=8", "--resume", "auto"]) == 2
    assert "written by 2 ranks at ZeRO-2" in capsys.readouterr().err
    assert main(["--config", config, "data.mode=split", "--resume", "auto"]) == 2
    assert "data.mode=split" in capsys.readouterr().err
    assert main(["--config", config, "deepspeed.zero_stage=1", "--resume", "auto"]) == 2
    assert "deepspeed.zero_stage=2" in capsys.readouterr().err
    assert main(["--config", config, "train.precision=bf16", "--resume", "auto"]) == 2
    assert "train.precision=fp32" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()  # refused before any process group started


def test_export_of_a_real_run_loads_without_deepspeed(runs, tmp_path):
    """lasers-export on the trained run dir -> load_pretrained -> encode/decode equal the run's own model."""
    import lasers_dist
    from lasers_dist.cli.export import main as export_main

    out = tmp_path / "model.safetensors"
    assert export_main([str(runs["parts"]), str(out)]) == 0
    model = lasers_dist.load_pretrained(out)
    from_checkpoint = lasers_dist.load_pretrained(runs["parts"] / "checkpoints" / ckpt.step_name(2 * T))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    assert codes.indices.shape[:2] == (2, model.config.model.sparsity)
    torch.testing.assert_close(model.decode(codes), from_checkpoint.decode(from_checkpoint.encode(images)))
