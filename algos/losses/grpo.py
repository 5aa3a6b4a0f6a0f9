"""Flow-GRPO: group-relative advantages and PPO's clipped ratio over SDE denoising steps.

Per trained (sample, step) pair::

    A = clip((r - mean_group(r)) / (std_batch(r) + 1e-4), -5, 5)       (algos.advantages, "group")
    L = mean_i max(-A_i * ratio_i, -A_i * clamp(ratio_i, 1 - eps, 1 + eps)) + beta * KL(new || ref)

with ``eps = 1e-4``. The published KL weights (beta = 0.04 for OCR / GenEval, 0.01 for
PickScore) are on Flow-GRPO's scale, which omits ``dt`` (``kl_convention="flow_grpo"``); with
the exact KL (the default here) the same penalty needs ``beta * |dt|``.
"""

from __future__ import annotations

from algos.losses.base import register_loss
from algos.losses.ppo_clip import ClippedRatioLoss

__all__ = ["GRPOLoss"]


@register_loss("grpo")
class GRPOLoss(ClippedRatioLoss):
    """Flow-GRPO's loss. Args as ``ClippedRatioLoss``: ``clip_range`` (default 1e-4), ``beta``
    (default 0), ``kl_convention`` ("exact" or "flow_grpo"), ``delta``, ``log_kl_ref``."""

    default_advantage = "group"
    default_clip_range = 1e-4
