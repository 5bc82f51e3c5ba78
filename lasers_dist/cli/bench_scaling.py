"""`lasers-bench scaling`: images/s of a training step for several process layouts, and the share of the step
spent in collectives (the gradient all-reduce above all).

    lasers-bench scaling                               # quickstart model, CPU: 1 process, 2 on one node, 2 agents x 1
    lasers-bench scaling --layouts 1x1,1x8 --device cuda       # one GPU vs the node's 8 GPUs

Each layout NODESxPROCS is a real torchrun launch on this machine: NODES agents (`--nnodes NODES`, c10d rendezvous
on 127.0.0.1, each agent on its own share of the cores with taskset) of PROCS processes each. Every layout uses
all the cores: OMP_NUM_THREADS = cores / processes. The model is the config's (default
configs/quickstart_cpu.yaml) with the discriminator on (loss.disc_start=0), real DeepSpeed engines at the config's
ZeRO stage, `--batch` images per process per step (weak scaling: the global batch grows with the processes), and
fixed random images per rank (the data pipeline is measured by `lasers-bench data`). LPIPS is on when its weights
are in the torch cache, otherwise off, as in launch/quickstart.sh.

Collective time is the wall time spent inside torch.distributed's collectives (and in waiting on their async
handles) during the timed steps, on each rank; it includes waiting for the slower rank. It is reported twice:
all collectives, and the part DeepSpeed's engines issue (the gradient all-reduce, ZeRO's parameter all-gather and
gradient-norm reduction), i.e. all minus the trainer's own small reductions (bottleneck usage, adaptive GAN weight,
non-finite verdict). Step time is the median over steps of the slowest rank's step. The JSON (default
bench_results/scaling.json) holds every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart_cpu.yaml"
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lasers-bench scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment config (model, loss, ZeRO)")
    parser.add_argument("--layouts", default="1x1,1x2,2x1", help="comma-separated NODESxPROCS (default 1x1,1x2,2x1)")
    parser.add_argument("--batch", type=int, default=8, help="images per process per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, default=Path("bench_results/scaling.json"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per layout before it counts as hung")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: run under torchrun
    args = parser.parse_args(argv)
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be positive, --warmup >= 0")
    try:
        args.layouts = [tuple(int(n) for n in item.lower().split("x")) for item in args.layouts.split(",")]
    except ValueError:
        parser.error(f"--layouts {args.layouts!r}: expected NODESxPROCS[,...], e.g. 1x1,1x2,2x1")
    if any(len(layout) != 2 or min(layout) < 1 for layout in args.layouts):
        parser.error(f"--layouts: every entry needs two positive numbers, NODESxPROCS, got {args.layouts}")
    return args


# ---- the worker: one process of a layout, under torchrun -------------------------------------------------


class CollectiveClock:
    """Adds up the wall time spent in torch.distributed collectives while `running`: the calls themselves, and
    waits on the handles of async ones. Installed before DeepSpeed initialises, so the functions it keeps
    references to are the timed ones."""

    def __init__(self) -> None:
        self.seconds = 0.0  # all collectives
        self.engine_seconds = 0.0  # the part issued through deepspeed.comm (DeepSpeed's engines)
        self.calls = 0
        self.running = False
        self._in_engine = 0  # > 0 while a deepspeed.comm function runs

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in COLLECTIVES:
            original = getattr(c10d, name, None)
            if original is not None:
                timed = self._timed(original)
                setattr(c10d, name, timed)
                setattr(dist, name, timed)
        import deepspeed.comm
        import deepspeed.comm.comm

        for name in COLLECTIVES:  # DeepSpeed's modules look these up on deepspeed.comm at call time
            original = getattr(deepspeed.comm.comm, name, None)
            if original is not None:
                marked = self._marked(original)
                setattr(deepspeed.comm.comm, name, marked)
                setattr(deepspeed.comm, name, marked)

    def _marked(self, function: Callable) -> Callable:
        clock = self

        def marked(*args: Any, **kwargs: Any) -> Any:
            clock._in_engine += 1
            try:
                return function(*args, **kwargs)
            finally:
                clock._in_engine -= 1

        return marked

    def _timed(self, function: Callable) -> Callable:
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            engine = clock._in_engine > 0
            start = time.perf_counter()
            handle = function(*args, **kwargs)
            clock._add(time.perf_counter() - start, engine)
            return _TimedHandle(handle, clock, engine) if handle is not None and hasattr(handle, "wait") else handle

        return timed

    def _add(self, seconds: float, engine: bool) -> None:
        if self.running:
            self.seconds += seconds
            self.engine_seconds += seconds if engine else 0.0
            self.calls += 1


class _TimedHandle:
    """An async collective's handle whose wait() is timed; everything else goes to the real handle."""

    def __init__(self, handle: Any, clock: CollectiveClock, engine: bool) -> None:
        self._handle, self._clock, self._engine = handle, clock, engine

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = self._handle.wait(*args, **kwargs)
        self._clock._add(time.perf_counter() - start, self._engine)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def bench_config(path: Path, batch: int, world_size: int, steps: int):
    """The config to time: the discriminator on from step 0, the global batch for this world size, LPIPS only
    with its real weights. Returns (config, lpips_on)."""
    from lasers_dist.config import load_config
    from lasers_dist.losses import backbone_weights_path

    cfg = load_config(path)
    lpips_on = cfg.loss.perceptual_weight > 0 and backbone_weights_path(cfg.loss.lpips_net).is_file()
    loss = replace(cfg.loss, disc_start=0, perceptual_weight=cfg.loss.perceptual_weight if lpips_on else 0.0)
    train = replace(cfg.train, batch_size=batch * world_size * cfg.optim.grad_accum_steps, max_steps=steps + 1)
    return replace(cfg, loss=loss, train=train), lpips_on


def run_worker(args: argparse.Namespace) -> None:
    from lasers_dist.cli.train import _export_for_deepspeed, cpu_threads, dist_env_from_environ, quiet_start_up

    env = dist_env_from_environ(os.environ)
    quiet_start_up(env.rank)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    import torch

    threads = cpu_threads(os.environ, env.local_world_size)[0]
    torch.set_num_threads(threads)
    _export_for_deepspeed(env, args.device)
    clock = CollectiveClock()
    clock.install()

    import deepspeed

    from lasers_dist.losses import ReconstructionLoss
    from lasers_dist.models import build_autoencoder, build_discriminator
    from lasers_dist.train import distributed as D
    from lasers_dist.train.engines import build_engines
    from lasers_dist.train.step import train_step

    deepspeed.utils.logger.setLevel("WARNING")
    device = D.init_distributed(env, args.device, 600.0)
    try:
        cfg, lpips_on = bench_config(args.config, args.batch, env.world_size, args.warmup + args.steps)
        torch.manual_seed(cfg.train.seed)
        engines = build_engines(cfg, build_autoencoder(cfg.model), build_discriminator(cfg.model), env.world_size,
                                device)
        recon = ReconstructionLoss(cfg.loss.perceptual_weight, cfg.loss.lpips_net, False).to(device)
        generator = torch.Generator().manual_seed(cfg.train.seed + env.rank)
        size, channels = cfg.data.image_size, cfg.model.in_channels
        batches = [(x, x) for x in [(torch.rand(args.batch, channels, size, size, generator=generator) * 2 - 1)
                                    .to(device)] * cfg.optim.grad_accum_steps]
        step_times, collective, engine = [], 0.0, 0.0
        for step in range(args.warmup + args.steps):
            D.barrier()  # every rank starts the step together: the step time is not last step's skew
            if args.device == "cuda":
                torch.cuda.synchronize(device)
            timed = step >= args.warmup
            clock.running, clock.seconds, clock.engine_seconds = timed, 0.0, 0.0
            start = time.perf_counter()
            train_step(engines, recon, batches, step, cfg)
            if args.device == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            clock.running = False
            if timed:
                step_times.append(elapsed)
                collective += clock.seconds
                engine += clock.engine_seconds
        per_rank = torch.tensor([*step_times, collective, engine], dtype=torch.float64, device=device)
        everyone = [torch.zeros_like(per_rank) for _ in range(env.world_size)]
        torch.distributed.all_gather(everyone, per_rank)
        if env.rank == 0:
            rows = torch.stack(everyone).cpu()  # (world, steps + 2)
            slowest = rows[:, :-2].max(dim=0).values
            step_s = statistics.median(slowest.tolist())
            busy = rows[:, :-2].sum(dim=1)
            shares, engine_shares = (rows[:, -2] / busy).tolist(), (rows[:, -1] / busy).tolist()
            args.worker.write_text(json.dumps({
                "processes": env.world_size, "threads_per_process": threads, "step_ms": 1e3 * step_s,
                "images_per_s": args.batch * env.world_size / step_s, "collective_share": statistics.mean(shares),
                "collective_share_per_rank": shares, "engine_share": statistics.mean(engine_shares),
                "engine_share_per_rank": engine_shares, "lpips": lpips_on, "zero_stage": cfg.deepspeed.zero_stage,
                "image_size": size, "step_ms_all": (1e3 * slowest).tolist(),
            }))
    finally:
        D.shutdown_distributed()


# ---- the launcher: one torchrun launch per layout ---------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_layout(args: argparse.Namespace, nodes: int, procs: int, out: Path) -> dict:
    """Run one layout to completion; its rank 0 writes `out`."""
    cores = sorted(os.sched_getaffinity(0))
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, len(cores) // (nodes * procs)))
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    worker = ["-m", "lasers_dist.cli.bench_scaling", "--worker", str(out), "--config", str(args.config),
              "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--device", args.device]
    port = _free_port()
    agents = []
    for node in range(nodes):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={procs}",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=lasers-bench-scaling",
                   *worker]
        share = cores[node * len(cores) // nodes:(node + 1) * len(cores) // nodes]
        if nodes > 1 and share and shutil.which("taskset"):  # each "node" its own cores, as on a cluster
            command = ["taskset", "-c", ",".join(map(str, share)), *command]
        agents.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [agent.communicate(timeout=args.timeout)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    failed = [(agent.returncode, text) for agent, text in zip(agents, outputs) if agent.returncode != 0]
    if failed or not out.is_file():
        code, text = failed[0] if failed else (0, outputs[0])
        raise RuntimeError(f"layout {nodes}x{procs} failed (exit {code}):\n{text[-4000:]}")
    return json.loads(out.read_text())


def print_table(result: dict) -> None:
    print(f"config {result['config']}, {result['batch']} images per process per step at {result['image_size']}^2, "
          f"ZeRO-{result['zero_stage']}, LPIPS {'on' if result['lpips'] else 'off (weights not cached)'}, "
          f"{result['device']}, {result['cores']} cores, median of {result['steps']} steps")
    header = ("layout", "processes", "threads/proc", "step ms", "images/s", "speed-up", "DeepSpeed comm",
              "all collectives")
    rows = [(f"{r['nodes']} node(s) x {r['procs_per_node']}", str(r["processes"]), str(r["threads_per_process"]),
             f"{r['step_ms']:.1f}", f"{r['images_per_s']:.1f}", f"{r['speedup']:.2f}x",
             f"{100 * r['engine_share']:.1f}%", f"{100 * r['collective_share']:.1f}%") for r in result["rows"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return None
    rows = []
    with tempfile.TemporaryDirectory(prefix="lasers-bench-scaling-") as tmp:
        for nodes, procs in args.layouts:
            print(f"[scaling] {nodes} node(s) x {procs} process(es) ...", flush=True)
            row = launch_layout(args, nodes, procs, Path(tmp) / f"{nodes}x{procs}.json")
            rows.append({"nodes": nodes, "procs_per_node": procs, **row})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    result = {"config": str(args.config), "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
              "device": args.device, "cores": len(os.sched_getaffinity(0)), "image_size": rows[0]["image_size"],
              "zero_stage": rows[0]["zero_stage"], "lpips": rows[0]["lpips"], "rows": rows}
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
