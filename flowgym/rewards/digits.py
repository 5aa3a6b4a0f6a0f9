"""Rewards of the embedded digits task: prompt alignment and a visual property that fights it.

* ``digit_alignment``: the probability the shipped digit classifier (trained on a split the flow
  model never saw) assigns to the digit the prompt names.
* ``ink``: mean ink coverage of the image. Pushed hard, it fills the canvas and destroys the
  digit's shape, so it conflicts with ``digit_alignment`` (a reward-hacking probe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from flowgym.backends.digits import load_classifier, prompt_digits, to_digit_grid
from flowgym.rewards.base import Reward, check_reward_batch, register_reward

__all__ = ["DigitAlignmentReward", "InkReward", "ink_coverage"]


@register_reward("digit_alignment")
class DigitAlignmentReward(Reward):
    """``p(prompt digit | image)`` under the shipped classifier, in [0, 1].

    Images of any channel count / size are averaged to grey and area-resampled to 8x8 first.
    Every prompt must name one digit (``"a handwritten 7"``); ``classifier`` may point to another
    folder or ``.safetensors`` file written by ``flowgym.backends.digits.pretrain``.
    """

    def __init__(self, classifier: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        self.model = load_classifier(classifier, device=device)

    def to(self, device: torch.device | str) -> "DigitAlignmentReward":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_batch(images, prompts)
        device = self.model.fc.weight.device
        labels = prompt_digits(prompts).to(device)
        probs = self.model(to_digit_grid(images.to(device))).float().softmax(dim=-1)
        return probs.gather(1, labels[:, None]).squeeze(1).to(images.device)


def ink_coverage(images: Tensor) -> Tensor:
    """Mean ink per image: ``mean_{c,h,w} image`` for images in [0, 1] (1 = full ink), float32 ``(B,)``."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
    return images.float().clamp(0.0, 1.0).mean(dim=(1, 2, 3))


@register_reward("ink")
class InkReward(Reward):
    """Mean ink coverage in [0, 1] (real digits average about 0.3; a filled canvas scores 1).

    Rewards bolder, thicker strokes; pushed far it turns digits into blobs the classifier no longer
    recognises, so it conflicts with ``digit_alignment``.
    """

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_batch(images, prompts)
        return ink_coverage(images)
