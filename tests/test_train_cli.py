"""`lasers-train` entry layer: bad configs fail before any process group starts, rank discovery from torchrun's
and Slurm's environments, the LR schedule, checkpoint discovery, and the graceful stop on a signal that reaches
only one rank of a real 2-rank torchrun job."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from lasers_dist.cli.train import dist_env_from_environ, first_slurm_host, main, parse_args, preflight
from lasers_dist.train import checkpoint as ckpt
from lasers_dist.train.distributed import DistEnv
from lasers_dist.train.schedule import WarmupCosine
from lasers_dist.train.signals import StopFlag
from train_support import REPO, child_env, session_shards, tiny_config, train_cli, write_config

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def two_rank_env(monkeypatch):
    """This process poses as rank 0 of 2. Were a process group started, it would wait for rank 1 (that never
    comes) on a port nobody serves: the tests below must return long before."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "9"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def config_file(tmp_path_factory, tmp_path):
    def make(**sections):
        cfg = tiny_config(session_shards(tmp_path_factory), tmp_path / "run", **sections)
        return str(write_config(tmp_path / "cfg.yaml", cfg))

    return make


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.sparsityy=3"], "model.sparsityy"),
        (["model.sparsity=40"], "model.sparsity=40 must be in [1, model.num_atoms=32]"),
        (["model.bottleneck=kmeans"], "'kmeans' is not one of dictionary, vq"),
        (["train.max_steps=ten"], "train.max_steps"),
        (["train.batch_size=7"], "train.batch_size=7 must be a positive multiple of world size (2)"),
        (["model.patch_size=[3,3]"], "does not divide the 8x8 latent map"),
        (["data.train_shards=/nonexistent/train-*.tar"], "lasers-shard"),
        (["deepspeed.zero_stage=3"], "deepspeed.zero_stage=3"),
        ([f"deepspeed.config_file={REPO / 'configs' / 'deepspeed' / 'zero2.json'}"], "zero_optimization.stage"),
        (["optim.grad_accum_steps=0"], "'optim.grad_accum_steps' must be > 0"),
        (["model.sparsity=9"], "exceeds the coded signal's dimension 8"),
        (["model.norm_groups=5"], "model.norm_groups=5 does not divide"),
        (["loss.lpips_random_backbone=false", "loss.lpips_net=squeeze"], "squeezenet1_1-b8a52dc0.pth"),
        (["data.mode=split", "data.num_workers=8"], "data.mode=split needs at least"),
    ],
)
def test_bad_config_fails_before_process_group(two_rank_env, config_file, capsys, monkeypatch, tmp_path, overrides,
                                               message):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # read by torch.hub: no LPIPS weights
    started = time.perf_counter()
    assert main(["--config", config_file(), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lasers-train: error:") and message in err
    assert not torch.distributed.is_initialized()
    assert time.perf_counter() - started < 60  # no rendezvous was attempted (it would wait for rank 1)


def test_missing_config_file_and_existing_run(two_rank_env, config_file, capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = config_file()
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    assert main(["--config", path]) == 2  # would silently mix two runs
    assert "--resume auto" in capsys.readouterr().err
    assert main(["--config", path, "--resume", str(tmp_path / "elsewhere")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_preflight_accepts_a_good_config(two_rank_env, config_file):
    args = parse_args(["--config", config_file(), "train.max_steps=7", "--resume", "auto"])
    cfg, env, resume = preflight(args, os.environ)
    assert cfg.train.max_steps == 7 and resume is None  # auto with no checkpoint: a fresh start
    assert env == DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, master_addr="127.0.0.1",
                          master_port=9)


def test_rank_from_torchrun_and_slurm():
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "node3", "MASTER_PORT": "29400", "SLURM_PROCID": "0"}
    assert dist_env_from_environ(torchrun) == DistEnv(5, 8, 1, 4, "node3", 29400)  # torchrun wins (srun torchrun)
    slurm = {"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
             "SLURM_TASKS_PER_NODE": "3(x2),1", "SLURM_JOB_NODELIST": "gpu[007-009]", "SLURM_JOB_ID": "123456"}
    env = dist_env_from_environ(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 7, 0, 1)
    assert env.master_addr == "gpu007" and env.master_port == 20000 + 123456 % 20000
    assert dist_env_from_environ({**slurm, "MASTER_PORT": "12345", "MASTER_ADDR": "head"}).master_port == 12345
    alone = dist_env_from_environ({})
    assert (alone.rank, alone.world_size) == (0, 1) and 0 < alone.master_port < 65536
    with pytest.raises(ValueError, match="RANK"):
        dist_env_from_environ({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside world size"):
        dist_env_from_environ({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    "nodelist, first",
    [("gpu[007-009,012],cpu1", "gpu007"), ("login1", "login1"), ("a1,b[2-3]", "a1"),
     ("rack[1-2]-n[01-04]", "rack1-n01"), ("node[10,2]", "node10")],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)
    assert WarmupCosine(0, 10, kind="constant")(7) == 1.0


def test_checkpoint_discovery_ignores_uncommitted(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000002", "step-00000010", ".tmp-step-00000012", "step-x"):
        (root / name).mkdir(parents=True)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 10]
    assert ckpt.resolve_resume("auto", root) == root / "step-00000010"
    assert ckpt.resolve_resume(str(tmp_path), root) == root / "step-00000010"  # a run directory
    assert ckpt.resolve_resume("auto", tmp_path / "none") is None


def test_stop_flag_records_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopFlag() as stop:
        assert not stop.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.received == signal.SIGTERM
        assert stop.should_stop(torch.device("cpu")) and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGUSR1) is before


def _signal_running_training(config: Path, out: Path, send) -> tuple[subprocess.Popen, str]:
    """Start a 2-rank torchrun training, wait until it has logged 2 steps, call send(torchrun process), and
    return the process with its output once it has exited."""
    proc = subprocess.Popen(train_cli(2, config), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        send(proc)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, output


def _assert_stopped_with_checkpoint(out: Path, reason: str, output: str) -> dict:
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == reason and 2 <= status["step"] < 10_000, output[-4000:]
    folder = out / "checkpoints" / ckpt.step_name(status["step"])
    assert status["checkpoint"] == str(folder)
    assert ckpt.rank_file(folder, 0).is_file() and ckpt.rank_file(folder, 1).is_file()
    assert ckpt.read_meta(folder)["step"] == status["step"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    return status


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_ranks(tmp_path_factory, tmp_path):
    """SIGUSR1 to rank 1 only: both ranks agree at the next step, save one checkpoint together, exit 0."""
    out = tmp_path / "run"
    cfg = tiny_config(session_shards(tmp_path_factory), out, train={"max_steps": 10_000, "checkpoint_every": 10_000},
                      deepspeed={"zero_stage": 1})

    def to_rank_1(proc: subprocess.Popen) -> None:
        workers = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children()}
        workers["1"].send_signal(signal.SIGUSR1)

    proc, output = _signal_running_training(write_config(tmp_path / "cfg.yaml", cfg), out, to_rank_1)
    assert proc.returncode == 0, output[-4000:]
    status = _assert_stopped_with_checkpoint(out, "SIGUSR1", output)
    assert f"stopped early at step {status['step']} (SIGUSR1)" in output and "--resume auto" in output


@pytest.mark.slow
def test_sigterm_to_torchrun_with_data_workers_saves_a_checkpoint(tmp_path_factory, tmp_path):
    """SIGTERM to torchrun, which forwards it to each rank's whole process group, DataLoader workers included:
    the workers survive it, the ranks finish the step and commit a checkpoint before torchrun gives up on them."""
    out = tmp_path / "run"
    cfg = tiny_config(session_shards(tmp_path_factory), out, data={"num_workers": 1},
                      train={"max_steps": 10_000, "checkpoint_every": 10_000})
    config = write_config(tmp_path / "cfg.yaml", cfg)
    _, output = _signal_running_training(config, out, lambda proc: proc.send_signal(signal.SIGTERM))
    assert "DataLoader worker" not in output, output[-4000:]
    _assert_stopped_with_checkpoint(out, "SIGTERM", output)


def test_bf16_engines_keep_optimizer_free_state_in_fp32():
    """What a bf16 engine casts back: EMA / online statistics and the online dictionary (no fp32 master copy
    exists for them), never the trainable weights that the optimizer's master copy shadows."""
    from lasers_dist.config import config_from_dict
    from lasers_dist.models import build_autoencoder
    from lasers_dist.train.engines import _restore_fp32_state

    for model_cfg in ({"dictionary_update": "online"}, {"bottleneck": "vq"}):
        cfg = config_from_dict({"model": {"num_atoms": 16, "embed_dim": 4, "sparsity": 2, "hidden_channels": 8,
                                          **model_cfg}})
        module = build_autoencoder(cfg.model).to(torch.bfloat16)
        _restore_fp32_state(module)
        floats = [b for b in module.bottleneck.buffers() if b.is_floating_point()]
        assert floats and all(b.dtype == torch.float32 for b in floats)
        assert all(p.dtype == torch.float32 for p in module.parameters() if not p.requires_grad)
        assert module.decoder.last_layer.dtype == torch.bfloat16
        images = torch.rand(1, 3, 16, 16, dtype=torch.bfloat16) * 2 - 1
        assert module.train()(images).reconstructions.dtype == torch.bfloat16
