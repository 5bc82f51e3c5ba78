"""The pieces the Slurm scripts stand on, without a controller: the stop file as a source of the graceful stop,
and `lasers-train --check` (the batch shell's config check, which prints what the job will run)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from lasers_dist.cli.train import main
from lasers_dist.train.signals import StopFlag, stop_file_path
from train_support import session_shards, tiny_config, write_config

CPU = torch.device("cpu")


def test_stop_file_stops_like_a_signal_and_is_consumed(tmp_path):
    stop_file = tmp_path / "STOP"
    with StopFlag(stop_file=stop_file) as flag:
        assert not flag.should_stop(CPU) and flag.reason == "none"
        stop_file.touch()
        assert flag.should_stop(CPU) and flag.reason == "stop_file" and flag.saw_stop_file
        assert flag.consume_stop_file() and not stop_file.exists()
        assert not flag.consume_stop_file()  # gone: nothing to remove
        assert not flag.should_stop(CPU)  # the next run (or step) goes on


def test_reasons_when_several_sources_agree(tmp_path):
    stop_file = tmp_path / "STOP"
    with StopFlag(stop_file=stop_file) as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.should_stop(CPU) and flag.reason == "SIGUSR1"
        stop_file.touch()
        assert flag.should_stop(CPU) and flag.reason == "stop_file"
        flag.request()
        assert flag.should_stop(CPU) and flag.reason == "requested"
    with StopFlag() as no_file:  # without a stop file, a file of that name means nothing
        assert not no_file.should_stop(CPU) and not no_file.consume_stop_file()


def test_a_file_seen_by_another_rank_is_not_removed_here(tmp_path):
    # consume_stop_file removes only a file this rank saw at the agreeing check.
    stop_file = tmp_path / "STOP"
    with StopFlag(stop_file=stop_file) as flag:
        assert not flag.should_stop(CPU)
        stop_file.touch()  # appears after the check: the next step's business
        assert not flag.consume_stop_file() and stop_file.exists()


def test_stop_file_path():
    assert stop_file_path("runs/x") == stop_file_path("runs/x", "") == stop_file_path("runs/x", "runs/x/STOP")
    assert str(stop_file_path("runs/x", "/scratch/stop-now")) == "/scratch/stop-now"


@pytest.fixture
def two_ranks(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(key, value)


def test_check_prints_the_resolved_config_and_trains_nothing(two_ranks, tmp_path_factory, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", tiny_config(session_shards(tmp_path_factory), run))
    assert main(["--config", str(config), "model.sparsity=3", "train.stop_file=stop-here", "--resume", "auto",
                 "--check"]) == 0
    out = capsys.readouterr().out
    header = dict(line[2:].split(": ", 1) for line in out.splitlines() if line.startswith("# ") and ": " in line)
    assert header["out_dir"] == str(run.resolve())
    assert header["stop_file"] == str(Path("stop-here").resolve())  # relative to the working directory, as out_dir
    assert header["resume"] == "none (fresh start)"
    assert "OK for world size 2" in out
    resolved = yaml.safe_load(out)
    assert resolved["model"]["sparsity"] == 3 and resolved["train"]["out_dir"] == str(run)
    assert not run.exists() and not torch.distributed.is_initialized()
    assert main(["--config", str(config), "train.batch_size=7", "--check"]) == 2  # 7 images on 2 ranks
    assert "train.batch_size=7" in capsys.readouterr().err
