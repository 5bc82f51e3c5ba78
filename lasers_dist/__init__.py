"""lasers_dist: sparse-dictionary bottleneck autoencoders (DL-VAE / DL-GAN) and VQ baselines."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import lasers_dist.config` stays light for the launcher that validates configs.
    if name in ("load_pretrained", "export_pretrained"):
        from lasers_dist import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'lasers_dist' has no attribute {name!r}")
