"""The compose task's object reader and GenEval-style evaluator.

Reading a canvas ``(3, 32, 32)`` in [0, 1], per 16x16 cell of the 2x2 grid:

* ink = the per-pixel maximum over RGB (a glyph of any palette colour has the glyph's intensity);
* *occupied* when at least ``MIN_LIT_PIXELS`` pixels have ink above ``LIT_THRESHOLD``;
* colour = the palette colour nearest (Euclidean) to the ink-weighted mean RGB of the lit pixels,
  normalised by its largest channel (chromaticity; the palette's brightest channel is 1);
* digit = argmax of ``DigitCellCNN`` on the cell's ink crop ``(1, 16, 16)``, a small CNN trained by
  ``flowgym.backends.compose.pretrain`` on crops of the ``scorer`` glyph split (shipped as
  ``flowgym/assets/compose_scorer.safetensors``).

``ComposeScorer.score(images, prompts)`` gives per image the strict 0/1 score (every condition of
``flowgym.backends.compose.grammar`` met) and the partial score (fraction met);
``ComposeScorer.metrics`` aggregates them per category and adds the collapse diagnostics:

* ``compose/colour_entropy``: normalised entropy (``H / log 4``) of the colours of the objects read
  on prompts that leave colour free (single_object, two_object, counting, position); real data: ~1;
* ``compose/cell_entropy``: normalised entropy of the cells of objects on prompts that leave the
  position free; ``compose/digit_entropy``: of all objects' digits (the grammar names every digit,
  so this follows the prompt mix: compare with the real canvases' value, ``reference_metrics``);
* ``compose/clean``: background cleanliness in [0, 1], ``1 - min(1, stray / 0.1)`` with ``stray`` the
  mean ink outside the objects' (dilated) masks; ``compose/stray_marks``: fraction of canvases
  with a visible mark (ink > ``LIT_THRESHOLD``) in a cell read as empty;
* ``compose/digit_confidence``: mean CNN probability of the read digit over occupied cells;
  ``compose/digit_precision``: fraction of objects read whose digit the prompt names;
* ``compose_fd``: Frechet distance of canvas features (per cell: CNN penultimate features and
  mean RGB, concatenated over the 4 cells) to real canvases rendered from the ``eval`` glyph split
  for the same prompts (lower is better; biased upward for small samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowgym.backends.compose.canvas import (
    CELL_SIZE,
    COLOURS,
    DIGITS,
    GRID,
    NUM_CELLS,
    PALETTE,
    SceneObject,
    render_canvases,
)
from flowgym.backends.compose.grammar import CATEGORIES, check_conditions, parse_prompt, sample_scene
from flowgym.backends.weights import load_module, resolve_weights
from flowgym.metrics import frechet_distance, gaussian_statistics

__all__ = [
    "LIT_THRESHOLD",
    "MIN_LIT_PIXELS",
    "SCORER_FILE",
    "CanvasReading",
    "ComposeScorer",
    "DigitCellCNN",
    "ScoreResult",
    "canvas_cells",
    "load_scorer",
    "objects_read_right",
    "shipped_scorer",
]

SCORER_FILE = "compose_scorer.safetensors"
LIT_THRESHOLD = 0.3
MIN_LIT_PIXELS = 8
MASK_THRESHOLD = 0.15
STRAY_SCALE = 0.1
_PALETTE_RGB = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32)  # (4, 3)


class DigitCellCNN(nn.Module):
    """Small CNN reading the digit 0-4 of a cell's ink crop ``(B, 1, 16, 16)`` in [0, 1].

    ``features`` returns the penultimate ``(B, feature_dim)`` activations, ``forward`` the logits ``(B, 5)``.
    """

    def __init__(self, channels: int = 16, feature_dim: int = 32) -> None:
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim}
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4
        )  # fmt: skip
        self.fc = nn.Linear(2 * c * 16, feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, len(DIGITS))

    def features(self, crops: Tensor) -> Tensor:
        x = crops.to(self.fc.weight.dtype) * 2.0 - 1.0
        return F.silu(self.fc(self.conv(x).flatten(1)))

    def forward(self, crops: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(crops)))


def canvas_cells(images: Tensor) -> Tensor:
    """``(B, 3, 32, 32)`` -> the cells ``(B, 4, 3, 16, 16)`` in row-major order."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (GRID * CELL_SIZE, GRID * CELL_SIZE):
        raise ValueError(f"images must have shape (B, 3, 32, 32); got {tuple(images.shape)}")
    b = images.shape[0]
    x = images.float().reshape(b, 3, GRID, CELL_SIZE, GRID, CELL_SIZE)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, NUM_CELLS, 3, CELL_SIZE, CELL_SIZE)


@dataclass
class CanvasReading:
    """What the reader sees per cell (all ``(B, 4)`` unless noted)."""

    occupied: Tensor  # bool
    digit: Tensor  # long, digit value (0-4)
    colour: Tensor  # long, index into COLOURS
    digit_prob: Tensor  # float, CNN probability of the read digit
    features: Tensor  # (B, 4, D + 3): CNN features and mean RGB of each cell
    stray: Tensor  # (B,) mean ink outside the objects' masks
    stray_mark: Tensor  # (B,) bool: a visible mark in a cell read as empty

    def objects(self) -> list[list[SceneObject]]:
        occ, dig, col = self.occupied.cpu(), self.digit.cpu(), self.colour.cpu()
        return [
            [SceneObject(int(dig[i, c]), COLOURS[int(col[i, c])], c) for c in range(NUM_CELLS) if occ[i, c]]
            for i in range(occ.shape[0])
        ]


@dataclass
class ScoreResult:
    """Per-image scores: ``strict`` and ``partial`` float32 ``(B,)``, ``categories`` and ``objects`` read."""

    strict: Tensor
    partial: Tensor
    categories: list[str]
    objects: list[list[SceneObject]]
    reading: CanvasReading


class ComposeScorer:
    """Object reader + GenEval-style evaluator around a ``DigitCellCNN`` (module docstring)."""

    def __init__(self, cnn: DigitCellCNN, device: torch.device | str = "cpu") -> None:
        self.cnn = cnn.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.cnn.fc.weight.device

    def to(self, device: torch.device | str) -> "ComposeScorer":
        self.cnn.to(device)
        return self

    # ------------------------------------------------------------------ reading
    @torch.no_grad()
    def read(self, images: Tensor, batch_size: int = 2048) -> CanvasReading:
        """Read every cell of ``images (B, 3, 32, 32)`` in [0, 1]."""
        images = images.to(self.device, torch.float32).clamp(0.0, 1.0)
        cells = canvas_cells(images)  # (B, 4, 3, 16, 16)
        b = cells.shape[0]
        ink = cells.amax(dim=2)  # (B, 4, 16, 16)
        lit = ink > LIT_THRESHOLD
        occupied = lit.flatten(2).sum(-1) >= MIN_LIT_PIXELS
        weights = ink * lit
        mean_rgb = (cells * weights[:, :, None]).flatten(3).sum(-1) / weights.flatten(2).sum(-1).clamp_min(1e-6)[..., None]
        chroma = mean_rgb / mean_rgb.amax(-1, keepdim=True).clamp_min(1e-6)
        colour = torch.cdist(chroma.reshape(-1, 3), _PALETTE_RGB.to(chroma.device)).argmin(-1).reshape(b, NUM_CELLS)
        crops = ink.reshape(b * NUM_CELLS, 1, CELL_SIZE, CELL_SIZE)
        logits, feats = [], []
        for i in range(0, len(crops), batch_size):
            f = self.cnn.features(crops[i : i + batch_size])
            feats.append(f.float())
            logits.append(self.cnn.head(f).float())
        probs = torch.cat(logits).softmax(-1).reshape(b, NUM_CELLS, -1)
        digit_prob, digit_index = probs.max(-1)
        digit = torch.tensor(DIGITS, device=self.device)[digit_index]
        cell_mean = cells.flatten(3).mean(-1)  # (B, 4, 3)
        features = torch.cat([torch.cat(feats).reshape(b, NUM_CELLS, -1), cell_mean], dim=-1)
        # background: ink outside the dilated masks of the objects read
        mask = (ink > MASK_THRESHOLD) & occupied[:, :, None, None]
        mask = F.max_pool2d(mask.float().reshape(b * NUM_CELLS, 1, CELL_SIZE, CELL_SIZE), 3, 1, 1).reshape_as(ink) > 0
        outside = (~mask).float()
        stray = (ink * outside).flatten(1).sum(-1) / outside.flatten(1).sum(-1).clamp_min(1.0)
        stray_mark = (lit.flatten(2).any(-1) & ~occupied).any(-1)
        return CanvasReading(occupied, digit, colour, digit_prob, features, stray, stray_mark)

    # ------------------------------------------------------------------ scoring
    def score(self, images: Tensor, prompts: Sequence[str]) -> ScoreResult:
        """Strict and partial scores of each (image, prompt) pair."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        reading = self.read(images)
        objects = reading.objects()
        strict, partial, categories = [], [], []
        for prompt, objs in zip(prompts, objects):
            spec = parse_prompt(prompt)
            met = check_conditions(spec, objs)
            strict.append(float(all(met)))
            partial.append(sum(met) / len(met))
            categories.append(spec.category)
        return ScoreResult(
            torch.tensor(strict, dtype=torch.float32),
            torch.tensor(partial, dtype=torch.float32),
            categories,
            objects,
            reading,
        )

    def metrics(self, images: Tensor, prompts: Sequence[str], fd: bool = True) -> dict[str, float]:
        """Aggregates: ``compose`` (strict, mean), ``compose_partial``, ``compose/<category>`` (strict
        per category present), the diagnostics of the module docstring and ``compose_fd``."""
        result = self.score(images, prompts)
        out: dict[str, float] = {
            "compose": float(result.strict.mean()),
            "compose_partial": float(result.partial.mean()),
        }
        cats = np.asarray(result.categories)
        for category in CATEGORIES:
            sel = torch.from_numpy(cats == category)
            if sel.any():
                out[f"compose/{category}"] = float(result.strict[sel].mean())
                out[f"compose_partial/{category}"] = float(result.partial[sel].mean())
        out.update(self._diagnostics(result, prompts))
        if fd:
            out["compose_fd"] = self.frechet_distance(images, prompts, reading=result.reading) if len(prompts) >= 2 else float("nan")
        return out

    def _diagnostics(self, result: ScoreResult, prompts: Sequence[str]) -> dict[str, float]:
        colour_counts = np.zeros(len(COLOURS))
        cell_counts = np.zeros(NUM_CELLS)
        digit_counts = np.zeros(len(DIGITS))
        named, total = 0, 0
        for prompt, objs in zip(prompts, result.objects):
            spec = parse_prompt(prompt)
            for o in objs:
                digit_counts[DIGITS.index(o.digit)] += 1
                total += 1
                named += o.digit in spec.digits
                if spec.colour_free:
                    colour_counts[COLOURS.index(o.colour)] += 1
                if spec.position_free:
                    cell_counts[o.cell] += 1
        r = result.reading
        occ = r.occupied
        return {
            "compose/colour_entropy": _normalised_entropy(colour_counts),
            "compose/cell_entropy": _normalised_entropy(cell_counts),
            "compose/digit_entropy": _normalised_entropy(digit_counts),
            "compose/clean": float((1.0 - (r.stray / STRAY_SCALE).clamp(0.0, 1.0)).mean()),
            "compose/stray_marks": float(r.stray_mark.float().mean()),
            "compose/digit_confidence": float(r.digit_prob[occ].mean()) if occ.any() else float("nan"),
            "compose/digit_precision": named / total if total else float("nan"),
            "compose/objects_per_canvas": float(occ.float().sum(-1).mean()),
        }

    # ------------------------------------------------------------------ Frechet distance
    def canvas_features(self, images: Tensor, reading: CanvasReading | None = None) -> Tensor:
        """Canvas features ``(B, 4 * (D + 3))``: per cell the CNN features and mean RGB."""
        reading = self.read(images) if reading is None else reading
        return reading.features.flatten(1)

    def reference_canvases(self, prompts: Sequence[str], min_samples: int = 1000, seed: int = 0) -> Tensor:
        """Real canvases for ``prompts`` from the ``eval`` glyph split: each prompt repeated
        ``ceil(min_samples / len(prompts))`` times, scenes and glyphs drawn with ``seed``."""
        repeat = max(1, math.ceil(min_samples / max(1, len(prompts))))
        rng = np.random.default_rng(seed)
        scenes = [sample_scene(p, rng) for p in prompts for _ in range(repeat)]
        return render_canvases(scenes, rng, split="eval")

    def reference_statistics(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        key = tuple(sorted(prompts))
        return _reference_statistics_cached(self, key) if self is _shipped_or_none() else self._reference_statistics(key)

    def _reference_statistics(self, prompts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        return gaussian_statistics(self.canvas_features(self.reference_canvases(prompts)))

    def frechet_distance(self, images: Tensor, prompts: Sequence[str], reading: CanvasReading | None = None) -> float:
        """FD of ``images``' canvas features to real canvases for the same prompts (lower is better)."""
        mu, cov = gaussian_statistics(self.canvas_features(images, reading))
        ref_mu, ref_cov = self.reference_statistics(prompts)
        return frechet_distance(mu, cov, ref_mu, ref_cov)


def _normalised_entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))


def objects_read_right(scorer: ComposeScorer, images: Tensor, scenes: Sequence[Sequence[SceneObject]]) -> dict[str, float]:
    """Reader accuracy against ground truth: ``object_accuracy`` (fraction of true objects read with
    the right digit and colour in their cell), ``digit_accuracy``, ``colour_accuracy`` and
    ``false_objects`` (objects read in cells that are empty, per canvas)."""
    reading = scorer.read(images)
    read = reading.objects()
    right = digit_ok = colour_ok = n = false = 0
    for truth, seen in zip(scenes, read):
        seen_by_cell = {o.cell: o for o in seen}
        true_cells = {o.cell for o in truth}
        false += sum(1 for c in seen_by_cell if c not in true_cells)
        for o in truth:
            n += 1
            s = seen_by_cell.get(o.cell)
            if s is None:
                continue
            digit_ok += s.digit == o.digit
            colour_ok += s.colour == o.colour
            right += (s.digit == o.digit) and (s.colour == o.colour)
    return {
        "object_accuracy": right / n,
        "digit_accuracy": digit_ok / n,
        "colour_accuracy": colour_ok / n,
        "false_objects": false / len(scenes),
        "num_objects": n,
    }


# --------------------------------------------------------------------------- shipped scorer
def load_scorer(weights: str | Path | None = None, device: torch.device | str = "cpu") -> ComposeScorer:
    """A ``ComposeScorer`` around the shipped CNN (or one in a folder / ``.safetensors`` file)."""
    cnn = load_module(resolve_weights(weights, SCORER_FILE), DigitCellCNN)
    return ComposeScorer(cnn, device)


_SHIPPED: list[ComposeScorer] = []


def shipped_scorer() -> ComposeScorer:
    """The shipped scorer, loaded once per process."""
    if not _SHIPPED:
        _SHIPPED.append(load_scorer())
    return _SHIPPED[0]


def _shipped_or_none() -> ComposeScorer | None:
    return _SHIPPED[0] if _SHIPPED else None


@lru_cache(maxsize=32)
def _reference_statistics_cached(scorer: ComposeScorer, prompts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    return scorer._reference_statistics(prompts)
