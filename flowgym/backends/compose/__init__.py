"""The compose family: FlowDenoise-Compose-v0, a GenEval-in-miniature compositional task.

* ``canvas``: seeded 32x32 RGB canvases of coloured sklearn digit glyphs (0-4) on a 2x2 grid;
* ``grammar``: prompts of GenEval's six categories, their conditions, the train / held-out split;
* ``scorer``: the object reader (occupancy, palette colour, a small CNN for the digit) and the
  GenEval-style evaluator with collapse diagnostics and a Frechet distance;
* ``model``: the text-conditioned ``SD3Transformer2DModel`` + tiny ``CLIPTextModel``;
* ``backend``: ``ComposeBackend`` (registered as ``"compose"``, gym id ``FlowDenoise-Compose-v0``);
* ``pretrain``: ``python -m flowgym.backends.compose.pretrain`` retrains the shipped weights.

Importing this package is light (no diffusers / transformers import until a model is built).
"""

from flowgym.backends.compose.backend import ComposeBackend  # registers the family

from flowgym.backends.compose.canvas import COLOURS, DIGITS, PALETTE, SceneObject, render_canvas, render_canvases
from flowgym.backends.compose.grammar import (
    CATEGORIES,
    PromptSpec,
    check_conditions,
    parse_prompt,
    partial_score,
    prompt_sets,
    sample_scene,
    strict_score,
)

__all__ = [
    "CATEGORIES", "COLOURS", "ComposeBackend", "DIGITS", "PALETTE", "PromptSpec", "SceneObject", "check_conditions",
    "parse_prompt", "partial_score", "prompt_sets", "render_canvas", "render_canvases", "sample_scene",
    "strict_score",
]  # fmt: skip
