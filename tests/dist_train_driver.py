"""Test driver (not collected by pytest): run several short trainings in one torchrun launch and dump weights.

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/dist_train_driver.py \
        --config CFG.yaml --out DIR --runs '[{"name": "zero1", "overrides": ["deepspeed.zero_stage=1"]}]' \
        [--union K]

Each run trains with lasers_dist's Trainer (real DeepSpeed engines, real process group) into DIR/NAME and every
rank writes DIR/NAME/weights-rank-R.pt: the generator's and discriminator's full state dicts (parameters and
buffers). One launch serves several runs because starting torch + DeepSpeed costs most of a short run's time.

--union K (with one process): the single-process reference. Its training stream is the union of the K rank
streams a K-rank run would read, concatenated in rank order, so it sees each step's global batch at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from lasers_dist.train import distributed as D  # noqa: E402


class UnionStream:
    """The batches of several rank streams, concatenated along the batch dimension (rank order)."""

    def __init__(self, streams: list) -> None:
        self.streams = streams

    def forever(self):
        for parts in zip(*(s.forever() for s in self.streams)):
            batch = {"images": torch.cat([p["images"] for p in parts])}
            if "inputs" in parts[0]:
                batch["inputs"] = torch.cat([p["inputs"] for p in parts])
            yield batch

    def state_dict(self) -> dict:
        return {"union": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        for s, part in zip(self.streams, state["union"]):
            s.load_state_dict(part)

    def set_epoch(self, epoch: int) -> None:
        for s in self.streams:
            s.set_epoch(epoch)

    @property
    def corrupt_count(self) -> int:
        return sum(s.corrupt_count for s in self.streams)


def full_state(engines) -> dict[str, torch.Tensor]:
    """Generator and discriminator state dicts (parameters and buffers), prefixed, cloned."""
    state = {f"generator.{k}": v.detach().clone() for k, v in engines.generator.module.state_dict().items()}
    if engines.discriminator is not None:
        state.update({f"discriminator.{k}": v.detach().clone()
                      for k, v in engines.discriminator.module.state_dict().items()})
    return state


def probe_leak(trainer, cfg, device, path: Path) -> None:
    """One generator micro-step with the GAN term on; record discriminator parameters that received a gradient
    (they must not: the generator step may only update the generator)."""
    from lasers_dist.train.step import generator_micro_step
    from lasers_dist.train.trainer import split_batch

    inputs, targets = split_batch(next(trainer.train_stream.forever()), device)
    generator_micro_step(trainer.engines, trainer.recon_loss, inputs, targets, cfg.loss.disc_start, cfg)
    disc = trainer.engines.discriminator.module
    leaked = [n for n, p in disc.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"leaked": leaked}))
    D.barrier()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="JSON list of {name, overrides}")
    parser.add_argument("--union", type=int, default=0)
    args = parser.parse_args()

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from lasers_dist.cli.train import dist_env_from_environ
    from lasers_dist.config import load_config, validate
    from lasers_dist.train.trainer import Trainer, build_train_stream

    env = dist_env_from_environ(os.environ)
    torch.set_num_threads(1)
    device = D.init_distributed(env, "cpu", 120.0)
    for run in json.loads(args.runs):
        out_dir = Path(args.out) / run["name"]
        cfg = load_config(args.config, [*run["overrides"], f"train.out_dir={out_dir}"])
        validate(cfg, env.world_size)
        stream = None
        if args.union:
            rank_envs = [replace(env, rank=r, world_size=args.union, local_world_size=args.union)
                         for r in range(args.union)]
            stream = UnionStream([build_train_stream(cfg, rank_env) for rank_env in rank_envs])
        trainer = Trainer(cfg, env, device, train_stream=stream, progress=False)
        engines = trainer.engines
        if run.get("probe"):
            probe_leak(trainer, cfg, device, out_dir / f"probe-rank-{env.rank}.json")
            continue
        if env.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(full_state(engines), out_dir / "weights-init.pt")
        trainer.fit()
        torch.save(full_state(engines), out_dir / f"weights-rank-{env.rank}.pt")
        facts = {
            "zero_stage": [e.zero_optimization_stage() for e in (engines.generator, engines.discriminator) if e],
            "gradient_clipping": [e.gradient_clipping() for e in (engines.generator, engines.discriminator) if e],
            "frozen_params": [n for n, p in engines.generator.module.named_parameters() if not p.requires_grad],
            "shm_comm_compatible": deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"),
            "accelerator": get_accelerator().device_name(),
        }
        (out_dir / f"engine-rank-{env.rank}.json").write_text(json.dumps(facts))
        D.barrier()
    D.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
