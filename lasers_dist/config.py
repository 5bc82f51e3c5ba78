"""Experiment configuration: YAML files -> typed dataclasses.

Every section is a dataclass; unknown keys, wrong types and values outside a field's choices are errors that
name the dotted key, the value given and what is allowed. Numbers are read as people write them: `3e-4` and `1E4`
(strings to YAML 1.1) wherever a number is expected, ints where a float is expected, whole floats (`2.0`) where an
int is expected; bools, non-finite values and fractions for ints are refused. `validate` checks the combinations
that only make sense together (sparsity vs atoms, patch vs latent map, batch vs world size, shards on disk) so a
bad run fails before any process group starts.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config key is unknown, mistyped or inconsistent with another key."""


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class DataConfig:
    train_shards: str = ""  # brace pattern or glob, e.g. data/photos/train-{000000..000007}.tar, or URLs
    val_shards: str = ""
    # Sample counts per shard: "" looks for {split}.json beside the shards (through the same opener for URLs);
    # without one, rank 0 reads the shards once per job to count them. `lasers-shard index PATTERN` writes one.
    train_manifest: str = ""
    val_manifest: str = ""
    io_timeout_s: float = 60.0  # a remote shard open or read waiting longer counts as failed
    image_size: int = 256
    mode: str = _choice("resampled", "resampled", "split")
    batches_per_epoch: int = 1000  # per rank; the epoch length in resampled mode
    num_workers: int = 2
    degradation: str = _choice("none", "none", "super_resolution", "inpainting")
    inpaint_fraction: float = 0.25
    sr_factor: int = 4


@dataclass
class ModelConfig:
    bottleneck: str = _choice("dictionary", "dictionary", "vq")
    num_atoms: int = 512  # dictionary atoms, or codebook size for vq
    embed_dim: int = 16
    sparsity: int = 5  # atoms per coded signal (ignored by vq)
    patch_size: list[int] = field(default_factory=lambda: [1, 1])
    beta: float = 0.25  # commitment weight
    dictionary_update: str = _choice("gradient", "gradient", "online")
    ema_decay: float = 0.99  # vq codebook EMA
    revive_dead_every: int = 0  # 0 = off
    omp_backend: str = _choice("auto", "auto", "torch", "triton")
    architecture: str = _choice("light", "light", "deep")
    in_channels: int = 3
    hidden_channels: int = 128  # light: hidden units; deep: base channel count
    num_res_blocks: int = 2
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # deep: len - 1 downsamplings
    attention: bool = False  # deep: self-attention at the lowest resolution
    norm_groups: int = 32
    checkpoint_activations: bool = False
    discriminator: bool = False  # True makes DL-GAN / VQ-GAN
    disc_layers: int = 3  # 3 layers = 70x70 receptive field
    disc_channels: int = 64


@dataclass
class LossConfig:
    perceptual_weight: float = 0.5  # recon = (1 - w) * MSE + w * LPIPS; the paper's eta = 1 - w = 0.5
    lpips_net: str = _choice("alex", "alex", "vgg", "squeeze")
    lpips_random_backbone: bool = False  # tests only: not real LPIPS
    codebook_weight: float = 1.0
    gan_loss: str = _choice("hinge", "hinge", "non_saturating")
    disc_weight: float = 1.0  # multiplies the adaptive weight
    adaptive_weight: bool = True
    disc_start: int = 0  # optimizer step from which the GAN terms are on


@dataclass
class OptimConfig:
    lr: float = 1e-4
    disc_lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    schedule: str = _choice("cosine", "cosine", "constant")
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # 0 = no clipping (DeepSpeed's own default would be 1.0)
    grad_accum_steps: int = 1


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # global images per optimizer step, over all ranks and accumulation steps
    checkpoint_every: int = 1000
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    val_every: int = 0  # 0 = validate only at the end
    val_batches: int = 4
    keep_checkpoints: int = 3
    precision: str = _choice("fp32", "fp32", "bf16")
    collective_timeout_s: float = 600.0  # every collective gives up after this long (a rank stopped answering)
    max_bad_steps: int = 3  # non-finite steps in a row (each skipped) before the run stops as diverged
    stop_at_step: int = 0  # (trainer) stop early after this step as if signalled: save, exit resumable; 0 = off
    stop_file: str = ""  # a file whose appearance stops the run gracefully at the next step; "" = out_dir/STOP


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    config_file: str = ""  # optional DeepSpeed JSON merged under ours


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


# A decimal number as people write it, exponent included: 3e-4, 1E4, -2.5, .5, 1.0e+3. PyYAML (YAML 1.1) reads
# exponent notation without a dot ("3e-4") as a string, which is how most learning rates are written.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _given(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _as_number(key: str, value: Any, tp: type) -> Any:
    """A float or int field's value: numbers, and strings that spell a decimal number (exponent notation
    included); whole floats such as 2.0 or 1e4 for ints. Bools and non-finite values are refused."""
    number = value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {_given(value)}")
    if not math.isfinite(number):
        raise ConfigError(f"config key '{key}': expected a finite {tp.__name__}, got {_given(value)}")
    if tp is float:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise ConfigError(f"config key '{key}': expected int, got {_given(value)} (not a whole number)")
    return int(number)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`. Numbers are read as described in `_as_number`; nothing
    else is converted."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp in (int, float):
        return _as_number(key, value, tp)
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_given(value)}")
    return value


def _section_from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
            f"allowed in '{prefix}': {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        value = _coerce(key, value, hints[name])
        choices = known[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(choices)}")
        values[name] = value
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a `Config` from nested dicts (missing keys take their defaults)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)}; allowed: {', '.join(sections)}")
    return Config(**{name: _section_from_dict(hints[name], {} if raw[name] is None else raw[name], name) for name in raw})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML scalars or lists) to nested dicts in place."""
    for item in overrides:
        dotted, sep, text = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=200")
        section, key = parts
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: config section '{section}' is not a mapping")
        raw[section][key] = yaml.safe_load(text) if text.strip() else ""
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file, apply dotted overrides, and type-check every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    try:
        return config_from_dict(apply_overrides(raw, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def downsample_factor(model: ModelConfig) -> int:
    """How many pixels one latent position spans per side."""
    return 4 if model.architecture == "light" else 2 ** (len(model.channel_mult) - 1)


def expand_shards(pattern: str) -> list[str]:
    """Expand a brace pattern (`train-{000000..000127}.tar`) and shell globs into a sorted list of shard paths.

    Remote URLs (anything with `://` or a `pipe:` prefix) are kept as written: only WebDataset can open them.
    """
    import braceexpand  # shipped with webdataset

    urls: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        if "://" in part or part.startswith("pipe:") or not glob.has_magic(part):
            urls.append(part)
        else:
            urls.extend(sorted(glob.glob(part)))
    return urls


def _check_shards(key: str, pattern: str) -> None:
    if not pattern:
        raise ConfigError(f"config key '{key}' is empty: give the shard pattern, e.g. data/photos/train-*.tar")
    urls = expand_shards(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or missing:
        shown = ", ".join(missing[:3]) or pattern
        raise ConfigError(
            f"config key '{key}': no shard file at {shown}; build shards with `lasers-shard SOURCE OUT_DIR` "
            f"(or `lasers-shard --builtin photos OUT_DIR`) and point {key} at OUT_DIR/train-*.tar"
        )


def _check_ranges(cfg: Config) -> None:
    """Single keys whose value is out of range, whatever the other keys say."""
    positive = {
        "model.num_atoms": cfg.model.num_atoms, "model.embed_dim": cfg.model.embed_dim,
        "model.hidden_channels": cfg.model.hidden_channels, "model.norm_groups": cfg.model.norm_groups,
        "data.image_size": cfg.data.image_size, "data.sr_factor": cfg.data.sr_factor,
        "optim.grad_accum_steps": cfg.optim.grad_accum_steps, "train.batch_size": cfg.train.batch_size,
        "train.collective_timeout_s": cfg.train.collective_timeout_s,
        "data.io_timeout_s": cfg.data.io_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    non_negative = {
        "data.num_workers": cfg.data.num_workers, "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip, "optim.weight_decay": cfg.optim.weight_decay,
        "loss.disc_start": cfg.loss.disc_start, "model.revive_dead_every": cfg.model.revive_dead_every,
        "model.beta": cfg.model.beta, "train.stop_at_step": cfg.train.stop_at_step,
        "optim.lr": cfg.optim.lr, "optim.disc_lr": cfg.optim.disc_lr,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if not 0.0 <= cfg.model.ema_decay < 1.0:
        raise ConfigError(f"config key 'model.ema_decay' must be in [0, 1), got {cfg.model.ema_decay}")
    if not 0.0 < cfg.data.inpaint_fraction < 1.0:
        raise ConfigError(f"config key 'data.inpaint_fraction' must be in (0, 1), got {cfg.data.inpaint_fraction}")


def validate(cfg: Config, world_size: int = 1, check_files: bool = True) -> None:
    """Reject impossible combinations before any process group starts."""
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    _check_ranges(cfg)
    if m.bottleneck == "dictionary" and not 1 <= m.sparsity <= m.num_atoms:
        raise ConfigError(f"model.sparsity={m.sparsity} must be in [1, model.num_atoms={m.num_atoms}]")
    if len(m.patch_size) != 2 or min(m.patch_size) < 1:
        raise ConfigError(f"model.patch_size must be two positive ints [P_H, P_W], got {m.patch_size}")
    code_dim = m.embed_dim * m.patch_size[0] * m.patch_size[1]
    if m.bottleneck == "dictionary" and m.sparsity > code_dim:
        raise ConfigError(
            f"model.sparsity={m.sparsity} exceeds the coded signal's dimension {code_dim} (model.embed_dim x "
            "model.patch_size): more atoms than dimensions are linearly dependent"
        )
    if m.bottleneck == "vq" and m.patch_size != [1, 1]:
        raise ConfigError("model.patch_size must be [1, 1] for model.bottleneck=vq")
    if m.architecture == "deep" and not 3 <= len(m.channel_mult) <= 6:
        raise ConfigError(f"model.channel_mult needs 3 to 6 entries (2 to 5 downsamplings), got {m.channel_mult}")
    factor = downsample_factor(m)
    if d.image_size % factor:
        raise ConfigError(f"data.image_size={d.image_size} is not divisible by the encoder's downsampling {factor}")
    latent = d.image_size // factor
    if latent % m.patch_size[0] or latent % m.patch_size[1]:
        raise ConfigError(
            f"model.patch_size={m.patch_size} does not divide the {latent}x{latent} latent map "
            f"(data.image_size={d.image_size} / {factor})"
        )
    if not 0.0 <= cfg.loss.perceptual_weight <= 1.0:
        raise ConfigError(f"loss.perceptual_weight={cfg.loss.perceptual_weight} must be in [0, 1]")
    if cfg.deepspeed.zero_stage not in (0, 1, 2):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} is not one of 0, 1, 2")
    if d.degradation == "super_resolution" and d.image_size % d.sr_factor:
        raise ConfigError(f"data.sr_factor={d.sr_factor} does not divide data.image_size={d.image_size}")
    per_step = world_size * o.grad_accum_steps
    if t.batch_size < per_step or t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a positive multiple of world size ({world_size}) x "
            f"optim.grad_accum_steps ({cfg.optim.grad_accum_steps})"
        )
    for name in ("max_steps", "checkpoint_every", "log_every", "keep_checkpoints", "max_bad_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if check_files:
        _check_shards("data.train_shards", d.train_shards)
        readers = world_size * max(d.num_workers, 1)
        if d.mode == "split" and len(expand_shards(d.train_shards)) < readers:
            raise ConfigError(
                f"data.mode=split needs at least world size x data.num_workers = {readers} shards, "
                f"{d.train_shards} has {len(expand_shards(d.train_shards))}: write more, smaller shards "
                "(lasers-shard --max-count), lower data.num_workers, or use data.mode=resampled"
            )
        if d.val_shards:
            _check_shards("data.val_shards", d.val_shards)
        for key, manifest in (("data.train_manifest", d.train_manifest), ("data.val_manifest", d.val_manifest)):
            if manifest and "://" not in manifest and not manifest.startswith("pipe:") and not Path(manifest).is_file():
                raise ConfigError(f"config key '{key}': manifest {manifest} does not exist; write one with "
                                  f"`lasers-shard index PATTERN --out {manifest}` or leave the key empty")
        if cfg.deepspeed.config_file and not Path(cfg.deepspeed.config_file).is_file():
            raise ConfigError(f"config key 'deepspeed.config_file': {cfg.deepspeed.config_file} does not exist")
