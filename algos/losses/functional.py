"""Pure tensor maths of the policy-gradient objectives: ratios, divergences, clipped and masked losses.

Everything here works on flat per-(sample, step) tensors of shape ``(N,)`` (divergences take
the latent-shaped means / velocities, ``(N, ...)``) and has no state. The loss modules in
``algos.losses`` only gather tensors from a tensordict and call these functions.

Conventions
-----------
* ``log_ratio = logp_new - logp_old`` and ``ratio = exp(log_ratio)``, with log-probabilities
  reduced over the latent dimensions the same way for old and new policy (the mean, by default:
  the scale on which clip ranges such as 1e-4 and thresholds such as 1e-5 are published).
* The step policy is ``N(loc, scale^2 I)`` with a ``scale`` that does not depend on the
  parameters, so old and new policy share it and their exact KL is
  ``||loc_new - loc_old||^2 / (2 scale^2)`` (symmetric), reported as a mean over dimensions.
* Losses are to be MINIMISED: the policy-gradient surrogate ``A * ratio`` appears as
  ``-A * ratio``.
* Ratio overflow: ``exp`` of a large log-ratio is ``inf``. Every objective here selects with
  ``torch.where`` instead of multiplying by a 0/1 mask, so a masked or clipped ``inf`` never
  becomes ``inf * 0 = NaN`` in the forward pass. The backward pass through ``exp`` would still
  compute ``0 * inf`` for those elements; build the ratio with ``importance_ratio(log_ratio,
  keep)`` (``keep`` = the elements that do receive a gradient) to make it NaN-free as well.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from flowgym.kernels import gaussian_kl

__all__ = [
    "ratio_from_log_probs",
    "importance_ratio",
    "approx_kl",
    "step_divergence",
    "velocity_divergence",
    "PPOClipTerms",
    "ppo_clip_active",
    "ppo_clip_objective",
    "FlowDPPOTerms",
    "flow_dppo_mask",
    "flow_dppo_objective",
    "check_nonnegative",
]


# --------------------------------------------------------------------------- validation
def check_nonnegative(name: str, value: float, *, allow_inf: bool = True) -> float:
    """Return ``float(value)`` or raise ``ValueError`` if it is negative, NaN (or inf when not allowed)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number; got {value!r}") from None
    if math.isnan(value) or value < 0 or (not allow_inf and math.isinf(value)):
        accepted = "a number >= 0" + ("" if not allow_inf else " (inf allowed)")
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return value


def _same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of the same shape; got {shapes}")


# --------------------------------------------------------------------------- ratios
def ratio_from_log_probs(logp_new: Tensor, logp_old: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_ratio, ratio)`` with ``log_ratio = logp_new - logp_old`` and ``ratio = exp(log_ratio)``.

    Computed in float32 (or the inputs' wider dtype). When the new log-probability is computed
    exactly as the rollout's (same parameters, same kernel), ``log_ratio`` is exactly 0 and
    ``ratio`` exactly 1.
    """
    _same_shape(logp_new=logp_new, logp_old=logp_old)
    dtype = torch.promote_types(torch.promote_types(logp_new.dtype, logp_old.dtype), torch.float32)
    log_ratio = logp_new.to(dtype) - logp_old.to(dtype)
    return log_ratio, torch.exp(log_ratio)


def importance_ratio(log_ratio: Tensor, keep: Tensor | None = None) -> Tensor:
    """``exp(log_ratio)`` whose gradient is cut (exactly 0, never NaN) where ``keep`` is False.

    Forward: ``exp(log_ratio)`` everywhere (``inf`` where it overflows). Backward: the usual
    ``ratio * grad`` on kept elements, and no gradient at all into ``log_ratio`` elsewhere, so a
    masked or clipped overflow never produces ``0 * inf = NaN``. ``keep=None`` keeps everything.
    """
    if keep is None:
        return torch.exp(log_ratio)
    return torch.exp(torch.where(keep, log_ratio, log_ratio.detach()))


def approx_kl(log_ratio: Tensor) -> Tensor:
    """The k2 estimator of KL(old || new) that PPO-style code logs: ``0.5 * mean(log_ratio^2)``."""
    return 0.5 * (log_ratio.float() ** 2).mean()


# --------------------------------------------------------------------------- divergences
def step_divergence(loc_new: Tensor, loc_old: Tensor, scale: Tensor) -> Tensor:
    """Exact per-step KL between old and new Gaussian step policies, averaged over latent dimensions.

    ``D = mean_dims((loc_new - loc_old)^2 / (2 scale^2))``, shape ``(N,)``; ``scale`` is the
    shared std, ``(N, 1, ..., 1)`` or anything that broadcasts to ``loc``. Symmetric in old and
    new; exactly 0 when the means are equal. Raises ``ValueError`` for a zero std (ODE step).
    """
    return gaussian_kl(loc_new, loc_old, scale, reduce="mean")


def velocity_divergence(v_new: Tensor, v_old: Tensor) -> Tensor:
    """Velocity-space divergence (the Flow-DPPO variant): ``D = mean_dims((v_new - v_old)^2)``, ``(N,)``."""
    _same_shape(v_new=v_new, v_old=v_old)
    diff = v_new.float() - v_old.float()
    dims = tuple(range(1, diff.dim()))
    return (diff**2).mean(dim=dims) if dims else diff**2


# --------------------------------------------------------------------------- PPO-clip
class PPOClipTerms(NamedTuple):
    """Output of ``ppo_clip_objective`` (unpacks as a 3-tuple)."""

    #: ``max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))``, shape ``(N,)``
    per_element_loss: Tensor
    #: ``ratio > 1 + eps`` (Flow-GRPO's "clip fraction above 1")
    clipped_high: Tensor
    #: ``ratio < 1 - eps`` ("clip fraction below 1")
    clipped_low: Tensor


def ppo_clip_active(ratio: Tensor, advantage: Tensor, clip_range: float) -> Tensor:
    """Where the clipped branch of PPO-clip is the maximum, i.e. the gradient is zero.

    True iff ``-A * clamp(ratio, 1 - eps, 1 + eps) > -A * ratio``, which is
    ``(A > 0 and ratio > 1 + eps) or (A < 0 and ratio < 1 - eps)``. Computed without gradient.
    """
    clip_range = check_nonnegative("clip_range", clip_range)
    with torch.no_grad():
        ratio = ratio.detach()
        return ((advantage > 0) & (ratio > 1.0 + clip_range)) | ((advantage < 0) & (ratio < 1.0 - clip_range))


def ppo_clip_objective(ratio: Tensor, advantage: Tensor, clip_range: float) -> PPOClipTerms:
    """PPO's clipped surrogate (DDPO, Flow-GRPO, Flow-CPS), per element, to be minimised.

    ::

        loss_i = max(-A_i * ratio_i, -A_i * clamp(ratio_i, 1 - eps, 1 + eps))

    The maximum is taken with ``torch.where`` on ``ppo_clip_active``: identical values, the
    gradient is ``-A_i * d ratio_i`` where the unclipped branch is active and exactly 0 where the
    clipped one is. Elements with ``A_i = 0`` give 0 (and no gradient) even if ``ratio_i`` is
    ``inf``. Reduce with ``.mean()`` (Flow-GRPO averages over samples and trained steps).

    Returns ``(per_element_loss, clipped_high, clipped_low)``, the masks being
    ``ratio > 1 + eps`` and ``ratio < 1 - eps`` (Flow-GRPO's two logged clip fractions; whether
    the gradient is actually cut also depends on the sign of A, see ``ppo_clip_active``).
    """
    _same_shape(ratio=ratio, advantage=advantage)
    clip_range = check_nonnegative("clip_range", clip_range)
    advantage = advantage.to(ratio.dtype)
    clipped_ratio = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    active = ppo_clip_active(ratio, advantage, clip_range)
    unclipped = torch.where(advantage != 0, -advantage * ratio, torch.zeros_like(ratio))
    per_element = torch.where(active, -advantage * clipped_ratio, unclipped)
    with torch.no_grad():
        detached = ratio.detach()
        high = detached > 1.0 + clip_range
        low = detached < 1.0 - clip_range
    return PPOClipTerms(per_element, high, low)


# --------------------------------------------------------------------------- Flow-DPPO
class FlowDPPOTerms(NamedTuple):
    """Output of ``flow_dppo_objective``."""

    #: ``M_i * (-A_i * ratio_i)`` (0 where masked, selected with ``torch.where``), shape ``(N,)``
    per_element_loss: Tensor
    #: ``M``: True where the element contributes
    keep: Tensor
    #: masked because ``A > 0, ratio > 1, D >= delta``
    masked_pos: Tensor
    #: masked because ``A < 0, ratio < 1, D >= delta``
    masked_neg: Tensor
    #: the reduced scalar loss (see ``normalize``)
    loss: Tensor


def flow_dppo_mask(ratio: Tensor, advantage: Tensor, divergence: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Flow-DPPO's asymmetric trust-region mask, ``(keep, masked_pos, masked_neg)``, no gradient.

    ::

        masked_pos = (A > 0) & (ratio > 1) & (D >= delta)    # pushing further up a step that moved too far
        masked_neg = (A < 0) & (ratio < 1) & (D >= delta)    # pushing further down a step that moved too far
        keep (M)   = ~(masked_pos | masked_neg)

    Steps under the threshold always pass (no clipping at all) and corrective moves
    (A > 0 with ratio < 1, A < 0 with ratio > 1) always pass. ``threshold = inf`` keeps everything.
    """
    _same_shape(ratio=ratio, advantage=advantage, divergence=divergence)
    threshold = check_nonnegative("threshold", threshold)
    with torch.no_grad():
        ratio = ratio.detach()
        far = divergence.detach() >= threshold
        masked_pos = (advantage > 0) & (ratio > 1.0) & far
        masked_neg = (advantage < 0) & (ratio < 1.0) & far
        keep = ~(masked_pos | masked_neg)
    return keep, masked_pos, masked_neg


def flow_dppo_objective(
    ratio: Tensor,
    advantage: Tensor,
    divergence: Tensor,
    threshold: float,
    normalize: Literal["all", "kept"] = "all",
) -> FlowDPPOTerms:
    """Flow-DPPO's masked importance-weighted objective (to be minimised).

    ::

        L = sum_i M_i * (-A_i * ratio_i) / Z,   Z = N (normalize="all", the reference code)
                                                 or max(sum_i M_i, 1) (normalize="kept")

    with ``M = flow_dppo_mask(ratio, advantage, divergence, threshold)[0]``. No clipping: a kept
    element's gradient is exactly ``-A_i * ratio_i * grad logp_new_i / Z``, a masked one's is
    exactly 0. Masking selects with ``torch.where`` before anything is multiplied, so an
    overflowing (``inf``) ratio that is masked, or whose advantage is 0, gives a finite loss;
    build ``ratio`` with ``importance_ratio(log_ratio, keep)`` for a NaN-free backward too.
    """
    if normalize not in ("all", "kept"):
        raise ValueError(f"normalize must be 'all' or 'kept'; got {normalize!r}")
    keep, masked_pos, masked_neg = flow_dppo_mask(ratio, advantage, divergence, threshold)
    advantage = advantage.to(ratio.dtype)
    contributes = keep & (advantage != 0)
    per_element = torch.where(contributes, -advantage * ratio, torch.zeros_like(ratio))
    if normalize == "all":
        denominator = max(per_element.numel(), 1)
    else:
        denominator = keep.sum().clamp(min=1).to(per_element.dtype)
    loss = per_element.sum() / denominator
    return FlowDPPOTerms(per_element, keep, masked_pos, masked_neg, loss)
