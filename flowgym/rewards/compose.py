"""Rewards of the compose task (``FlowDenoise-Compose-v0``), read by the shipped object reader.

* ``compose``: GenEval-style strict score, 1 when every condition of the prompt holds (the canvas
  holds exactly the prompt's objects, with the named digits, colours, count and relation), else 0;
* ``compose_partial``: the fraction of the prompt's conditions met, in [0, 1] (a denser signal);
* ``clean_canvas``: background cleanliness in [0, 1], ``1 - min(1, stray / 0.1)`` where ``stray`` is
  the mean ink outside the (dilated) masks of the objects read; penalises haze and stray marks.

Conditions and reading are documented in ``flowgym.backends.compose.grammar`` and
``flowgym.backends.compose.scorer``. Prompts must be grammar prompts (``clean_canvas`` ignores them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from flowgym.rewards.base import Reward, check_reward_batch, register_reward

__all__ = ["CleanCanvasReward", "ComposePartialReward", "ComposeReward"]


class _ScorerReward(Reward):
    def __init__(self, scorer: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        from flowgym.backends.compose.scorer import load_scorer, shipped_scorer

        self.scorer = shipped_scorer() if scorer is None and str(device) == "cpu" else load_scorer(scorer, device)

    def to(self, device: torch.device | str) -> "_ScorerReward":
        if torch.device(device) != self.scorer.device:
            from flowgym.backends.compose.scorer import ComposeScorer
            import copy

            self.scorer = ComposeScorer(copy.deepcopy(self.scorer.cnn), device)
        return self


@register_reward("compose")
class ComposeReward(_ScorerReward):
    """Strict GenEval-style correctness (0 or 1) of each image for its prompt."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_batch(images, prompts)
        return self.scorer.score(images, prompts).strict.to(images.device)


@register_reward("compose_partial")
class ComposePartialReward(_ScorerReward):
    """Fraction of the prompt's conditions met, in [0, 1]."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_batch(images, prompts)
        return self.scorer.score(images, prompts).partial.to(images.device)


@register_reward("clean_canvas")
class CleanCanvasReward(_ScorerReward):
    """Background cleanliness in [0, 1]: 1 for a black background around the objects."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_batch(images, prompts)
        from flowgym.backends.compose.scorer import STRAY_SCALE

        stray = self.scorer.read(images).stray
        return (1.0 - (stray / STRAY_SCALE).clamp(0.0, 1.0)).float().to(images.device)
