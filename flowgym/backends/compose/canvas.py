"""Seeded synthetic canvases of the compose task: coloured digit glyphs on a 2x2 grid.

Conventions
-----------
* A canvas is an RGB image, float32 in [0, 1], shape ``(3, 32, 32)``, black background.
* The canvas is a 2x2 grid of 16x16 cells, numbered row-major: ``0`` top-left, ``1`` top-right,
  ``2`` bottom-left, ``3`` bottom-right (``cell_row(c) = c // 2``, ``cell_col(c) = c % 2``).
* An object is a scikit-learn ``load_digits`` glyph (8x8, ``value / 16``) of digit 0-4, upscaled
  bilinearly to 12x12, multiplied by a palette colour (``PALETTE``) and pasted into a cell at a
  random offset of 0-4 pixels per axis (so it always lies inside its cell).
* Glyphs come from a fixed, seed-independent split of the 901 sklearn glyphs of digits 0-4
  (``GLYPH_SPLIT_FRACTIONS``): ``flow`` renders the flow model's pretraining canvases, ``scorer``
  the scorer CNN's training crops, ``eval`` the reference canvases of the metrics and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CANVAS_SIZE",
    "CELL_SIZE",
    "COLOURS",
    "DIGITS",
    "GLYPH_SIZE",
    "GLYPH_SPLIT_FRACTIONS",
    "GLYPH_SPLIT_SEED",
    "GRID",
    "NUM_CELLS",
    "PALETTE",
    "SceneObject",
    "cell_col",
    "cell_row",
    "glyph_split",
    "render_canvas",
    "render_canvases",
]

CANVAS_SIZE = 32
GRID = 2
CELL_SIZE = CANVAS_SIZE // GRID  # 16
NUM_CELLS = GRID * GRID
GLYPH_SIZE = 12
MAX_OFFSET = CELL_SIZE - GLYPH_SIZE  # offsets 0..4 inside a cell
DIGITS = (0, 1, 2, 3, 4)
#: colour name -> RGB; nearest-palette reading works on the chromaticity of the lit pixels
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
COLOURS = tuple(PALETTE)
GLYPH_SPLIT_SEED = 20261203
GLYPH_SPLIT_FRACTIONS = {"flow": 0.5, "scorer": 0.3, "eval": 0.2}


def cell_row(cell: int) -> int:
    return int(cell) // GRID


def cell_col(cell: int) -> int:
    return int(cell) % GRID


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: ``digit`` in ``DIGITS``, ``colour`` in ``COLOURS``, ``cell`` in 0..3."""

    digit: int
    colour: str
    cell: int

    def __post_init__(self) -> None:
        if int(self.digit) not in DIGITS:
            raise ValueError(f"digit must be one of {DIGITS}; got {self.digit!r}")
        if self.colour not in PALETTE:
            raise ValueError(f"colour must be one of {COLOURS}; got {self.colour!r}")
        if not 0 <= int(self.cell) < NUM_CELLS:
            raise ValueError(f"cell must be in 0..{NUM_CELLS - 1}; got {self.cell!r}")


@lru_cache(maxsize=1)
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    """Upscaled glyphs ``(N, 12, 12)`` float32 in [0, 1] and labels ``(N,)`` of sklearn digits 0-4."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits()
    keep = np.isin(data.target, DIGITS)
    images = torch.tensor(np.asarray(data.images[keep], np.float32) / 16.0).unsqueeze(1)
    big = F.interpolate(images, size=(GLYPH_SIZE, GLYPH_SIZE), mode="bilinear", align_corners=False)
    return big.squeeze(1).clamp(0.0, 1.0).numpy(), np.asarray(data.target[keep], np.int64)


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, dict[int, np.ndarray]]:
    """Per split, per digit: indices into ``_glyphs()`` (fixed stratified permutation, 50/30/20 %)."""
    _, labels = _glyphs()
    rng = np.random.default_rng(GLYPH_SPLIT_SEED)
    out: dict[str, dict[int, np.ndarray]] = {name: {} for name in GLYPH_SPLIT_FRACTIONS}
    for digit in DIGITS:
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_flow = int(round(GLYPH_SPLIT_FRACTIONS["flow"] * len(idx)))
        n_scorer = int(round(GLYPH_SPLIT_FRACTIONS["scorer"] * len(idx)))
        out["flow"][digit] = np.sort(idx[:n_flow])
        out["scorer"][digit] = np.sort(idx[n_flow : n_flow + n_scorer])
        out["eval"][digit] = np.sort(idx[n_flow + n_scorer :])
    return out


def glyph_split(name: str) -> tuple[Tensor, Tensor]:
    """Upscaled glyphs ``(n, 12, 12)`` in [0, 1] and labels ``(n,)`` of split ``flow``/``scorer``/``eval``."""
    splits = _split_indices()
    if name not in splits:
        raise ValueError(f"unknown glyph split {name!r}; accepted: {sorted(splits)}")
    glyphs, labels = _glyphs()
    idx = np.concatenate([splits[name][d] for d in DIGITS])
    return torch.from_numpy(glyphs[idx]), torch.from_numpy(labels[idx])


def render_canvas(objects: Sequence[SceneObject], rng: np.random.Generator, split: str = "eval") -> Tensor:
    """Render one canvas ``(3, 32, 32)`` float32 in [0, 1] holding ``objects`` (one per cell at most).

    Each object draws a random glyph of its digit from ``split`` and a random offset in its cell.
    """
    splits = _split_indices()
    if split not in splits:
        raise ValueError(f"unknown glyph split {split!r}; accepted: {sorted(splits)}")
    glyphs, _ = _glyphs()
    canvas = np.zeros((3, CANVAS_SIZE, CANVAS_SIZE), np.float32)
    cells = [int(o.cell) for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {list(objects)}")
    for obj in objects:
        pool = splits[split][int(obj.digit)]
        glyph = glyphs[pool[rng.integers(len(pool))]]
        dy, dx = rng.integers(0, MAX_OFFSET + 1, size=2)
        y = cell_row(obj.cell) * CELL_SIZE + int(dy)
        x = cell_col(obj.cell) * CELL_SIZE + int(dx)
        colour = np.asarray(PALETTE[obj.colour], np.float32)[:, None, None]
        canvas[:, y : y + GLYPH_SIZE, x : x + GLYPH_SIZE] = glyph[None] * colour
    return torch.from_numpy(canvas)


def render_canvases(
    scenes: Sequence[Sequence[SceneObject]], rng: np.random.Generator, split: str = "eval"
) -> Tensor:
    """Render a batch of scenes: ``(B, 3, 32, 32)`` float32 in [0, 1]."""
    if len(scenes) == 0:
        return torch.zeros((0, 3, CANVAS_SIZE, CANVAS_SIZE))
    return torch.stack([render_canvas(s, rng, split) for s in scenes])
