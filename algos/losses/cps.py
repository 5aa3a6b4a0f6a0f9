"""Flow-CPS: Flow-GRPO's clipped objective on coefficients-preserving (CPS) sampling steps.

The step policy is the CPS kernel (``FlowPolicy(backend, kernel="cps", noise_level=0.8)``, see
``flowgym.kernels.cps_step``); the objective is PPO-clip with the tighter clip range 1e-5 of the
CPS / Fast configurations::

    L = mean_i max(-A_i * ratio_i, -A_i * clamp(ratio_i, 1 - 1e-5, 1 + 1e-5)) [+ beta * KL(new || ref)]

The CPS reference code drops the Gaussian constants of its log-probability; here the policy's
exact log-probability is used unless the policy was built with ``log_prob_convention="cps_legacy"``.
"""

from __future__ import annotations

from types import MappingProxyType

from algos.losses.base import register_loss
from algos.losses.ppo_clip import ClippedRatioLoss

__all__ = ["CPSLoss"]


@register_loss("cps")
class CPSLoss(ClippedRatioLoss):
    """Flow-CPS's loss. Requires a policy with the ``"cps"`` kernel (``ValueError`` otherwise,
    unless ``allow_kernel_mismatch=True``). Args as ``ClippedRatioLoss``; ``clip_range`` 1e-5."""

    default_advantage = "group"
    default_clip_range = 1e-5
    required_kernel = "cps"
    policy_defaults = MappingProxyType({"kernel": "cps", "noise_level": 0.8})
