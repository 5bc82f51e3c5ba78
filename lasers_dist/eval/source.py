"""What `lasers-eval SOURCE` evaluates: the model (through load_pretrained) and where it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lasers_dist.models import Autoencoder
from lasers_dist.train.checkpoint import read_meta, resolve_resume

PROVENANCE_FILE = "provenance.json"


@dataclass
class ModelSource:
    """source: what the user named; checkpoint: the checkpoint folder (or export file) read; step: its optimizer
    step (None if unknown); run_dir: the training run's folder when known (metrics.jsonl, provenance.json);
    meta: the checkpoint's meta.json (or the export's metadata)."""

    source: str
    checkpoint: str
    step: int | None
    run_dir: Path | None
    meta: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any] | None:
        """The run's provenance.json (versions, world size, device, OMP backend), when there is one."""
        if self.run_dir is None or not (self.run_dir / PROVENANCE_FILE).is_file():
            return None
        try:
            return json.loads((self.run_dir / PROVENANCE_FILE).read_text())
        except json.JSONDecodeError:
            return {"error": f"{self.run_dir / PROVENANCE_FILE} is not valid JSON"}

    def metrics_log(self) -> Path | None:
        """The run's metrics.jsonl (training curves), when there is one."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        return path if path is not None and path.is_file() else None


def describe_source(source: str | Path) -> ModelSource:
    """Where SOURCE's weights come from, without loading them (load_pretrained does that)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run directory, a checkpoints/step-NNNNNNNN folder "
                                "or an exported .safetensors file")
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        meta.pop("config", None)
        step = int(meta["step"]) if meta.get("step", "").isdigit() else None
        origin = Path(meta["checkpoint"]).parent.parent if "checkpoint" in meta else None
        run_dir = origin if origin is not None and origin.is_dir() else None
        return ModelSource(str(source), str(path.resolve()), step, run_dir, meta)
    folder = resolve_resume(str(path), path / "checkpoints")
    meta = read_meta(folder)
    meta.pop("config", None)
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else None
    return ModelSource(str(source), str(folder.resolve()), int(meta["step"]), run_dir, meta)


def load_model(source: str | Path, device: torch.device) -> tuple[Autoencoder, ModelSource]:
    """(model in eval mode with .config, its ModelSource) from a run directory, checkpoint folder or export."""
    from lasers_dist.pretrained import load_pretrained

    info = describe_source(source)
    return load_pretrained(source, device=device), info
