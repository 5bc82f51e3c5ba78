"""Test driver (not collected by pytest): `lasers-train` with an exception raised on one rank at one step.

    python -m torch.distributed.run --nproc_per_node=2 ... tests/fault_driver.py --fault-rank 1 --fault-step 3 \
        -- --config CFG.yaml [overrides ...]

Everything is the real entry point (lasers_dist.cli.train.main: real process group, engines, shard stream with
its DataLoader workers); only the training step of one rank raises, the stand-in for any bug or unexpected error
in the loop, so the test can watch how the job ends.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault-rank", type=int, required=True)
    parser.add_argument("--fault-step", type=int, required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    from lasers_dist.cli import train as cli
    from lasers_dist.train import trainer

    real_step = trainer.train_step

    def faulty_step(engines, recon_loss, micro_batches, step, cfg):
        if int(os.environ["RANK"]) == args.fault_rank and step == args.fault_step:
            raise RuntimeError(f"injected fault on rank {args.fault_rank} at step {step}")
        return real_step(engines, recon_loss, micro_batches, step, cfg)

    trainer.train_step = faulty_step
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return cli.main(train_args)


if __name__ == "__main__":
    sys.exit(main())
