"""GRPO-Guard: PPO-clip on a re-centred, step-normalised ratio ("RatioNorm") with gradient re-weighting.

Why: with ``d = mu_new - mu_old`` and the sampled action ``x' = mu_old + s_t * eps``, the
mean-over-dims log-ratio is ``mean(eps * d) / s_t - mean(d^2) / (2 s_t^2)``: biased below 0 and with
a spread that grows as the step's std ``s_t`` shrinks, so one clip range cannot suit every step.
RatioNorm, per trained (sample, step) pair::

    S     = mean(std factor) * mean(sqrt(-dt))                       (means over the step's rows)
    log r = S * (logp_new - logp_old + mean_dims((mu_new - mu_old)^2) / (2 S^2))
    L     = mean_i w_i * max(-A_i * r_i, -A_i * clamp(r_i, 1 - eps, 1 + eps))   [+ beta * KL(new || ref)]
    w_i   = 1 / mean(sqrt(-dt))^2                                    (step_weighting="guard")

Mapping onto this project's entries for the Flow-SDE kernel (``flowgym.kernels.flow_sde_step``):
``dt = sigma_next - sigma < 0``, so ``sqrt(-dt) = sqrt(sigma - sigma_next)``; the rollout's
``scale`` is ``s_t = sigma_t * sqrt(-dt)``, so the "std factor" (Flow-GRPO's ``std_dev_t``) is
``sigma_t = a * sqrt(sigma / (1 - sigma)) = scale / sqrt(sigma - sigma_next)``. The reference code's
means run over its loss call's batch, which always holds one denoising step, where both factors
are constants; here a mini-batch mixes steps, so the means run over the rows of the same step
(same ``(sigma, sigma_next)``, ``functional.per_step_mean``). Hence ``S = scale`` (the step's std)
for every row and ``log r = mean_dims(eps * d)`` with ``eps = (x' - mu_old) / scale``: centred at 0
under the rollout's noise and with a spread independent of the step; the weight is
``w = 1 / (sigma - sigma_next)``. ``mu_old`` is the rollout's ``loc`` entry (refreshed with the
log-probabilities by ``refresh_old_policy``).

Defaults as the official SD3.5-M recipe (``train_sd3_GRPO_Guard.py`` in the Flow-GRPO repository):
clip range 2e-6 (GenEval, OCR; use 4e-6 for PickScore), beta 0, per-group-std advantages
(``"group_std"``), learning rate 1e-4 (a trainer setting), 9 of 10 steps trained.
``step_weighting`` can be set to "none" (RatioNorm alone) or "tempflow" like every ratio loss.

Diagnostics: ``ratio_mean/min/max`` and ``approx_kl`` are those of the plain ratio
``exp(logp_new - logp_old)`` as for every loss (the reference logs ``approx_kl`` on it too);
``clip_frac_high/low`` are those of the clipped RatioNorm ratio ``r``, whose own statistics are
``norm_ratio_mean/min/max``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from algos.losses.base import PolicyEvaluation, register_loss
from algos.losses.functional import rationorm_log_ratio, rationorm_scale
from algos.losses.ppo_clip import ClippedRatioLoss

__all__ = ["GRPOGuardLoss"]


@register_loss("grpo_guard")
class GRPOGuardLoss(ClippedRatioLoss):
    """GRPO-Guard's loss (see the module docstring).

    Args:
        policy: the ``FlowPolicy`` being trained (any stochastic kernel; defined with Flow-SDE).
            Its log-probabilities must use the exact Gaussian convention (RatioNorm's correction
            term assumes the ``1 / (2 s^2)`` factor); ``reduce`` "mean" (published) or "sum", the
            same reduction being used for the squared mean shift.
        clip_range: eps of the clip on the RatioNorm ratio; 2e-6 by default (4e-6 for PickScore).
        step_weighting: "guard" by default (``1 / mean(sqrt(-dt))^2``); "none" or "tempflow".
        **kwargs: ``beta``, ``kl_convention``, ``delta``, ``log_kl_ref``, ``allow_kernel_mismatch``
            (see ``FlowPolicyLoss``).
    """

    default_advantage = "group_std"
    default_clip_range = 2e-6
    default_step_weighting = "guard"
    extra_diagnostic_keys = ("norm_ratio_mean", "norm_ratio_min", "norm_ratio_max")

    def __init__(self, policy: nn.Module, *, clip_range: float | None = None, **kwargs: Any) -> None:
        super().__init__(policy, clip_range=clip_range, **kwargs)
        convention = getattr(policy, "log_prob_convention", "exact")
        if convention != "exact":
            raise ValueError(
                f"GRPO-Guard's RatioNorm needs the exact Gaussian log-probability; the policy uses "
                f"log_prob_convention={convention!r} (build it with log_prob_convention='exact')"
            )
        self.reduce = getattr(policy, "reduce", "mean")

    def normalised_log_ratio(self, batch: PolicyEvaluation) -> Tensor:
        """RatioNorm's ``log r`` per (sample, step), with gradient, shape ``(N,)``."""
        k = self.tensor_keys
        device = batch.scale.device
        sigma = batch.td.get(k.sigma).to(device)
        sigma_next = batch.td.get(k.sigma_next).to(device)
        norm_scale = rationorm_scale(batch.scale, sigma, sigma_next)  # parameter-free: no gradient
        return rationorm_log_ratio(batch.log_ratio, batch.loc_new, batch.loc_old, norm_scale, reduce=self.reduce)

    def objective(self, batch: PolicyEvaluation) -> dict[str, Tensor]:
        log_ratio = self.normalised_log_ratio(batch)
        out = self.clipped_objective(batch, batch.advantage, log_ratio=log_ratio)
        with torch.no_grad():
            ratio = torch.exp(log_ratio.detach())
            out.update(norm_ratio_mean=ratio.mean(), norm_ratio_min=ratio.min(), norm_ratio_max=ratio.max())
        return out
