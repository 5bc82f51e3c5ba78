"""Export and load_pretrained: a checkpoint folder's rank-0 weights + config -> one file -> the same model."""

import json
from pathlib import Path

import pytest
import torch

import lasers_dist
from lasers_dist.cli.export import main as export_main
from lasers_dist.config import config_from_dict, config_to_dict
from lasers_dist.models import build_autoencoder, build_discriminator
from lasers_dist.pretrained import export_pretrained
from lasers_dist.train.checkpoint import META_FILE, WEIGHTS_FILE, step_name, write_weights


def _fake_run(tmp_path: Path, bottleneck: str, step: int = 3) -> tuple[Path, torch.nn.Module]:
    """A run directory whose newest checkpoint holds what the trainer's rank 0 writes for tools."""
    cfg = config_from_dict({"model": {"bottleneck": bottleneck, "num_atoms": 32, "embed_dim": 8, "sparsity": 3,
                                      "hidden_channels": 16, "discriminator": True, "disc_channels": 8,
                                      "norm_groups": 4}})
    torch.manual_seed(0)
    model, disc = build_autoencoder(cfg.model), build_discriminator(cfg.model)
    model.train()(torch.rand(2, 3, 16, 16) * 2 - 1)  # moves EMA / usage buffers away from their init
    for old_step in (1, step):
        folder = tmp_path / "run" / "checkpoints" / step_name(old_step)
        folder.mkdir(parents=True)
        write_weights(folder / WEIGHTS_FILE, model, disc)
        (folder / META_FILE).write_text(json.dumps({"step": old_step, "world_size": 1, "config": config_to_dict(cfg)}))
    return tmp_path / "run", model.eval()


@pytest.mark.parametrize("bottleneck", ["dictionary", "vq"])
def test_export_then_load_gives_the_same_codes_and_images(tmp_path: Path, bottleneck: str) -> None:
    run, model = _fake_run(tmp_path, bottleneck)
    out = export_pretrained(run, tmp_path / "model.safetensors")
    loaded = lasers_dist.load_pretrained(out)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes, expected = loaded.encode(images), model.encode(images)
    assert codes.indices.shape == (2, 1 if bottleneck == "vq" else 3, 4, 4)
    torch.testing.assert_close(codes.indices, expected.indices)
    torch.testing.assert_close(loaded.decode(codes), model.decode(expected))
    assert not any(k.startswith("discriminator.") for k in loaded.state_dict())


def test_load_from_run_directory_uses_newest_checkpoint(tmp_path: Path) -> None:
    run, model = _fake_run(tmp_path, "dictionary", step=7)
    loaded = lasers_dist.load_pretrained(run)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.float() if value.is_floating_point() else value)


def test_export_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = _fake_run(tmp_path, "vq")
    assert export_main([str(run), str(tmp_path / "out.safetensors"), "--with-discriminator"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as handle:
        assert any(k.startswith("discriminator.") for k in handle.keys())
        assert json.loads(handle.metadata()["config"])["model"]["bottleneck"] == "vq"
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        export_pretrained(tmp_path / "empty_run", tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()
