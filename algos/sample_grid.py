"""Sample grids: what the model draws for fixed prompts and fixed noise, at every evaluation.

The evaluator samples each evaluation prompt ``eval_samples_per_prompt`` times with the ODE from
initial noise seeded by its position in the prompt list (``Evaluator``: ``seed + 1000 + chunk``),
so the same cell of every grid shows the same prompt and the same initial noise: a reader compares
like with like across iterations (reward hacking shows in the pictures before the mean reward).

* ``grid_cells(images, prompts, max_prompts, max_samples)``: the first ``max_prompts`` distinct
  prompts (in order) and up to ``max_samples`` samples of each, as ``(rows, prompts)``;
* ``tile(rows)``: one ``(H', W', 3)`` float array in [0, 1] (1-pixel white gutters), for a logger;
* ``save_grid(path, rows, prompts, title)``: a PNG with the prompt beside each row (matplotlib,
  headless); ``save_side_by_side(path, first_png, last_png, ...)``: two saved grids in one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from algos.atomic_io import savefig_atomic

__all__ = ["grid_cells", "save_grid", "save_side_by_side", "tile"]


def _as_rgb(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` images in [0, 1] (C = 1 or 3) as a float ``(B, H, W, 3)`` array, NaN as 0."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W); got shape {tuple(images.shape)}")
    array = torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp(0, 1).numpy()
    if array.shape[1] == 1:
        array = np.repeat(array, 3, axis=1)
    return array.transpose(0, 2, 3, 1)


def grid_cells(
    images: torch.Tensor, prompts: Sequence[str], max_prompts: int = 8, max_samples: int = 4
) -> tuple[list[list[np.ndarray]], list[str]]:
    """Rows of a grid: for each of the first ``max_prompts`` distinct prompts, its first
    ``max_samples`` images (in the order sampled). ``images[i]`` is the sample of ``prompts[i]``."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
    if max_prompts < 1 or max_samples < 1:
        raise ValueError(f"a grid needs max_prompts >= 1 and max_samples >= 1; got {max_prompts}, {max_samples}")
    rgb = _as_rgb(images)
    rows: dict[str, list[np.ndarray]] = {}
    for prompt, image in zip(prompts, rgb):
        if prompt not in rows and len(rows) == max_prompts:
            continue
        cells = rows.setdefault(prompt, [])
        if len(cells) < max_samples:
            cells.append(image)
    return list(rows.values()), list(rows)


def tile(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """The cells as one ``(H', W', 3)`` array with 1-pixel white gutters (short rows padded white)."""
    if not rows or not rows[0]:
        raise ValueError("an empty grid")
    h, w, _ = rows[0][0].shape
    columns = max(len(r) for r in rows)
    out = np.ones((len(rows) * (h + 1) - 1, columns * (w + 1) - 1, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            out[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = cell
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(axes_row_major, rows: Sequence[Sequence[np.ndarray]], prompts: Sequence[str]) -> None:
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ax = axes_row_major[i]
        ax.imshow(tile([row]), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(prompt if len(prompt) <= 28 else prompt[:27] + "…", rotation=0, ha="right", va="center", fontsize=7)


def save_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], prompts: Sequence[str], title: str) -> Path:
    """A PNG of the grid, one prompt per row (its text on the left), written atomically."""
    plt = _pyplot()
    path = Path(path)
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.0 + 0.8 * max(len(r) for r in rows) + 1.8, 0.8 * len(rows) + 0.5), squeeze=False)
    _draw(axes[:, 0], rows, prompts)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=100)
    plt.close(fig)
    return path


def save_side_by_side(path: str | Path, first: str | Path, last: str | Path, first_title: str, last_title: str) -> Path:
    """Two saved grids (PNG files, e.g. the first and the last evaluation) side by side in one PNG.

    Reading the files back (not arrays kept in memory) makes this work after a resume too."""
    plt = _pyplot()
    images = [plt.imread(str(first)), plt.imread(str(last))]
    height = max(i.shape[0] for i in images) / 100
    fig, axes = plt.subplots(1, 2, figsize=(sum(i.shape[1] for i in images) / 100 + 0.2, height + 0.4))
    for ax, image, title in zip(axes, images, (first_title, last_title)):
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=100)
    plt.close(fig)
    return Path(path)
