"""configs/paper: every config loads and validates (without shards), builds, and is listed in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lasers_dist.config import load_config, validate
from lasers_dist.models import build_autoencoder, build_discriminator

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
CONFIGS = sorted(PAPER.glob("*.yaml"))


def test_there_is_a_config_for_every_table() -> None:
    tables = {name.split("_")[0] for name in (p.stem for p in CONFIGS)}
    assert tables == {"table1", "table1-2", "table1-3", "table4", "table5", "table6", "table7"}
    assert len(CONFIGS) == 37
    readme = (PAPER / "README.md").read_text()
    for path in CONFIGS:
        assert path.name in readme, f"{path.name} is not described in configs/paper/README.md"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_validates_and_builds(path: Path) -> None:
    cfg = load_config(path)
    for world_size in (1, 8):
        validate(cfg, world_size=world_size, check_files=False)
    size = cfg.data.image_size
    if size > 64:  # large models: build on the meta device only (shapes, no memory)
        with torch.device("meta"):
            build_autoencoder(cfg.model)
        return
    model, disc = build_autoencoder(cfg.model).eval(), build_discriminator(cfg.model)
    with torch.no_grad():
        images = torch.zeros(1, 3, size, size)
        assert model(images).reconstructions.shape == images.shape
        if disc is not None:
            assert disc(images).numel() >= 1
