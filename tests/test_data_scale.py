"""Full resolution: the deep model with activation checkpointing at 256^2 (gradients equal to plain backprop, the GAN's
adaptive weight included), `lasers-bench memory` end to end on one small setting, and the 1024^2 end-to-end
training, which runs only when asked (LASERS_TEST_1024=1: minutes on a CPU)."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lasers_dist.cli.bench import main as bench_main
from lasers_dist.config import load_config
from lasers_dist.losses import adaptive_weight, generator_loss
from lasers_dist.models import build_autoencoder, build_discriminator
from lasers_dist.cli.bench_memory import project
from train_support import REPO, run, train_cli, write_config

FFHQ1024 = REPO / "configs" / "dlgan_ffhq1024.yaml"


def deep_1024_model(hidden: int = 8, groups: int = 4):
    """The shipped 1024^2 DL-GAN's model section (4 downsamplings, attention, 2 res blocks, checkpointing),
    narrowed to `hidden` base channels so that a CPU test takes seconds."""
    model = load_config(FFHQ1024).model
    return replace(model, hidden_channels=hidden, norm_groups=groups, num_atoms=64, omp_backend="torch",
                   disc_channels=8, disc_layers=3)


@pytest.fixture
def one_thread():
    """Small convolutions on a shared 2-core machine run several times faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_activation_checkpointing_at_256_gives_the_same_gradients_as_plain_backprop(one_thread):
    cfg = deep_1024_model()
    assert cfg.architecture == "deep" and cfg.attention and cfg.checkpoint_activations
    torch.manual_seed(0)
    checkpointed = build_autoencoder(cfg).train()
    plain = build_autoencoder(replace(cfg, checkpoint_activations=False)).train()
    plain.load_state_dict(checkpointed.state_dict())
    discriminator = build_discriminator(cfg).eval().requires_grad_(False)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    losses = []
    for model in (plain, checkpointed):
        out = model(x)
        recon = F.mse_loss(out.reconstructions, x) + out.bottleneck_loss
        g_loss = generator_loss(discriminator(out.reconstructions))
        weight = adaptive_weight(recon, g_loss, model.last_layer)  # autograd.grad through the checkpointed blocks
        loss = recon + weight * g_loss
        loss.backward()
        losses.append((loss.detach(), weight))
    torch.testing.assert_close(losses[0], losses[1])
    assert out.latents.shape[-1] == 256 // 16  # four downsamplings, as at 1024^2
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_memory_bench_measures_one_setting_in_its_own_process(tmp_path, capsys):
    model = deep_1024_model(8, 4)
    keys = ("architecture", "hidden_channels", "channel_mult", "num_res_blocks", "attention", "norm_groups",
            "num_atoms", "embed_dim", "sparsity", "disc_channels", "disc_layers", "discriminator")
    config = write_config(tmp_path / "small.yaml", {"model": {k: getattr(model, k) for k in keys},
                                                    "loss": {"perceptual_weight": 0.0},
                                                    "deepspeed": {"zero_stage": 2}})
    out = tmp_path / "memory.json"
    assert bench_main(["memory", "--config", str(config), "--sizes", "64", "--batches", "1", "--checkpointing",
                       "on", "--precisions", "fp32", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert "error" not in row, row
    assert (row["size"], row["batch"], row["checkpointing"], row["precision"]) == (64, 1, "on", "fp32")
    assert row["peak_bytes"] >= row["before_step_bytes"] > 0 and row["step_s"] > 0 and row["zero_stage"] == 2
    assert report["projection"] == []  # one batch size: nothing to fit
    assert "peak MB" in capsys.readouterr().out


def test_memory_projection_is_the_linear_fit_of_two_batches():
    mb = 2**20
    rows = [{"size": 1024, "checkpointing": "on", "precision": "bf16", "batch": b, "peak_bytes": p * mb}
            for b, p in ((1, 3000), (2, 5000))]
    rows.append({"size": 1024, "checkpointing": "off", "precision": "bf16", "batch": 1, "error": "out of memory"})
    (fit,) = project(rows, 80e9)
    assert fit["per_image_bytes"] == 2000 * mb and fit["fixed_bytes"] == 1000 * mb
    assert fit["projected_batch"] == int((80e9 - 1000 * mb) // (2000 * mb))


@pytest.mark.skipif(os.environ.get("LASERS_TEST_1024") != "1",
                    reason="1024^2 end-to-end training takes minutes on a CPU: set LASERS_TEST_1024=1 to run it")
def test_ffhq1024_config_trains_end_to_end_at_full_resolution(tmp_path):
    """The shipped configs/dlgan_ffhq1024.yaml (deep, attention, checkpointing, bf16, ZeRO-2), 2 steps at batch 1
    on 1024^2 JPEG shards, one process, through lasers-train."""
    from lasers_dist.cli.bench_data import bench_items
    from lasers_dist.data.shard_writer import ShardOptions, write_split

    shards = tmp_path / "ffhq1024"
    items = bench_items(1024, 8, grain=3.0)
    write_split(items[:6], shards, "train", ShardOptions(None, "jpeg", 95, 3), source_info={"path": "test"})
    write_split(items[6:], shards, "val", ShardOptions(None, "jpeg", 95, 2), source_info={"path": "test"})
    raw = {"data": {"train_shards": str(shards / "train-*.tar"), "val_shards": str(shards / "val-*.tar"),
                    "num_workers": 1, "batches_per_epoch": 10},
           "loss": {"lpips_random_backbone": True, "disc_start": 0},
           "train": {"max_steps": 2, "batch_size": 1, "checkpoint_every": 2, "log_every": 1, "sample_every": 0,
                     "val_every": 0, "val_batches": 1, "out_dir": str(tmp_path / "run")}}
    base = load_config(FFHQ1024)
    overrides = [f"{section}.{key}={json.dumps(value)}" for section, values in raw.items()
                 for key, value in values.items()]
    config = tmp_path / "dlgan_ffhq1024.yaml"
    config.write_text(FFHQ1024.read_text())
    assert base.data.image_size == 1024 and base.train.precision == "bf16" and base.deepspeed.zero_stage == 2
    start = time.perf_counter()
    run(train_cli(1, config, *overrides), timeout=1800)
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in lines)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"1024^2 end-to-end: 2 steps in {seconds:.0f} s, peak resident memory of a child {children:.2f} GB")
