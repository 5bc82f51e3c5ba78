"""The paper's figures from any evaluation: reconstructions with FLIP heatmaps (Figs. 9-12), atoms as tiles
(Figs. 7-8a), a 2-D embedding of the atoms (Figs. 7-8b), the top singular component of the latent map before
and after the bottleneck (Figs. 5-6), and training curves with Savitzky-Golay smoothing (Fig. 4).

matplotlib's object API only (no pyplot state), so figures can be drawn in any process, headless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lasers_dist.eval.evaluate import PictureItem

MAX_TILES = 256  # atoms drawn as tiles (the most used ones) before the grid gets unreadable


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _image(ax, pixels: np.ndarray, **kwargs) -> None:
    ax.imshow(pixels, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def reconstructions_figure(items: Sequence[PictureItem], path: Path, title: str) -> Path:
    """Columns = images; rows = original, degraded input (restoration tasks), reconstruction, FLIP map."""
    rows: list[tuple[str, list]] = [("original", [p.target for p in items])]
    if any(p.input is not None for p in items):
        rows.append(("model input", [p.input for p in items]))
    rows.append(("reconstruction", [p.reconstruction for p in items]))
    if all(p.flip_map is not None for p in items):
        rows.append(("FLIP error", [p.flip_map for p in items]))
    fig = _figure(1.6 * len(items) + 0.8, 1.7 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), len(items), squeeze=False)
    for r, (label, pictures) in enumerate(rows):
        for c, picture in enumerate(pictures):
            ax = axes[r][c]
            if label == "FLIP error":
                shown = ax.imshow(picture, cmap="magma", vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                _image(ax, picture.permute(1, 2, 0).numpy())
            if c == 0:
                ax.set_ylabel(label)
            if r == 0:
                ax.set_title(items[c].key, fontsize=7)
    if rows[-1][0] == "FLIP error":
        fig.colorbar(shown, ax=axes[-1].tolist(), shrink=0.8, label="FLIP (0 = identical)")
    fig.suptitle(title)
    return _save(fig, path)


def _tile_side(dim: int) -> int:
    return math.ceil(math.sqrt(dim))


def atoms_figure(atoms: Tensor, usage: Tensor, path: Path, title: str) -> Path:
    """Atoms (K, dim) as grayscale side x side tiles (dim 16 -> 4 x 4), most used first, and the sorted usage."""
    order = torch.argsort(usage, descending=True, stable=True)
    shown = order[:MAX_TILES]
    side = _tile_side(atoms.shape[1])
    tiles = torch.zeros(len(shown), side * side)
    tiles[:, : atoms.shape[1]] = atoms[shown]
    columns = math.ceil(math.sqrt(len(shown)))
    grid_rows = math.ceil(len(shown) / columns)
    canvas = np.full((grid_rows * (side + 1), columns * (side + 1)), np.nan)
    for n, tile in enumerate(tiles.view(-1, side, side).numpy()):
        r, c = divmod(n, columns)
        canvas[r * (side + 1): r * (side + 1) + side, c * (side + 1): c * (side + 1) + side] = tile
    limit = float(atoms.abs().max()) or 1.0
    fig = _figure(11, 5.2)
    left, right = fig.subplots(1, 2, width_ratios=[1.1, 1])
    shown_img = left.imshow(canvas, cmap="gray", vmin=-limit, vmax=limit, interpolation="nearest")
    left.set_xticks([])
    left.set_yticks([])
    more = f" (top {len(shown)} of {len(order)})" if len(shown) < len(order) else ""
    left.set_title(f"{side}x{side} tiles, most used first{more}")
    fig.colorbar(shown_img, ax=left, shrink=0.7, label="atom value")
    counts = usage[order].numpy()
    used = counts > 0
    right.bar(np.flatnonzero(used), counts[used], width=1.0, color="tab:blue", label="used")
    if not used.all():  # a log axis cannot show 0: dead atoms get a red stub at the bottom
        right.bar(np.flatnonzero(~used), np.full((~used).sum(), 0.5), width=1.0, color="tab:red", label="dead (0)")
    right.set_yscale("log")
    right.legend(fontsize=8)
    right.set_xlabel("atom rank (by usage)")
    right.set_ylabel("selections over the evaluation set")
    dead = int((usage == 0).sum())
    right.set_title(f"usage: {len(order) - dead} of {len(order)} used, {dead} dead")
    fig.suptitle(title)
    return _save(fig, path)


def embed_2d(atoms: Tensor) -> tuple[np.ndarray, str]:
    """(K, dim) -> (K, 2) coordinates and the method: UMAP when umap-learn is installed, else PCA."""
    data = atoms.double().numpy()
    try:
        import umap  # optional dependency

        neighbours = max(2, min(15, len(data) - 1))
        return umap.UMAP(n_neighbors=neighbours, random_state=0).fit_transform(data), "UMAP"
    except ImportError:
        centred = data - data.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA (umap-learn not installed)"


def embedding_figure(atoms: Tensor, usage: Tensor, path: Path, title: str) -> Path:
    coords, method = embed_2d(atoms)
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    points = ax.scatter(coords[:, 0], coords[:, 1], c=np.log10(usage.numpy() + 1.0), cmap="viridis", s=14)
    fig.colorbar(points, ax=ax, label="log10(usage + 1)")
    ax.set_xlabel(f"{method.split()[0]} 1")
    ax.set_ylabel(f"{method.split()[0]} 2")
    ax.set_title(f"{title}: atoms in 2-D by {method}")
    return _save(fig, path)


def top_singular_component(latent: Tensor, direction: Tensor | None = None) -> tuple[np.ndarray, Tensor]:
    """latent (L, h, w) -> its projection (h, w) on the top right-singular vector of the (h w, L) matrix, and
    that vector (pass it back to project another latent map on the same direction)."""
    channels, h, w = latent.shape
    matrix = latent.double().reshape(channels, h * w).T
    if direction is None:
        _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        direction = vh[0] * torch.sign(vh[0].sum() or 1.0)
    return (matrix @ direction).reshape(h, w).numpy(), direction


def latent_figure(items: Sequence[PictureItem], path: Path, title: str) -> Path:
    """Per image: the original, the top singular component of z_e, and of the coded latent (same direction)."""
    items = list(items)[:4]
    fig = _figure(2.0 * len(items) + 0.6, 6.4)
    axes = fig.subplots(3, len(items), squeeze=False)
    for c, item in enumerate(items):
        before, direction = top_singular_component(item.latent)
        after, _ = top_singular_component(item.coded_latent, direction)
        low, high = float(min(before.min(), after.min())), float(max(before.max(), after.max()))
        _image(axes[0][c], item.target.permute(1, 2, 0).numpy())
        _image(axes[1][c], before, cmap="gray", vmin=low, vmax=high)
        _image(axes[2][c], after, cmap="gray", vmin=low, vmax=high)
        axes[0][c].set_title(item.key, fontsize=7)
    for r, label in enumerate(("original", "encoder output z_e", "after the bottleneck")):
        axes[r][0].set_ylabel(label)
    fig.suptitle(f"{title}: top singular component of the latent map")
    return _save(fig, path)


def read_curves(metrics_log: Path, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.jsonl -> {key: (steps, values)} for the keys that appear with finite values."""
    series: dict[str, tuple[list, list]] = {k: ([], []) for k in keys}
    for line in metrics_log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and "step" in record:
                series[key][0].append(record["step"])
                series[key][1].append(value)
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in series.items() if len(v)}


def savgol(values: np.ndarray) -> np.ndarray | None:
    """Savitzky-Golay smoothing (order 2, a window of about a tenth of the curve); None for short curves."""
    from scipy.signal import savgol_filter

    window = max(5, (len(values) // 10) | 1)
    if len(values) < window:
        return None
    return savgol_filter(values, window, 2)


def training_curves_figure(metrics_log: Path, path: Path, title: str) -> Path | None:
    """PSNR and perplexity against step, raw and smoothed (train/ and val/ values); None if the log has neither."""
    panels = (("PSNR (dB)", ("train/psnr", "val/psnr")), ("perplexity", ("train/perplexity", "val/perplexity")))
    curves = read_curves(metrics_log, [k for _, keys in panels for k in keys])
    if not curves:
        return None
    fig = _figure(11, 4.2)
    for ax, (label, keys) in zip(fig.subplots(1, 2), panels):
        for key, colour in zip(keys, ("tab:blue", "tab:orange")):
            if key not in curves:
                continue
            steps, values = curves[key]
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, label=f"{key} (raw)")
            smooth = savgol(values)
            if smooth is not None:
                ax.plot(steps, smooth, color=colour, linewidth=1.8, label=f"{key} (Savitzky-Golay)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: training curves")
    return _save(fig, path)
