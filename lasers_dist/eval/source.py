"""What `lasers-eval SOURCE` evaluates: the model (through load_pretrained) and where it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lasers_dist.models import Autoencoder

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


def describe_source(source: str | Path, provenance: dict[str, str]) -> ModelSource:
    """Where SOURCE's weights came from, given the `provenance` load_pretrained attached to the model (so the
    checkpoint named is the one actually read, also when a damaged newer one was skipped)."""
    path = Path(source)
    origin = provenance.get("checkpoint")
    step = int(provenance["step"]) if str(provenance.get("step", "")).isdigit() else None
    run_dir = Path(origin).parent.parent if origin and Path(origin).parent.name == "checkpoints" else None
    run_dir = run_dir if run_dir is not None and run_dir.is_dir() else None
    checkpoint = str(path.resolve()) if path.is_file() else str(origin)
    return ModelSource(str(source), checkpoint, step, run_dir, dict(provenance))


def load_model(source: str | Path, device: torch.device) -> tuple[Autoencoder, ModelSource]:
    """(model in eval mode with .config, its ModelSource) from a run directory, checkpoint folder or export."""
    from lasers_dist.pretrained import load_pretrained

    model = load_pretrained(source, device=device)
    return model, describe_source(source, model.provenance)
