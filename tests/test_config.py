"""Config loading: typed sections, unknown keys rejected, overrides, and the cross-key checks."""

from pathlib import Path

import pytest
import yaml

from lasers_dist.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    expand_shards,
    load_config,
    save_config,
    validate,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_defaults_match_the_paper() -> None:
    cfg = Config()
    assert (cfg.model.num_atoms, cfg.model.embed_dim, cfg.model.sparsity) == (512, 16, 5)
    assert cfg.model.beta == 0.25 and cfg.optim.lr == 1e-4 and cfg.loss.perceptual_weight == 0.5


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"sparsityy": 3}}, "model.sparsityy"),
        ({"model": {"sparsity": "five"}}, "expected int"),
        ({"model": {"bottleneck": "kmeans"}}, "not one of dictionary, vq"),
        ({"optimizer": {}}, "unknown config section"),
        ({"train": {"max_steps": True}}, "expected int, got bool"),
        ({"model": {"patch_size": 2}}, "expected a list"),
        ({"model": []}, "must be a mapping"),
    ],
)
def test_bad_keys_and_types_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_ints_widen_to_float_and_overrides_parse_yaml() -> None:
    raw = apply_overrides({"optim": {"lr": 1}}, ["train.max_steps=200", "model.patch_size=[2, 2]", "loss.gan_loss=non_saturating"])
    cfg = config_from_dict(raw)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 200 and cfg.model.patch_size == [2, 2]
    assert cfg.loss.gan_loss == "non_saturating"
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["max_steps=3"])


@pytest.mark.parametrize(
    "raw, world, message",
    [
        ({"model": {"sparsity": 600}}, 1, "model.sparsity=600"),
        ({"model": {"patch_size": [3, 3]}, "data": {"image_size": 64}}, 1, "does not divide the 16x16 latent map"),
        ({"data": {"image_size": 30}}, 1, "not divisible by the encoder's downsampling 4"),
        ({"train": {"batch_size": 6}}, 4, "train.batch_size=6"),
        ({"model": {"architecture": "deep", "channel_mult": [1, 2]}}, 1, "model.channel_mult"),
        ({"deepspeed": {"zero_stage": 3}}, 1, "zero_stage"),
        ({"optim": {"grad_accum_steps": 0}}, 1, "optim.grad_accum_steps"),
        ({"model": {"sparsity": 20}}, 1, "exceeds the coded signal's dimension 16"),
        ({"model": {"ema_decay": 1.5}}, 1, "model.ema_decay"),
        ({"data": {"image_size": 0}}, 1, "data.image_size"),
        ({"train": {"collective_timeout_s": 0}}, 1, "train.collective_timeout_s"),
        ({"data": {"degradation": "super_resolution", "sr_factor": 3}}, 1, "data.sr_factor=3"),
    ],
)
def test_impossible_combinations_fail_before_launch(raw: dict, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict(raw), world_size=world, check_files=False)


def test_missing_shards_say_how_to_build_them(tmp_path: Path) -> None:
    cfg = config_from_dict({"data": {"train_shards": str(tmp_path / "train-{000000..000003}.tar")}})
    with pytest.raises(ConfigError, match="lasers-shard"):
        validate(cfg)
    for i in range(4):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    validate(cfg)
    assert expand_shards(str(tmp_path / "train-*.tar")) == [str(tmp_path / f"train-{i:06d}.tar") for i in range(4)]


def test_load_save_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"sparsity": 3}, "train": {"seed": 7}}))
    cfg = load_config(path, ["train.seed=9"])
    assert cfg.model.sparsity == 3 and cfg.train.seed == 9
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_validate(path: Path) -> None:
    cfg = load_config(path)
    validate(cfg, world_size=1 if cfg.train.batch_size % 8 else 8, check_files=False)
