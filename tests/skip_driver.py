"""Test driver (not collected by pytest): how a non-finite step is skipped, on real DeepSpeed engines.

    python -m torch.distributed.run --nproc_per_node=2 ... tests/skip_driver.py --config CFG.yaml --out DIR \
        --cases '[{"name": "zero1-bf16", "overrides": ["deepspeed.zero_stage=1", "train.precision=bf16"]}]'

For each case every rank builds a Trainer (real engines, real stream) and takes, through train_step:
  1. a good step;
  2. a step whose batch on rank 1 only is NaN (its latents, then its loss, are not finite);
  3. a step where rank 1's gradient of an encoder weight is made NaN by a hook (losses stay finite: the engines'
     own gradient checks must refuse it);
  4. a good step.
Every rank writes DIR/NAME/rank-R.json: per step whether it was skipped and why, and whether weights, optimizer
state, LR and the module's buffers changed; and the timeout of the process group DeepSpeed reduces gradients
over (it must be train.collective_timeout_s, not torch's 30-minute default for new groups).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from lasers_dist.train import distributed as D  # noqa: E402


def _flat(value, out: list) -> list:
    """Every tensor in a nested container, in a fixed order."""
    if isinstance(value, torch.Tensor):
        out.append(value.detach().float().cpu().clone())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _flat(value[key], out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _flat(item, out)
    return out


def snapshot(trainer) -> dict[str, list]:
    engines = [e for e in (trainer.engines.generator, trainer.engines.discriminator) if e is not None]
    return {
        "weights": _flat([e.module.state_dict() for e in engines], []),
        "optimizer": _flat([e.optimizer.state_dict() for e in engines], []),
        "lr": [float(e.get_lr()[0]) for e in engines],
        "schedule": [e.lr_scheduler.last_epoch for e in engines],
        "buffers": _flat([dict(e.module.named_buffers()) for e in engines], []),
    }


def changed(before: dict, after: dict) -> dict[str, bool]:
    out = {}
    for key in before:
        a, b = before[key], after[key]
        if key in ("lr", "schedule"):
            out[key] = a != b
        else:
            out[key] = len(a) != len(b) or any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))
    return out


def run_case(case: dict, args, env, device) -> dict:
    from lasers_dist.config import load_config
    from lasers_dist.train.step import train_step
    from lasers_dist.train.trainer import Trainer, split_batch

    cfg = load_config(args.config, [*case["overrides"], f"train.out_dir={Path(args.out) / case['name']}"])
    trainer = Trainer(cfg, env, device, progress=False)
    batches = trainer.train_stream.forever()
    # Not the decoder's last layer: the adaptive GAN weight differentiates through it, and a NaN there would make
    # the loss itself NaN; a NaN in an encoder gradient leaves every loss finite.
    first_weight = next(trainer.engines.generator.module.encoder.parameters())
    steps = []
    for index, kind in enumerate(("good", "nan_batch_on_rank_1", "nan_grad_on_rank_1", "good")):
        inputs, targets = split_batch(next(batches), device)
        hook = None
        if kind == "nan_batch_on_rank_1" and env.rank == 1:
            inputs = torch.full_like(inputs, float("nan"))
        if kind == "nan_grad_on_rank_1" and env.rank == 1:
            hook = first_weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        before = snapshot(trainer)
        outcome = train_step(trainer.engines, trainer.recon_loss, [(inputs, targets)], index, cfg)
        if hook is not None:
            hook.remove()
        after = snapshot(trainer)
        weights = torch.cat([w.reshape(-1) for w in after["weights"]])
        steps.append({"kind": kind, "skipped": outcome.skipped, "reason": outcome.reason,
                      "changed": changed(before, after), "weights_sum": float(weights.double().sum()),
                      "weights_finite": bool(torch.isfinite(weights).all())})
    trainer.close()
    return {"steps": steps, "group_timeout_s": group_timeout_s(trainer.engines.generator.seq_data_parallel_group)}


def group_timeout_s(group) -> float:
    """The timeout a gloo process group was created with."""
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    from lasers_dist.cli.train import dist_env_from_environ

    env = dist_env_from_environ(os.environ)
    torch.set_num_threads(1)
    device = D.init_distributed(env, "cpu", args.timeout)
    results = {case["name"]: run_case(case, args, env, device) for case in json.loads(args.cases)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{env.rank}.json").write_text(json.dumps(results))
    D.barrier()
    D.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
