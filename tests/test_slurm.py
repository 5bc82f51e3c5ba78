"""The Slurm scripts against a real controller: a one-node cluster (munged, slurmctld, slurmd) started on this
machine by launch/local_slurm.sh, which the module's fixture installs (Debian's slurm-wlm and munge, as root),
starts and stops again.

`sbatch slurm/dlgan_ffhq.sh` runs with the script's own config and command-line overrides for a tiny model on
the session's 32x32 photo shards, CPU, 2 processes (`--gres=none --gpus-per-node=0` override the script's
GPUs, as on a CPU partition):
- an uninterrupted job completes and leaves a complete checkpoint, metrics and status "finished";
- USR1 to the batch shell mid-run (`scancel --batch --signal=USR1`, what `--signal=B:USR1@600` sends before the
  time limit): the ranks checkpoint through the stop file, the script requeues, the job resumes and finishes
  with weights bit-identical to the uninterrupted job's, and every logged step is in metrics.jsonl once;
- a config that fails lasers-train's checks ends the job at once, without a requeue.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.run
from safetensors.torch import load_file

from lasers_dist.train import checkpoint as ckpt
from train_support import REPO, child_env, session_shards, tiny_config, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

LOCAL_SLURM = REPO / "launch" / "local_slurm.sh"
STEPS = 60  # long enough that a USR1 sent after step 1 lands mid-run even on a loaded machine
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster; its daemons are stopped (and only they) at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test cluster's munged, slurmctld and slurmd run as root (CI runs as root)")
    install = subprocess.run(["bash", str(LOCAL_SLURM), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode == 3:  # not Debian-like: nothing to install it with
        pytest.skip(f"Slurm is not installed and cannot be installed here: {install.stderr.strip()}")
    assert install.returncode == 0, f"installing slurm-wlm and munge failed:\n{install.stdout}\n{install.stderr}"
    state = tmp_path_factory.mktemp("slurm-cluster")
    start = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(state)], capture_output=True, text=True,
                           timeout=180)
    try:
        assert start.returncode == 0, f"the test cluster did not start:\n{start.stderr}"
        yield state / "slurm.conf"
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(state)], capture_output=True, timeout=300)


def _overrides() -> list[str]:
    """tiny_config's model, loss, optimiser and schedule as command-line overrides of configs/dlgan_ffhq.yaml
    (data and run directory come through LASERS_DATA_DIR / LASERS_RUN_DIR)."""
    cfg = tiny_config(Path("unused"), Path("unused"), train={"max_steps": STEPS, "precision": "fp32"})
    skip = {"data.train_shards", "data.val_shards", "train.out_dir"}
    return [f"{section}.{key}={json.dumps(value)}" for section, values in cfg.items() for key, value in values.items()
            if f"{section}.{key}" not in skip]


def _env(slurm_conf: Path, shards: Path, run_dir: Path) -> dict[str, str]:
    env = child_env()
    env.update(SLURM_CONF=str(slurm_conf), LASERS_PYTHON=sys.executable, LASERS_NPROC_PER_NODE="2",
               LASERS_DATA_DIR=str(shards), LASERS_RUN_DIR=str(run_dir))
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]  # pytest itself may run inside a Slurm job
    return env


def sbatch(slurm_conf: Path, workdir: Path, env: dict[str, str], *args: str) -> int:
    cpus = min(2, os.cpu_count() or 1)
    cmd = ["sbatch", "--parsable", "--gres=none", "--gpus-per-node=0", f"--cpus-per-task={cpus}",
           f"--chdir={workdir}", f"--output={workdir}/%x-%j.out", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
    return int(proc.stdout.strip().split(";")[0])


def job_info(job: int, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(condition, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    tail = log_text(log)[-4000:] if log is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")


def wait_until_ended(job: int, env: dict[str, str], log: Path, timeout: float = 300) -> dict[str, str]:
    return wait_for(lambda: (info := job_info(job, env)).get("JobState") in ENDED and info, timeout,
                    f"job {job} to end", log)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def has_logged_a_step(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"  # a complete line: the trainer writes one per step, newline last
    return path.is_file() and "\n" in path.read_text()


def log_text(log: Path) -> str:
    # Several processes write progress bars into one job log: a multi-byte character may come out torn.
    return log.read_bytes().decode("utf-8", "replace").replace("\r", "\n") if log.is_file() else ""


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """One `sbatch slurm/dlgan_ffhq.sh` that runs to the end."""
    shards = session_shards(tmp_path_factory)
    work = tmp_path_factory.mktemp("sbatch-whole")
    env = _env(slurm, shards, work / "run")
    started = time.monotonic()
    job = sbatch(slurm, work, env, str(REPO / "slurm" / "dlgan_ffhq.sh"), *_overrides())
    log = work / f"dlgan_ffhq-{job}.out"
    info = wait_until_ended(job, env, log)
    return {"job": job, "info": info, "log": log, "run": work / "run", "seconds": time.monotonic() - started}


def test_sbatch_job_completes(uninterrupted):
    info, run = uninterrupted["info"], uninterrupted["run"]
    text = log_text(uninterrupted["log"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "0"
    final = run / "checkpoints" / ckpt.step_name(STEPS)
    assert ckpt.read_meta(final)["step"] == STEPS
    assert (final / "model.safetensors").is_file() and not list((run / "checkpoints").glob(".tmp-*"))
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    # The log names the job, the nodes, the rendezvous and the resolved config before training starts.
    job = uninterrupted["job"]
    assert f"job {job} (dlgan_ffhq), start 1 (SLURM_RESTART_COUNT=0)" in text
    assert "x 2 process(es); rendezvous c10d" in text and f"id {job}" in text
    assert "configs/dlgan_ffhq.yaml" in text and "# resume: none (fresh start)" in text
    assert "hidden_channels: 32" in text and f"out_dir: {run}" in text  # the resolved config: overrides applied
    if "--signals-to-handle" in Path(torch.distributed.run.__file__).read_text():  # torch >= 2.9 or so
        assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=600" in text
    else:
        assert "this torch's torchrun has no --signals-to-handle" in text
    assert "Setting OMP_NUM_THREADS" not in text  # the script sets it: no torchrun banner
    assert "run finished" in text


def test_usr1_checkpoints_requeues_and_resumes(slurm, uninterrupted, tmp_path_factory):
    shards = session_shards(tmp_path_factory)
    work = tmp_path_factory.mktemp("sbatch-usr1")
    run = work / "run"
    env = _env(slurm, shards, run)
    job = sbatch(slurm, work, env, str(REPO / "slurm" / "dlgan_ffhq.sh"), *_overrides())
    log = work / f"dlgan_ffhq-{job}.out"
    wait_for(lambda: has_logged_a_step(run), 180, "the first logged step", log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=env, check=True, timeout=30)
    info = wait_until_ended(job, env, log)
    text = log_text(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1", text[-4000:]

    # What the preempted job printed, in order: the trap, the ranks' checkpoint, the requeue, the resume.
    stopped_line = next(line for line in text.splitlines() if "stopped early at step" in line)
    stop_step = int(stopped_line.split("stopped early at step ")[1].split()[0])
    assert 1 <= stop_step < STEPS, stopped_line
    expected = ["USR1: asking the ranks to checkpoint and stop",
                f"stopped early at step {stop_step} (stop_file)",
                f"status: stopped (stop_file) at step {stop_step}",
                f"requeueing job {job} (stopped on USR1)",
                f"job {job} (dlgan_ffhq), start 2 (SLURM_RESTART_COUNT=1)",
                f"# resume: {run / 'checkpoints' / ckpt.step_name(stop_step)}",
                f"resumed from {run / 'checkpoints' / ckpt.step_name(stop_step)} at step {stop_step}",
                f"status: finished (finished) at step {STEPS}"]
    positions = [text.find(line) for line in expected]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), \
        f"missing or out of order: {[e for e, p in zip(expected, positions) if p < 0]}\n{text[-5000:]}"
    assert not (run / "STOP").exists()  # consumed by rank 0 after the stop's checkpoint

    final = ckpt.step_name(STEPS)
    whole = load_file(uninterrupted["run"] / "checkpoints" / final / "model.safetensors")
    resumed = load_file(run / "checkpoints" / final / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []
    assert logged_steps(run) == list(range(1, STEPS + 1))  # every step once, none repeated after the resume
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (uninterrupted["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in lines] == [r["train/loss"] for r in reference]


def test_scancel_checkpoints_and_is_not_requeued(slurm, tmp_path_factory):
    # TERM reaches the batch shell too: the ranks checkpoint, but a cancelled job must stay cancelled.
    work = tmp_path_factory.mktemp("sbatch-cancel")
    run = work / "run"
    env = _env(slurm, session_shards(tmp_path_factory), run)
    job = sbatch(slurm, work, env, str(REPO / "slurm" / "dlgan_ffhq.sh"), *_overrides(), "train.max_steps=100000")
    log = work / f"dlgan_ffhq-{job}.out"
    wait_for(lambda: has_logged_a_step(run), 180, "the first logged step", log)
    subprocess.run(["scancel", str(job)], env=env, check=True, timeout=30)
    # The script's last word comes after its requeue decision: once it is in the log, no requeue can follow.
    decided = "Slurm is ending this job (TERM): not requeued by this script"
    wait_for(lambda: decided in log_text(log), 120, "the batch script's decision", log)
    info = wait_until_ended(job, env, log, timeout=120)
    text = log_text(log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", text[-4000:]
    assert "TERM: asking the ranks to checkpoint and stop" in text and "requeueing" not in text
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] in ("SIGTERM", "stop_file"), status
    assert ckpt.read_meta(run / "checkpoints" / ckpt.step_name(status["step"]))["step"] == status["step"]


def test_bad_config_fails_at_once_without_requeue(slurm, tmp_path_factory):
    work = tmp_path_factory.mktemp("sbatch-bad")
    env = _env(slurm, session_shards(tmp_path_factory), work / "run")
    job = sbatch(slurm, work, env, str(REPO / "slurm" / "dlgan_ffhq.sh"), *_overrides(), "model.sparsity=99")
    log = work / f"dlgan_ffhq-{job}.out"
    info = wait_until_ended(job, env, log, timeout=120)
    text = log_text(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text
    assert "model.sparsity=99 must be in [1, model.num_atoms=32]" in text
    assert "lasers-train --check failed (exit 2): fix the config; not requeued" in text
    assert "launching" not in text and not (work / "run").exists()


def test_sweep_runs_one_array_task_per_config(slurm, tmp_path_factory):
    shards = session_shards(tmp_path_factory)
    work = tmp_path_factory.mktemp("sweep")
    configs = work / "configs"
    configs.mkdir()
    write_config(configs / "a_dl.yaml", tiny_config(shards, work / "unused", train={"max_steps": 2}))
    write_config(configs / "b_vq.yaml", tiny_config(shards, work / "unused", train={"max_steps": 2},
                                                   model={"bottleneck": "vq"}))
    env = _env(slurm, shards, work / "ignored")
    env.update(LASERS_SWEEP_CONFIGS=str(configs / "*.yaml"), LASERS_RUN_ROOT=str(work / "runs"),
               LASERS_NPROC_PER_NODE="1")
    # Submitted the documented way (bash, not sbatch), with sbatch options before "--" for this CPU node.
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "sweep_paper.sh"), "--gres=none", "--gpus-per-node=0", "--cpus-per-task=1",
         f"--chdir={work}", f"--output={work}/%x-%A_%a.out", "--", "train.log_every=2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "submitting 2 array tasks: a_dl.yaml b_vq.yaml" in proc.stdout + proc.stderr
    job = int(proc.stdout.split("Submitted batch job")[1].split()[0])

    def tasks() -> list[dict[str, str]]:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True,
                             timeout=30).stdout
        return [dict(i.split("=", 1) for i in line.split() if "=" in i) for line in out.splitlines() if line]

    records = wait_for(lambda: (t := tasks()) and len(t) == 2 and all(r["JobState"] in ENDED for r in t) and t,
                       240, f"array job {job}'s 2 tasks to end")
    logs = "\n".join(log_text(p) for p in work.glob("*.out"))
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    assert all(r["JobState"] == "COMPLETED" for r in records), logs[-5000:]
    for name, bottleneck in (("a_dl", "dictionary"), ("b_vq", "vq")):
        run = work / "runs" / name
        assert ckpt.read_meta(run / "checkpoints" / ckpt.step_name(2))["config"]["model"]["bottleneck"] == bottleneck
        assert logged_steps(run) == [2]  # the command line's override reached every task


def test_local_cluster_uses_the_machines_cpus_and_memory(slurm):
    conf = slurm.read_text()
    node = next(line for line in conf.splitlines() if line.startswith("NodeName="))
    assert f"CPUs={os.cpu_count()}" in node or f"CPUs={len(os.sched_getaffinity(0))}" in node
    mem_mb = int(next(p for p in node.split() if p.startswith("RealMemory=")).split("=")[1])
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert 0.9 * total_mb <= mem_mb <= total_mb
    assert shutil.which("sbatch") is not None
