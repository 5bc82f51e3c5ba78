"""Data-parallel correctness of the trainer: 2 ranks (real torchrun, gloo, DeepSpeed ZeRO 0 / 1 / 2) against a
single process that takes each step's global batch (the union of both ranks' batches, in rank order).

After several DL-GAN steps with the discriminator on from step 1, both ranks must hold identical weights and
buffers, equal to the single-process run's to fp32 tolerance. The reference runs at ZeRO-0, where a generator-
step gradient reaching the discriminator engine would raise, so a leak at ZeRO-1 (silent there) also shows up
as a mismatch. Extra runs cover the online dictionary (a parameter without requires_grad, all-reduced
statistics) at ZeRO-2 and the EMA VQ codebook (all-reduced buffers) at ZeRO-1.
"""

from __future__ import annotations

import json

import pytest
import torch

from lasers_dist.config import ConfigError, config_from_dict
from lasers_dist.train.engines import deepspeed_config
from lasers_dist.train.metrics import psnr
from train_support import DRIVER, REPO, run, session_shards, tiny_config, torchrun_command, write_config

pytestmark = pytest.mark.slow

GRAD_CLIP = 5.0  # not DeepSpeed's default 1.0, so an unset key would show
VQ = ["model.bottleneck=vq", "model.num_atoms=32"]
ONLINE = ["model.dictionary_update=online"]
ACCUM = ["optim.grad_accum_steps=2"]  # reference: the same 2 micro-steps, each on the union of the ranks' ones
# name -> (overrides, ZeRO stage of the 2-rank run, DeepSpeed JSON shipped in configs/deepspeed); the part of
# the name before "_" picks the single-process reference.
RUNS = {
    "dl_zero0": ([], 0, "zero0.json"),
    "dl_zero1": ([], 1, "zero1.json"),
    "dl_zero2": ([], 2, "zero2.json"),
    "online_zero2": (ONLINE, 2, None),
    "vq_zero1": (VQ, 1, None),
    "accum_zero2": (ACCUM, 2, None),
}
REFERENCES = {"dl": [], "online": ONLINE, "vq": VQ, "accum": ACCUM}
# With lr 0 only dead-atom revival (after the 3rd step) can change the dictionary; were it not written into
# ZeRO-2's fp32 master copy, the 4th optimizer step would copy the old atoms back.
REVIVE = ["model.revive_dead_every=3", "optim.lr=0.0"]


def _overrides(extra: list[str], stage: int, json_file: str | None) -> list[str]:
    out = [*extra, f"deepspeed.zero_stage={stage}"]
    if json_file:
        out.append(f"deepspeed.config_file={REPO / 'configs' / 'deepspeed' / json_file}")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run the 2-rank trainings (one launch) and the single-process references (one launch)."""
    shards = session_shards(tmp_path_factory)
    root = tmp_path_factory.mktemp("zero")
    config = write_config(root / "cfg.yaml", tiny_config(shards, root / "unused", optim={"grad_clip": GRAD_CLIP}))
    two = [{"name": n, "overrides": _overrides(m, s, j)} for n, (m, s, j) in RUNS.items()]
    two += [{"name": f"probe_zero{s}", "overrides": _overrides([], s, None), "probe": True} for s in (0, 1)]
    two.append({"name": "revive_zero2", "overrides": _overrides(REVIVE, 2, None)})
    one = [{"name": n, "overrides": _overrides(m, 0, None)} for n, m in REFERENCES.items()]
    driver = [str(DRIVER), "--config", str(config)]
    run(torchrun_command(2, *driver, "--out", str(root / "two"), "--runs", json.dumps(two)))
    run(torchrun_command(1, *driver, "--out", str(root / "one"), "--runs", json.dumps(one), "--union", "2"))
    return root


def _load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", list(RUNS))
def test_ranks_identical_and_equal_to_single_process(trained, name):
    rank0 = _load(trained / "two" / name / "weights-rank-0.pt")
    rank1 = _load(trained / "two" / name / "weights-rank-1.pt")
    reference = _load(trained / "one" / name.split("_")[0] / "weights-rank-0.pt")
    initial = _load(trained / "two" / name / "weights-init.pt")
    assert rank0.keys() == rank1.keys() == reference.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{name}: {key} differs between ranks"
        if rank0[key].is_floating_point():
            torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=2e-5,
                                       msg=lambda m: f"{name} {key}: {m}")
        else:  # step counters, usage windows
            assert torch.equal(rank0[key], reference[key]), f"{name}: {key} differs from the single-process run"
    # The steps really trained both networks (the discriminator from step 1 on).
    for prefix in ("generator.decoder", "discriminator."):
        keys = [k for k in rank0 if k.startswith(prefix) and rank0[k].is_floating_point()]
        moved = max((rank0[k] - initial[k]).abs().max().item() for k in keys)
        assert moved > 1e-3, f"{name}: {prefix} did not change"


@pytest.mark.parametrize("name", list(RUNS))
def test_engines_use_our_clipping_and_stage(trained, name):
    overrides, stage, _ = RUNS[name]
    for rank in (0, 1):
        facts = json.loads((trained / "two" / name / f"engine-rank-{rank}.json").read_text())
        assert facts["zero_stage"] == [stage, stage]
        assert facts["gradient_clipping"] == [GRAD_CLIP, GRAD_CLIP]
        # DeepSpeed's CPU accelerator, with its shared-memory comm op marked unavailable (no ~30 s JIT build).
        assert facts["accelerator"] == "cpu" and facts["shm_comm_compatible"] is False
        # The online dictionary has no gradient, so no optimizer (and no ZeRO partition) may own it.
        assert facts["frozen_params"] == (["bottleneck.dictionary"] if overrides == ONLINE else [])


@pytest.mark.parametrize("stage", [0, 1])
def test_generator_step_leaves_discriminator_gradients_alone(trained, stage):
    # At ZeRO-0/1 a leak would not raise (ZeRO-2 asserts "gradient computed twice"): look at the gradients.
    for rank in (0, 1):
        probe = json.loads((trained / "two" / f"probe_zero{stage}" / f"probe-rank-{rank}.json").read_text())
        assert probe["leaked"] == [], f"generator step wrote discriminator gradients: {probe['leaked']}"


def test_revived_atoms_survive_the_next_zero2_step(trained):
    initial = _load(trained / "two" / "revive_zero2" / "weights-init.pt")
    rank0 = _load(trained / "two" / "revive_zero2" / "weights-rank-0.pt")
    rank1 = _load(trained / "two" / "revive_zero2" / "weights-rank-1.pt")
    key = "generator.bottleneck.dictionary"
    assert torch.equal(rank0[key], rank1[key])
    changed = (rank0[key] - initial[key]).abs().amax(dim=1) > 0
    assert 0 < int(changed.sum()) < changed.numel(), "revival should replace some atoms (the dead ones), not all"
    frozen_by_lr0 = [k for k in rank0 if k.startswith("generator.encoder.")]
    assert frozen_by_lr0 and all(torch.equal(rank0[k], initial[k]) for k in frozen_by_lr0)


def test_online_dictionary_moved(trained):
    initial = _load(trained / "two" / "online_zero2" / "weights-init.pt")
    final = _load(trained / "two" / "online_zero2" / "weights-rank-0.pt")
    key = "generator.bottleneck.dictionary"
    assert (final[key] - initial[key]).abs().max() > 1e-3, "block-coordinate descent did not update the dictionary"


def test_metrics_file(trained):
    lines = [json.loads(line) for line in (trained / "two" / "dl_zero1" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    last = lines[-1]
    for key in ("train/loss", "train/recon", "train/mse", "train/lpips", "train/psnr", "train/perplexity",
                "train/dead_atoms", "train/lambda", "train/d_loss", "train/logits_real", "train/logits_fake",
                "val/psnr", "val/perplexity", "images_per_s", "lr", "data/corrupt_samples"):
        assert key in last, key
    assert "train/lambda" not in lines[0]  # the GAN term starts at step 1 (the second step)
    assert 5.0 < last["train/psnr"] < 40.0
    assert 1.0 <= last["train/perplexity"] <= 32.0


def test_psnr_is_measured_on_unit_range():
    target = torch.rand(2, 3, 8, 8) * 1.6 - 0.8
    # An error of 0.2 on [-1, 1] is 0.1 on [0, 1]: MSE 0.01, PSNR 20 dB (on [-1, 1] it would read 14 dB).
    assert psnr(target + 0.2, target).item() == pytest.approx(20.0, abs=1e-3)


def test_deepspeed_config_sets_clipping_and_batches():
    cfg = config_from_dict({"train": {"batch_size": 32}, "optim": {"grad_accum_steps": 2, "grad_clip": 0.0}})
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed's default would clip at 1.0
    batches = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batches == (32, 4, 2)
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"] == {"enabled": False, "check_grad_overflow": True}  # skips non-finite steps (train/step.py)
    assert ds["zero_optimization"]["compute_grad_norm"] is True


def test_deepspeed_file_contradicting_our_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}))
    cfg = config_from_dict({"deepspeed": {"zero_stage": 1, "config_file": str(path)}})
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        deepspeed_config(cfg, world_size=1)
    cfg = config_from_dict({"deepspeed": {"zero_stage": 2, "config_file": str(path)}})
    merged = deepspeed_config(cfg, world_size=1)["zero_optimization"]
    assert merged == {"stage": 2, "overlap_comm": True, "compute_grad_norm": True}
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(cfg, world_size=1)
