"""Multi-node training without Slurm: two torchrun agents (`--nnodes 2`, c10d rendezvous on 127.0.0.1), one
process each, each agent pinned to its own core with taskset, against one agent with 2 processes, each pinned to
its own core. Every process runs one CPU thread in both layouts, so the trained weights must be bit-identical.

Also the per-process CPU thread count: OMP_NUM_THREADS when it is set (by the user, or torchrun's default of 1),
else the cores this process may use, split among the processes of its node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lasers_dist.cli.train import cpu_threads
from lasers_dist.train import checkpoint as ckpt
from train_support import REPO, child_env, free_port, run, session_shards, tiny_config, write_config

STEPS = 4
PIN = str(REPO / "tests" / "pin_to_core.py")


def _output(proc) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    if shutil.which("taskset") is None:
        pytest.skip("needs taskset (util-linux) to give each agent its own core")
    shards = session_shards(tmp_path_factory)
    root = tmp_path_factory.mktemp("multinode")
    config = write_config(root / "cfg.yaml", tiny_config(shards, root / "unused", train={"max_steps": STEPS}))
    train = ["-m", "lasers_dist.cli.train", "--config", str(config)]

    one = run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", PIN, *train,
               f"train.out_dir={root / 'one_agent'}"])

    cores = sorted(os.sched_getaffinity(0))
    port = free_port()
    agents = [
        subprocess.Popen(
            ["taskset", "-c", str(cores[node % len(cores)]), sys.executable, "-m", "torch.distributed.run",
             "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             "--rdzv_id=lasers-multinode-test", *train, f"train.out_dir={root / 'two_agents'}"],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=300)
            outputs.append(out + err)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, text in zip(agents, outputs):
        assert agent.returncode == 0, f"an agent exited {agent.returncode}:\n{text[-6000:]}"
    return {"root": root, "one": _output(one), "two": "\n".join(outputs)}


@pytest.mark.slurm
@pytest.mark.slow
def test_two_agents_equal_one_agent_bit_for_bit(layouts):
    final = ckpt.step_name(STEPS)
    one = load_file(layouts["root"] / "one_agent" / "checkpoints" / final / "model.safetensors")
    two = load_file(layouts["root"] / "two_agents" / "checkpoints" / final / "model.safetensors")
    assert one.keys() == two.keys()
    assert [k for k in one if not torch.equal(one[k], two[k])] == []
    metrics = [[json.loads(line) for line in (layouts["root"] / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one_agent", "two_agents")]
    assert [r["train/loss"] for r in metrics[0]] == [r["train/loss"] for r in metrics[1]]
    assert len(metrics[0]) == STEPS


@pytest.mark.slurm
@pytest.mark.slow
def test_start_up_line_names_the_layout_and_threads(layouts):
    assert "2 process(es) (1 node(s) x 2)" in layouts["one"]
    assert "2 process(es) (2 node(s) x 1)" in layouts["two"]
    # One agent, 2 processes: torchrun's OMP_NUM_THREADS=1 (unless the user set it); two agents of one process
    # each on one core: 1 core / 1 process.
    user = os.environ.get("OMP_NUM_THREADS")
    expected = f"{user} CPU thread(s) per process (OMP_NUM_THREADS)" if user else "1 CPU thread(s) per process"
    assert expected in layouts["one"] and expected in layouts["two"]
    assert layouts["two"].count("lasers-train: 2 process(es)") == 1  # rank 0 only


def test_cpu_threads_respects_omp_num_threads():
    assert cpu_threads({"OMP_NUM_THREADS": "3"}, local_world_size=2) == (3, "OMP_NUM_THREADS")
    assert cpu_threads({"OMP_NUM_THREADS": " 6,2 "}, local_world_size=8)[0] == 6  # OpenMP's nested form
    cores = len(os.sched_getaffinity(0))
    threads, why = cpu_threads({}, local_world_size=1)
    assert threads == cores and "cores" in why
    assert cpu_threads({}, local_world_size=cores * 4)[0] == 1
    for bad in ("0", "four", "-2"):
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            cpu_threads({"OMP_NUM_THREADS": bad}, local_world_size=1)


@pytest.mark.slurm
@pytest.mark.slow
def test_scaling_bench_two_agents(tmp_path_factory, tmp_path, capsys):
    """`lasers-bench scaling` with its most involved layout: two torchrun agents (c10d, one core each)."""
    from lasers_dist.cli.bench import main as bench

    config = write_config(tmp_path / "cfg.yaml", tiny_config(session_shards(tmp_path_factory), tmp_path / "unused"))
    out = tmp_path / "scaling.json"
    assert bench(["scaling", "--config", str(config), "--layouts", "2x1", "--batch", "2", "--steps", "2",
                  "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["nodes"], row["procs_per_node"], row["processes"]) == (2, 1, 2)
    assert row["images_per_s"] > 0 and row["speedup"] == 1.0 and len(row["step_ms_all"]) == 2
    # The gradient all-reduce (and DeepSpeed's other collectives) were timed on both ranks.
    assert len(row["collective_share_per_rank"]) == 2
    assert all(0 < share < 1 for share in row["collective_share_per_rank"])
    # DeepSpeed's own communication is a part of it, and the trainer's small reductions are the rest.
    assert all(0 < engine < share for engine, share in zip(row["engine_share_per_rank"],
                                                           row["collective_share_per_rank"]))
    assert "2 node(s) x 1" in capsys.readouterr().out
