"""Flow-DPPO: an importance-weighted policy gradient with a divergence-based asymmetric mask.

Per trained (sample, step) pair, with ``ratio = exp(logp_new - logp_old)``::

    D = mean_dims((loc_new - loc_old)^2 / (2 scale^2))        exact KL between old and new step policy
        (or D = mean_dims((v_new - v_old)^2) with divergence="velocity")
    M = 0  if (A > 0 and ratio > 1 and D >= delta) or (A < 0 and ratio < 1 and D >= delta),  else 1
    L = sum_i M_i * (-A_i * ratio_i) / Z  [+ beta * KL(new || ref)]

``Z = N`` (normalize="all", the reference code: masked elements count as zeros) or the number
kept (normalize="kept", one port's choice). There is no ratio clipping: steps whose divergence is
under ``delta`` pass unchanged and corrective moves always pass. Thresholds used: 1e-5 (official
UniRL recipe, the default) and 1e-6 (the first author's reproduction configs), both on the
mean-over-dims scale. Works with the Flow-SDE kernel (default) and with CPS ("Flow-DPPO + CPS").

The mask only bites once the policy has moved since the rollout: it needs more than one
optimiser step per rollout batch (two mini-batches per rollout in the recipes).

``step_weighting`` ("none", "tempflow", "guard"; see ``algos.losses.base``) multiplies each
element of the sum by its step weight: ``L = sum_i w_i * M_i * (-A_i * ratio_i) / Z``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from algos.losses.base import FlowPolicyLoss, PolicyEvaluation, register_loss
from algos.losses.functional import flow_dppo_mask, flow_dppo_objective, importance_ratio, velocity_divergence

__all__ = ["FlowDPPOLoss"]


@register_loss("flow_dppo")
class FlowDPPOLoss(FlowPolicyLoss):
    """Flow-DPPO's loss.

    Args:
        policy: the ``FlowPolicy`` being trained (``"flow_sde"`` or ``"cps"`` kernel).
        delta: the divergence threshold of the mask (>= 0; ``inf`` gives the plain
            importance-weighted objective). Default 1e-5.
        divergence: ``"kl"`` (exact mean-over-dims KL of the step policies, default) or
            ``"velocity"`` (mean squared velocity difference; needs the rollout's ``velocity``).
        normalize: ``"all"`` (divide by N, default) or ``"kept"`` (divide by the kept count).
        beta, kl_convention, log_kl_ref, allow_kernel_mismatch, step_weighting: see ``FlowPolicyLoss``.
    """

    default_advantage = "group"
    supports_step_weighting = True

    def __init__(
        self,
        policy: nn.Module,
        *,
        delta: float = 1e-5,
        divergence: Literal["kl", "velocity"] = "kl",
        normalize: Literal["all", "kept"] = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, delta=delta, **kwargs)
        if divergence not in ("kl", "velocity"):
            raise ValueError(f"divergence must be 'kl' or 'velocity'; got {divergence!r}")
        if normalize not in ("all", "kept"):
            raise ValueError(f"normalize must be 'all' or 'kept'; got {normalize!r}")
        self.divergence = divergence
        self.normalize = normalize

    def step_divergence(self, batch: PolicyEvaluation) -> Tensor:
        """The mask's divergence per step, detached, shape (N,)."""
        if self.divergence == "kl":
            return batch.kl_old_new
        if batch.velocity_old is None:
            raise KeyError(f"divergence='velocity' needs the rollout's velocity under {self.tensor_keys.velocity!r}")
        with torch.no_grad():
            return velocity_divergence(batch.velocity_new.detach(), batch.velocity_old.to(batch.velocity_new.device))

    def minibatch_statistics(self, tensordict: TensorDictBase) -> dict[str, Tensor] | None:
        """For ``normalize="kept"``: the kept count and the rows of ``tensordict`` (a micro-batch, one
        forward without gradient). The updater sums them over the micro-batches and processes of a
        mini-batch and sets ``minibatch_totals``, so that the loss divides by the mini-batch's kept
        count, not each micro-batch's own. None for ``normalize="all"`` (nothing to count)."""
        if self.normalize != "kept":
            return None
        with torch.no_grad():
            batch = self.evaluate(self._flat_input(tensordict))
            keep, _, _ = flow_dppo_mask(batch.ratio, batch.advantage, self.step_divergence(batch), self.delta)
        return {"kept": keep.sum().double(), "rows": torch.tensor(float(keep.numel()), dtype=torch.float64)}

    def objective(self, batch: PolicyEvaluation) -> dict[str, Tensor]:
        advantage = batch.advantage
        divergence = self.step_divergence(batch)
        keep, _, _ = flow_dppo_mask(batch.ratio, advantage, divergence, self.delta)
        # the gradient never enters exp() where it is masked: no 0 * inf = NaN under ratio overflow
        ratio = importance_ratio(batch.log_ratio, keep & (advantage != 0))
        totals = getattr(self, "minibatch_totals", None)
        kept_fraction = None
        if self.normalize == "kept" and totals:
            kept_fraction = totals["kept"].clamp(min=1) / totals["rows"]
        terms = flow_dppo_objective(ratio, advantage, divergence, self.delta, self.normalize, weight=batch.step_weight,
                                    kept_fraction=kept_fraction)
        positive, negative = advantage > 0, advantage < 0
        return {
            "loss_objective": terms.loss,
            # fraction masked among A > 0 / A < 0 (0 when there is none)
            "mask_frac_pos": terms.masked_pos.sum() / positive.sum().clamp(min=1),
            "mask_frac_neg": terms.masked_neg.sum() / negative.sum().clamp(min=1),
            "frac_over_threshold": (divergence >= self.delta).float().mean(),
        }
