"""Faults, tried for real: divergence, an exception on one rank, a stopped rank, kill -9 in the middle of a save
under torchrun --max-restarts, a damaged checkpoint, a full disk, bad config values, files that would run code.

Every run is the real `lasers-train` under torchrun (2 ranks, gloo, DeepSpeed, shard streams with DataLoader
workers). Each test prints what it measured as `[faults] ...` lines (time to exit or to recover); collect them
with `python -m pytest -m faults -s -q tests/test_faults.py | grep '^\\[faults\\]'` (the README's table).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

import lasers_dist
from lasers_dist.cli.export import main as export_main
from lasers_dist.cli.train import main as train_main
from lasers_dist.cli.train import parse_args, preflight
from lasers_dist.config import ConfigError, load_config
from lasers_dist.eval.source import describe_source
from lasers_dist.train import checkpoint as ckpt
from train_support import REPO, child_env, run, session_shards, tiny_config, torchrun_command, train_cli, write_config

pytestmark = [pytest.mark.faults, pytest.mark.slow]
STEPS = 6


def report(name: str, **facts) -> None:
    print(f"[faults] {name}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in facts.items()), flush=True)


class Launch:
    """A torchrun job in the background, its output in a file, with polling helpers (no sleeps as
    synchronisation: every wait is on an observable condition, bounded by a generous deadline)."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self._handle = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=self._handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, condition, timeout: float = 240, poll: float = 0.05, what: str = "") -> float:
        """Poll `condition()` until true; returns the time it became true (perf_counter)."""
        deadline = time.perf_counter() + timeout
        while not condition():
            if self.proc.poll() is not None and not condition():
                raise AssertionError(f"job exited ({self.proc.returncode}) before {what}:\n{self.output()[-5000:]}")
            assert time.perf_counter() < deadline, f"timed out waiting for {what}:\n{self.output()[-5000:]}"
            time.sleep(poll)
        return time.perf_counter()

    def wait_for_text(self, text: str, timeout: float = 240) -> float:
        return self.wait_until(lambda: text in self.output(), timeout, what=repr(text))

    def finish(self, timeout: float = 240) -> float:
        """Wait for the job to end; returns the time it ended."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job still running after {timeout} s:\n{self.output()[-5000:]}") from None
        return time.perf_counter()

    def worker(self, rank: int) -> psutil.Process:
        """The training process of `rank` (a child of torchrun's agent)."""
        def find():
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == str(rank) and child.ppid() == self.proc.pid:
                        return child
                except psutil.Error:
                    continue
            return None
        self.wait_until(lambda: find() is not None, what=f"the worker of rank {rank}")
        return find()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._handle.close()

    @classmethod
    def through(cls, cmd: list[str], log: Path, *texts: str) -> tuple[Launch, list[float]]:
        """Run a job to its end, noting when each of `texts` first appears in its output (in this order).
        Returns the job and those times followed by the time it ended."""
        job = cls(cmd, log)
        try:
            times = [job.wait_for_text(text) for text in texts]
            times.append(job.finish())
        finally:
            job.close()
        return job, times


def leftover_processes(marker: str) -> list[str]:
    """Processes (ranks or their DataLoader workers) still running a command line containing `marker`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])[:200]}")
        except psutil.Error:
            continue
    return found


def base_config(tmp_path_factory, out_dir: Path, **sections) -> dict:
    """The tiny DL-GAN of the trainer tests at ZeRO-1, one DataLoader worker per rank, a checkpoint every 2 steps,
    and an epoch of 4 batches (a resume from step 2 or 4 continues mid-epoch or across an epoch boundary)."""
    cfg = tiny_config(session_shards(tmp_path_factory), out_dir, data={"num_workers": 1, "batches_per_epoch": 4},
                      model={"revive_dead_every": 2},
                      train={"max_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 3},
                      deepspeed={"zero_stage": 1})
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps, what every recovered run must equal bit for bit."""
    root = tmp_path_factory.mktemp("faults")
    config = write_config(root / "cfg.yaml", base_config(tmp_path_factory, root / "unused"))
    out = root / "reference"
    run(train_cli(2, config, f"train.out_dir={out}"))
    return {"root": root, "config": config, "out": out}


def assert_same_run(out: Path, reference: Path) -> None:
    """Final weights, every rank's stream position and RNG state, and the logged losses equal the reference."""
    final = ckpt.step_name(STEPS)
    a = load_file(out / "checkpoints" / final / ckpt.WEIGHTS_FILE)
    b = load_file(reference / "checkpoints" / final / ckpt.WEIGHTS_FILE)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for rank in (0, 1):
        assert ckpt.read_rank_state(out / "checkpoints" / final, rank) == \
            ckpt.read_rank_state(reference / "checkpoints" / final, rank)

    def losses(run_dir: Path) -> list:
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train/loss"), r.get("train/d_loss")) for r in lines]

    assert losses(out) == losses(reference)
    assert not list((out / "checkpoints").glob(".tmp-*"))


# ---- divergence, exceptions, a stopped rank ----------------------------------------------------------------


def test_divergence_is_skipped_then_stops_with_a_plain_message(tmp_path_factory, tmp_path):
    """optim.lr=1e5 (the issue's example): the non-finite steps are skipped on both ranks, then the run stops with
    exit code 3, status "failed" / "diverged ...", and no checkpoint with a non-finite weight; DataLoader workers
    do not keep it alive (on the old main this hung until killed)."""
    out = tmp_path / "run"
    cfg = base_config(tmp_path_factory, out, optim={"lr": "1e5", "disc_lr": "1e5"},
                      train={"max_steps": 50, "checkpoint_every": 1, "keep_checkpoints": 50})
    job, (first_skip, said, ended) = Launch.through(train_cli(2, write_config(tmp_path / "cfg.yaml", cfg)),
                                                   tmp_path / "log.txt", "skipped: ", "training diverged at step")
    output = job.output()
    assert job.proc.returncode != 0
    assert "exitcode  : 3" in output  # each rank's own exit code, in torchrun's summary
    assert output.count("lasers-train: training diverged at step") == 1  # said once, by rank 0
    assert "last good checkpoint" in output and "try a lower optim.lr (now 100000)" in output
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"].startswith("diverged at step")
    for _, folder in ckpt.list_checkpoints(out / "checkpoints"):
        assert ckpt.checkpoint_problems(folder, check_hashes=True) == []
        weights = load_file(folder / ckpt.WEIGHTS_FILE)
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), folder
    skipped = [json.loads(line).get("train/skipped_steps") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert skipped[-1] == 3 and skipped[0] == 0
    assert leftover_processes(str(tmp_path)) == []
    report("diverged (optim.lr=1e5)", first_skip_to_message_s=said - first_skip, message_to_exit_s=ended - said,
           skipped=skipped[-1], step=status["step"])


def test_exception_on_one_rank_ends_the_job_promptly(tmp_path_factory, tmp_path):
    """A RuntimeError on rank 1 at step 3 (any bug): rank 1 prints it once with its traceback and rank, rank 0
    says another rank ended, both exit at once with their DataLoader workers gone, status says "failed"."""
    out = tmp_path / "run"
    cfg = base_config(tmp_path_factory, out, train={"max_steps": 1000, "checkpoint_every": 1000})
    config = write_config(tmp_path / "cfg.yaml", cfg)
    cmd = torchrun_command(2, str(REPO / "tests" / "fault_driver.py"), "--fault-rank", "1", "--fault-step", "3",
                           "--", "--config", str(config))
    job, (raised, ended) = Launch.through(cmd, tmp_path / "log.txt", "lasers-train: rank 1: error: RuntimeError")
    output = job.output()
    assert job.proc.returncode != 0
    assert output.count("lasers-train: rank 1: error: RuntimeError: injected fault on rank 1 at step 3") == 1
    assert "Traceback" in output and "rank 0: stopping: another rank ended" in output
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "another rank ended" in status["reason"]
    assert leftover_processes(str(config)) == []
    report("exception on rank 1", error_to_job_exit_s=ended - raised)


def test_stopped_rank_is_named_within_the_collective_timeout(tmp_path_factory, tmp_path):
    """SIGSTOP on rank 1: rank 0 warns that rank 1 went quiet, then gives up after train.collective_timeout_s with a
    message naming rank 1 and what to do. (torchrun would kill the stopped rank after its own shutdown timeout;
    here it is continued instead, and ends by itself.)"""
    out = tmp_path / "run"
    timeout = 10
    cfg = base_config(tmp_path_factory, out, train={"max_steps": 100_000, "checkpoint_every": 100_000,
                                                    "collective_timeout_s": timeout})
    job = Launch(train_cli(2, write_config(tmp_path / "cfg.yaml", cfg)), tmp_path / "log.txt")
    try:
        job.wait_until(lambda: (out / "metrics.jsonl").is_file()
                       and len((out / "metrics.jsonl").read_text().splitlines()) >= 3, what="3 logged steps")
        rank1 = job.worker(1)
        rank1.suspend()
        stopped = time.perf_counter()
        named = job.wait_for_text("lasers-train: rank 0: stopping:", timeout=timeout + 120)
        rank1.resume()
        ended = job.finish()
    finally:
        job.close()
    output = job.output()
    assert job.proc.returncode != 0
    message = next(line for line in output.splitlines() if "lasers-train: rank 0: stopping:" in line)
    assert f"train.collective_timeout_s={timeout} s" in message
    assert f"rank 1 (pid {rank1.pid}" in message and "stopped answering" in message and "--resume auto" in message
    # Named before the timeout too, by the rank that watches rank 1's heartbeat (what NCCL users see in the log
    # when NCCL's watchdog ends the waiting ranks itself).
    assert f"lasers-train: rank 0: warning: rank 1 (pid {rank1.pid} on" in output
    assert leftover_processes(str(tmp_path)) == []
    report("SIGSTOP on rank 1", collective_timeout_s=float(timeout), stop_to_message_s=named - stopped,
           continue_to_job_exit_s=ended - named)


# ---- kill -9 in the middle of a save, torchrun restarts ---------------------------------------------------------


def test_kill_during_save_then_torchrun_restart_resumes_bit_identical(reference, tmp_path):
    """torchrun --max-restarts 1 ... --resume auto. Rank 0 is killed (SIGKILL) while checkpoint step 4 is being
    written: the .tmp folder it leaves is never read (the restarted workers resume from step 2 by themselves)
    and is removed by the next save; the run ends bit-identical to the uninterrupted one."""
    out = tmp_path / "run"
    cmd = torchrun_command(2, "--max-restarts=1", "-m", "lasers_dist.cli.train", "--config", str(reference["config"]),
                           f"train.out_dir={out}", "--resume", "auto")
    job = Launch(cmd, tmp_path / "log.txt")
    tmp = out / "checkpoints" / f".tmp-{ckpt.step_name(4)}"
    try:
        rank0 = job.worker(0)
        job.wait_until(lambda: (tmp / "generator").exists(), poll=0.002, what="the save of step 4 to start")
        rank0.kill()
        killed = time.perf_counter()
        rank0.wait(30)
        # Killed in the middle of the save: an uncommitted folder, and no step 4.
        assert tmp.is_dir() and not (out / "checkpoints" / ckpt.step_name(4)).exists()
        other_ended = job.wait_for_text("lasers-train: rank 1: stopping: another rank ended")
        resumed = job.wait_for_text(f"resumed from {out / 'checkpoints' / ckpt.step_name(2)}")
        ended = job.finish()
    finally:
        job.close()
    assert job.proc.returncode == 0, job.output()[-4000:]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert_same_run(out, reference["out"])
    report("kill -9 of rank 0 during a save, torchrun --max-restarts 1", kill_to_rank_1_exit_s=other_ended - killed,
           kill_to_resumed_s=resumed - killed, kill_to_finished_s=ended - killed)


# ---- damaged checkpoints ----------------------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_falls_back_and_continues_bit_identical(reference, tmp_path):
    """A run that stopped at step 4 whose step-4 optimizer file was overwritten after the commit (same size, other
    bytes: only the sha256 shows it): --resume auto warns naming the file, resumes from step 2, and ends
    bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    shutil.rmtree(out / "checkpoints" / ckpt.step_name(STEPS))
    damaged = out / "checkpoints" / ckpt.step_name(4) / "generator" / ckpt.step_name(4)
    damaged = damaged / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _flip_byte(damaged)
    started = time.perf_counter()
    proc = run(train_cli(2, reference["config"], f"train.out_dir={out}", "--resume", "auto"))
    ended = time.perf_counter()
    output = proc.stdout + proc.stderr
    warning = next(line for line in output.splitlines() if "warning: checkpoint" in line)
    assert str(damaged) in warning and "sha256 differs" in warning and "falling back" in warning
    assert output.count("warning: checkpoint") == 1  # said once (rank 0)
    assert f"resumed from {out / 'checkpoints' / ckpt.step_name(2)}" in output
    assert_same_run(out, reference["out"])
    report("checkpoint damaged after commit (same size)", resume_run_s=ended - started)


def test_truncated_checkpoint_is_found_before_any_process_group(reference, tmp_path, monkeypatch, capsys):
    """Sizes are checked by every rank before the process group starts: --resume auto skips a truncated newest
    checkpoint with a warning, an explicitly named one is exit code 2; load_pretrained and lasers-export verify
    the weights file the same way, and an export carries its own checksum."""
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    newest = out / "checkpoints" / ckpt.step_name(STEPS)
    weights = newest / ckpt.WEIGHTS_FILE
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(key, value)  # rank 0 of 2: a process group would wait for rank 1, which never comes
    config = str(reference["config"])
    _, _, plan = preflight(parse_args(["--config", config, f"train.out_dir={out}", "--resume", "auto"]), os.environ)
    assert plan.candidates[0].name == ckpt.step_name(4) and not plan.explicit
    err = capsys.readouterr().err
    assert f"{weights}: truncated" in err and "falling back" in err
    assert train_main(["--config", config, f"train.out_dir={out}", "--resume", str(newest)]) == 2
    err = capsys.readouterr().err
    assert "lasers-train: error: checkpoint" in err and f"{weights}: truncated" in err
    assert not torch.distributed.is_initialized()

    with pytest.warns(UserWarning, match="truncated"):
        model = lasers_dist.load_pretrained(out)  # the run directory: falls back to step 4
    expected = load_file(out / "checkpoints" / ckpt.step_name(4) / ckpt.WEIGHTS_FILE)
    assert torch.equal(model.state_dict()["bottleneck.dictionary"], expected["bottleneck.dictionary"])
    # What lasers-eval reports as the source: the checkpoint actually read, not the damaged newest one.
    source = describe_source(out, model.provenance)
    assert source.step == 4 and source.checkpoint == str((out / "checkpoints" / ckpt.step_name(4)).resolve())
    assert source.run_dir == out
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        lasers_dist.load_pretrained(newest)
    assert export_main([str(newest), str(tmp_path / "x.safetensors")]) == 1
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()

    export = tmp_path / "model.safetensors"
    with pytest.warns(UserWarning):
        assert export_main([str(out), str(export)]) == 0
    lasers_dist.load_pretrained(export)
    _flip_byte(export)  # lands in the tensor data (the header is a few KB at the start)
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        lasers_dist.load_pretrained(export)


# ---- a full disk ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path_factory, tmp_path, small_tmpfs):
    """The run directory on a 64 MB tmpfs, filled up right after checkpoint 3 is committed: the save of step 6
    fails with a plain "file system is full" error naming the intact checkpoint, the job ends, step 3 still
    verifies and loads, and no partial folder is taken for a checkpoint."""
    out = small_tmpfs / "run"
    cfg = base_config(tmp_path_factory, out, data={"num_workers": 0},
                      train={"max_steps": STEPS, "checkpoint_every": 3})
    job = Launch(train_cli(2, write_config(tmp_path / "cfg.yaml", cfg)), tmp_path / "log.txt")
    good = out / "checkpoints" / ckpt.step_name(3)
    try:
        job.wait_until(good.is_dir, poll=0.01, what="checkpoint 3")
        free = shutil.disk_usage(small_tmpfs).free
        with open(small_tmpfs / "filler", "wb") as handle:  # leave 256 KiB: metrics lines fit, a checkpoint not
            handle.write(b"\0" * max(0, free - (256 << 10)))
        filled = time.perf_counter()
        said = job.wait_for_text("No space left on device")
        ended = job.finish()
    finally:
        job.close()
    output = job.output()
    assert job.proc.returncode != 0
    line = next(line for line in output.splitlines() if "No space left on device" in line)
    assert f"writing checkpoint {ckpt.step_name(STEPS)}" in line and f"{good} is intact" in line
    assert [p.name for _, p in ckpt.list_checkpoints(out / "checkpoints")] == [ckpt.step_name(3)]
    (small_tmpfs / "filler").unlink()
    assert ckpt.checkpoint_problems(good, check_hashes=True) == []
    lasers_dist.load_pretrained(good)
    assert leftover_processes(str(tmp_path)) == []
    report("disk full during a save (tmpfs)", fill_to_error_s=said - filled, error_to_job_exit_s=ended - said)


# ---- non-finite steps on each ZeRO stage and precision -----------------------------------------------------------


def test_nonfinite_steps_are_skipped_on_every_rank(tmp_path_factory, tmp_path):
    """ZeRO 0/1/2 x fp32/bf16 (dictionary by gradient, online dictionary, VQ): a NaN batch on rank 1 only, then a
    NaN gradient on rank 1 only (finite losses), are skipped on both ranks with nothing changed (weights,
    optimizer state, LR schedule, buffers); the steps around them apply, with identical weights on both ranks;
    and DeepSpeed's own gradient-reduction group has our collective timeout."""
    cfg = tiny_config(session_shards(tmp_path_factory), tmp_path / "unused", loss={"disc_start": 0},
                      train={"max_steps": 10})
    config = write_config(tmp_path / "cfg.yaml", cfg)
    cases = [
        {"name": "zero0-fp32", "overrides": ["deepspeed.zero_stage=0"]},
        {"name": "zero1-fp32-online", "overrides": ["deepspeed.zero_stage=1", "model.dictionary_update=online"]},
        {"name": "zero2-fp32-vq", "overrides": ["deepspeed.zero_stage=2", "model.bottleneck=vq"]},
        {"name": "zero0-bf16", "overrides": ["deepspeed.zero_stage=0", "train.precision=bf16"]},
        {"name": "zero1-bf16", "overrides": ["deepspeed.zero_stage=1", "train.precision=bf16"]},
        {"name": "zero2-bf16", "overrides": ["deepspeed.zero_stage=2", "train.precision=bf16"]},
    ]
    out = tmp_path / "out"
    run(torchrun_command(2, str(REPO / "tests" / "skip_driver.py"), "--config", str(config), "--out", str(out),
                         "--cases", json.dumps(cases), "--timeout", "60"))
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    nothing = {"weights": False, "optimizer": False, "lr": False, "schedule": False, "buffers": False}
    for case in cases:
        name = case["name"]
        for result in ranks:
            steps = {s["kind"]: s for s in result[name]["steps"]}
            good_first, good_last = result[name]["steps"][0], result[name]["steps"][-1]
            assert not good_first["skipped"] and good_first["changed"]["weights"], name
            assert not good_last["skipped"] and good_last["changed"]["weights"], name
            assert good_last["changed"]["schedule"], name  # the schedule moves on applied steps only
            nan_batch, nan_grad = steps["nan_batch_on_rank_1"], steps["nan_grad_on_rank_1"]
            assert nan_batch["skipped"], name
            assert nan_batch["reason"] == "the latents before sparse coding were NaN or Inf on rank 1", name
            assert nan_grad["skipped"] and "gradients were NaN or Inf" in nan_grad["reason"], (name, nan_grad["reason"])
            assert nan_batch["changed"] == nothing and nan_grad["changed"] == nothing, name
            assert all(s["weights_finite"] for s in result[name]["steps"]), name
            assert result[name]["group_timeout_s"] == 60.0, name
        sums = [[s["weights_sum"] for s in result[name]["steps"]] for result in ranks]
        assert sums[0] == sums[1], name  # identical weights on both ranks after every step


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_numbers_in_exponent_notation_and_bad_values(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """3e-4 / 1E4 (strings to PyYAML) are floats wherever a float is expected, in the file and on the command line;
    2.0 is an int where an int is expected; anything else names key, value and type, exit code 2, no process
    group."""
    shards = session_shards(tmp_path_factory)
    text = yaml.safe_dump(tiny_config(shards, tmp_path / "run")).replace("\n  lr: 0.001\n", "\n  lr: 3e-4\n")
    text = text.replace("max_steps: 4", "max_steps: 1E4").replace("batch_size: 8", "batch_size: 8.0")
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert "\n  lr: 3e-4\n" in text and "max_steps: 1E4" in text
    cfg = load_config(path, ["optim.disc_lr=2E-5", "train.collective_timeout_s=1e2", "optim.betas=[5e-1, 0.9]"])
    assert (cfg.optim.lr, cfg.optim.disc_lr, cfg.train.collective_timeout_s) == (3e-4, 2e-5, 100.0)
    assert cfg.train.max_steps == 10_000 and isinstance(cfg.train.max_steps, int) and cfg.train.batch_size == 8
    assert cfg.optim.betas == [0.5, 0.9]
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(key, value)
    bad = {
        "train.batch_size=2.5": "config key 'train.batch_size': expected int, got float 2.5 (not a whole number)",
        "optim.lr=fast": "config key 'optim.lr': expected float, got str 'fast'",
        "optim.lr=.nan": "config key 'optim.lr': expected a finite float, got float nan",
        "train.max_steps=true": "config key 'train.max_steps': expected int, got bool True",
        "train.max_bad_steps=0": "train.max_bad_steps must be >= 1, got 0",
        "model.attention=1": "config key 'model.attention': expected bool, got int 1",
    }
    for override, message in bad.items():
        assert train_main(["--config", str(path), override]) == 2, override
        assert message in capsys.readouterr().err, override
    assert not torch.distributed.is_initialized()


class _RunsCode:
    """Unpickling this creates a file: what a hostile checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_nothing_read_runs_code(reference, tmp_path):
    """Rank state is JSON; a legacy rank-NNNNN.pt is read with weights_only (a pickle that would run code is
    refused); load_pretrained reads safetensors only; the YAML loader builds no Python objects."""
    folder = reference["out"] / "checkpoints" / ckpt.step_name(STEPS)
    state = json.loads(ckpt.rank_file(folder, 1).read_text())
    assert set(state) == {"step", "stream", "rng"} and state["step"] == STEPS

    marker = tmp_path / "code-ran"
    hostile = tmp_path / "step-00000002"
    (hostile / "ranks").mkdir(parents=True)
    with open(hostile / "ranks" / "rank-00000.pt", "wb") as handle:
        pickle.dump({"rng": _RunsCode(marker)}, handle)
    with pytest.raises(ckpt.CheckpointError, match="cannot read .* safely"):
        ckpt.read_rank_state(hostile, 0)
    legacy = tmp_path / "legacy"  # what the previous version wrote: torch.save of numpy / python RNG states
    (legacy / "ranks").mkdir(parents=True)
    ckpt_state = {"step": 2, "stream": {"epoch": 0}, "rng": {"python": __import__("random").getstate(),
                                                           "numpy": __import__("numpy").random.get_state(),
                                                           "torch": torch.get_rng_state()}}
    torch.save(ckpt_state, legacy / "ranks" / "rank-00000.pt")
    ckpt.set_rng_state(ckpt.read_rank_state(legacy, 0)["rng"])

    pickled = tmp_path / "model.pt"
    torch.save({"weights": _RunsCode(marker)}, pickled)
    with pytest.raises(ckpt.CheckpointError, match="only safetensors files are loaded"):
        lasers_dist.load_pretrained(pickled)
    yaml_attack = tmp_path / "attack.yaml"
    yaml_attack.write_text(f"train: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(yaml_attack)
    assert not marker.exists()
