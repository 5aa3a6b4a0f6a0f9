"""Adding a new trust-region method: DRPO's smooth ratio penalty, in one file plus one yaml.

DRPO (the successor of DPPO, arXiv 2606.09821) replaces the hard clip / mask by a smooth
quadratic penalty on the importance ratio. Per trained (sample, step) pair, with
``ratio = exp(logp_new - logp_old)`` (log-probs averaged over latent dimensions, as everywhere in
flowgym) and advantage ``A``, it MAXIMISES::

    J_i = ratio_i * A_i - |A_i| * (ratio_i - 1)^2 / (2 * delta)

so the loss to MINIMISE is ``L = mean_i -J_i`` (plus the optional ``beta * KL(new || reference)``
of the base class). ``dJ/dratio = A - |A| (ratio - 1) / delta`` vanishes at
``ratio = 1 + sign(A) * delta``: a soft version of PPO's clip at ``eps = delta`` whose pull back
grows linearly past it, instead of a gradient that drops to zero.

How to use it (nothing in ``algos/`` changes)
---------------------------------------------
1. This file subclasses ``algos.losses.FlowPolicyLoss``, implements ``objective`` (the maths is
   the pure function ``drpo_objective`` below) and registers the class with
   ``@register_loss("drpo")``.
2. ``configs/algo/drpo.yaml`` names the loss and sets ``module: examples.new_method.drpo_loss``;
   the trainer imports that module before building the loss, which registers it.
3. Train and benchmark::

       python -m algos.run algo=drpo                                   # one training run
       python -m algos.bench compare --algos drpo,flow_dppo --seeds 3  # side by side, with plots
       python -m algos.run algo=drpo algo.loss.delta=1e-3              # another penalty width

Copy this file and the yaml, rename the loss, change ``objective``: that is a new method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from algos.losses import FlowPolicyLoss, PolicyEvaluation, register_loss
from algos.losses.functional import check_nonnegative

__all__ = ["DRPOLoss", "drpo_objective"]


def drpo_objective(ratio: Tensor, advantage: Tensor, delta: float) -> Tensor:
    """DRPO's per-element loss (to be minimised), shape ``(N,)``.

    ::

        loss_i = -(ratio_i * A_i - |A_i| * (ratio_i - 1)^2 / (2 * delta))

    ``delta > 0`` is the width of the penalty on the ratio scale (the maximiser of the surrogate
    is ``ratio = 1 + sign(A) * delta``). Elements with ``A = 0`` contribute exactly 0.
    """
    if ratio.shape != advantage.shape:
        raise ValueError(f"ratio and advantage must have the same shape; got {tuple(ratio.shape)} and {tuple(advantage.shape)}")
    delta = check_nonnegative("delta", delta, allow_inf=False)
    if delta == 0:
        raise ValueError("delta must be > 0 (it divides the penalty); got 0")
    advantage = advantage.to(ratio.dtype)
    surrogate = ratio * advantage - advantage.abs() * (ratio - 1.0) ** 2 / (2.0 * delta)
    return torch.where(advantage != 0, -surrogate, torch.zeros_like(surrogate))


@register_loss("drpo")
class DRPOLoss(FlowPolicyLoss):
    """DRPO's smooth-penalty loss over a ``FlowPolicy`` (any stochastic kernel).

    Args:
        policy: the ``FlowPolicy`` being trained.
        delta: penalty width on the ratio scale (> 0). Default 1e-2. Unlike a hard clip range
            (Flow-GRPO's 1e-4 only zeroes gradients), the penalty's gradient ``|A| (ratio - 1) / delta``
            acts on every sample, and a single-sample ratio carries noise of about 1e-3 per step
            on mean-reduced log-probs (``python -m algos.bench ratio_noise``): with ``delta`` at or
            below that noise the pull-back dominates the policy gradient and training stalls
            (measured on the digits task: reward gain 0.016 at 1e-4, 0.062 at 1e-3, 0.174 at 1e-2
            in 40 iterations, 5 seeds; Flow-DPPO 0.144).
        kl_threshold: the KL threshold of the shared ``frac_over_threshold`` diagnostic
            (the base class's ``delta``), 1e-5 by default.
        beta, kl_convention, log_kl_ref, allow_kernel_mismatch: see ``FlowPolicyLoss``.
    """

    default_advantage = "group"
    #: log-ratios above this are clamped (value held, gradient 0): exp(20) ~ 5e8 keeps the loss finite
    MAX_LOG_RATIO: float = 20.0

    def __init__(self, policy: nn.Module, *, delta: float = 1e-2, kl_threshold: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(policy, delta=kl_threshold, **kwargs)
        self.penalty_delta = check_nonnegative("delta", delta, allow_inf=False)
        if self.penalty_delta == 0:
            raise ValueError("DRPO's delta must be > 0 (it divides the penalty); got 0")

    def objective(self, batch: PolicyEvaluation) -> dict[str, Tensor]:
        # overflow guard: a ratio past exp(MAX_LOG_RATIO) (a hopelessly stale sample) is held there
        # with no gradient, so the loss stays finite instead of inf - inf = NaN
        ratio = torch.exp(batch.log_ratio.clamp(max=self.MAX_LOG_RATIO))
        per_element = drpo_objective(ratio, batch.advantage, self.penalty_delta)
        ratio = ratio.detach()
        # the shared diagnostic keys only; the clip fractions report where the ratio is past the
        # surrogate's maximum 1 +- delta, i.e. where the penalty pulls back (DRPO's soft "clip")
        return {
            "loss_objective": per_element.mean(),
            "clip_frac_high": (ratio > 1.0 + self.penalty_delta).float().mean(),
            "clip_frac_low": (ratio < 1.0 - self.penalty_delta).float().mean(),
        }
