"""Pure tensor maths of the policy-gradient objectives: ratios, divergences, clipped and masked losses.

Every objective here, with its published defaults, is written out in docs/maths.md#losses.

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
* Per-step quantities of the Flow-SDE step ``N(mu, s_t^2 I)``: ``dt = sigma_next - sigma < 0``,
  ``sqrt(-dt) = sqrt(sigma - sigma_next)``, ``s_t = scale = sigma_t * sqrt(-dt)`` (the rollout's
  ``scale`` entry) with the "std factor" ``sigma_t = a * sqrt(sigma / (1 - sigma))`` (Flow-GRPO's
  ``std_dev_t``, see ``flowgym.kernels.flow_sde_coefficients``), recovered as
  ``scale / sqrt(-dt)``. Where a formula takes a batch mean of such a quantity (GRPO-Guard), the
  mean runs over the rows of the same denoising step (``per_step_mean``), as in the reference code,
  whose every loss call holds a single step.
* Ratio overflow: ``exp`` of a large log-ratio is ``inf``. Every objective here selects with
  ``torch.where`` instead of multiplying by a 0/1 mask, so a masked or clipped ``inf`` never
  becomes ``inf * 0 = NaN`` in the forward pass. The backward pass through ``exp`` would still
  compute ``0 * inf`` for those elements; build the ratio with ``importance_ratio(log_ratio,
  keep)`` (``keep`` = the elements that do receive a gradient) to make it NaN-free as well.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

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
    "STEP_WEIGHTINGS",
    "TEMPFLOW_COEFFICIENT",
    "check_step_weighting",
    "sqrt_neg_dt",
    "per_step_mean",
    "step_std_factor",
    "step_weights",
    "weighted_mean",
    "rationorm_scale",
    "rationorm_log_ratio",
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
    weight: Tensor | None = None,
    kept_fraction: Tensor | float | None = None,
) -> FlowDPPOTerms:
    """Flow-DPPO's masked importance-weighted objective (to be minimised).

    ::

        L = sum_i w_i * M_i * (-A_i * ratio_i) / Z,   Z = N (normalize="all", the reference code)
                                                       or max(sum_i M_i, 1) (normalize="kept")

    ``kept_fraction`` (normalize="kept" only): the kept share ``max(K, 1) / R`` of a larger batch that
    this one is part of (a mini-batch split into micro-batches or over processes); then
    ``Z = N * kept_fraction``, so that the parts' losses, each weighted by its share ``N / R`` of the
    rows, sum to the larger batch's ``sum_i w_i M_i (-A_i ratio_i) / max(K, 1)``.

    ``w`` is an optional per-element weight (``step_weights``; ``None``: no multiplication at all,
    ``w_i = 1``); ``per_element_loss`` is returned weighted.

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
    if weight is not None:
        _same_shape(ratio=ratio, weight=weight)
        per_element = per_element * weight.to(per_element.dtype)
    if normalize == "all":
        denominator = max(per_element.numel(), 1)
    elif kept_fraction is None:
        denominator = keep.sum().clamp(min=1).to(per_element.dtype)
    else:
        denominator = torch.as_tensor(kept_fraction, dtype=torch.float64) * per_element.numel()
        denominator = denominator.to(per_element.dtype).to(per_element.device)
    loss = per_element.sum() / denominator
    return FlowDPPOTerms(per_element, keep, masked_pos, masked_neg, loss)


# --------------------------------------------------------------------------- per-step weighting
#: the accepted values of the losses' ``step_weighting`` option
StepWeighting = Literal["none", "tempflow", "guard"]
STEP_WEIGHTINGS: tuple[str, ...] = get_args(StepWeighting)

#: TempFlow-GRPO's noise-aware weight is ``TEMPFLOW_COEFFICIENT * s_t`` (their official code)
TEMPFLOW_COEFFICIENT: float = 2.25


def check_step_weighting(value: object) -> str:
    """Return ``value`` if it is one of ``STEP_WEIGHTINGS``; ``ValueError`` listing them otherwise."""
    if not isinstance(value, str) or value not in STEP_WEIGHTINGS:
        raise ValueError(f"step_weighting must be one of {list(STEP_WEIGHTINGS)}; got {value!r}")
    return value


def _per_row(values: Tensor | float, n: int, name: str, like: Tensor) -> Tensor:
    """``values`` as a float32 ``(n,)`` tensor: one value per row (``(n,)``, ``(n, 1, ..., 1)`` or a scalar)."""
    t = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        return t.expand(n)
    if t.shape[0] != n or t[0].numel() != 1:
        raise ValueError(f"{name} must hold one value per row, shape ({n},) or ({n}, 1, ..., 1); got {tuple(t.shape)}")
    return t.reshape(n)


def sqrt_neg_dt(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """``sqrt(-dt) = sqrt(sigma - sigma_next)`` per row, float32, shape ``(N,)``.

    The Euler-Maruyama noise factor of a step (``dt = sigma_next - sigma < 0``), computed as the
    Flow-SDE kernel computes it (``sqrt(-(sigma_next - sigma))`` in float32), so that
    ``step_std_factor(scale, ...) * sqrt_neg_dt(...)`` gives the rollout's ``scale`` back to
    rounding. ``ValueError`` unless ``sigma_next < sigma`` on every row.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    sigma_next = _per_row(sigma_next, sigma.shape[0], "sigma_next", sigma)
    dt = sigma_next - sigma
    if not bool((dt < 0).all()):
        raise ValueError("sqrt(-dt) needs sigma_next < sigma on every row (a denoising step)")
    return torch.sqrt(-dt)


def per_step_mean(values: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The mean of ``values`` over the rows of the same denoising step, given back per row, ``(N,)``.

    Rows belong to the same step when their ``(sigma, sigma_next)`` pairs are equal. Means are
    accumulated in float64, so a value shared by every row of its step is returned exactly. This is
    the "batch mean" of the reference GRPO-Guard code (whose loss calls each hold one step) applied
    to a mini-batch that mixes steps; with a single step in the batch it is the plain batch mean.
    """
    values = values.reshape(-1)
    n = values.shape[0]
    sigma = _per_row(sigma, n, "sigma", values)
    sigma_next = _per_row(sigma_next, n, "sigma_next", values)
    _, step = torch.unique(torch.stack([sigma, sigma_next], dim=1), dim=0, return_inverse=True)
    num_steps = int(step.max()) + 1 if n else 0
    sums = torch.zeros(num_steps, dtype=torch.float64, device=values.device).index_add_(0, step, values.double())
    counts = torch.bincount(step, minlength=num_steps).to(torch.float64)
    return (sums / counts)[step].to(values.dtype)


def step_std_factor(scale: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The "std factor" ``scale / sqrt(-dt)`` per row, ``(N,)``.

    For the Flow-SDE kernel ``scale = sigma_t * sqrt(-dt)``, so this is ``sigma_t = a * sqrt(sigma /
    (1 - sigma))`` (Flow-GRPO's ``std_dev_t``; Dance-SDE: the constant ``eta``). For CPS, whose std
    ``sigma_next * sin(eta pi / 2)`` does not factor this way, it is defined by the same quotient,
    so that ``std_factor * sqrt(-dt) = scale`` for every kernel.
    """
    root = sqrt_neg_dt(sigma, sigma_next)
    return _per_row(scale, root.shape[0], "scale", root) / root


def step_weights(kind: str, scale: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor | None:
    """Per-row weights of the policy term for ``step_weighting=kind``, float32 ``(N,)``, detached.

    * ``"none"``: ``None`` (the losses then multiply by nothing: bit-identical to no weighting).
    * ``"tempflow"``: TempFlow-GRPO's noise-aware weight ``2.25 * s_t`` with ``s_t`` the step's
      std (``scale = sigma_t * sqrt(-dt)``; for SD3.5's 10-step schedule at a = 0.7 about
      1.7 ... 0.5 over the 9 trained steps).
    * ``"guard"``: GRPO-Guard's gradient re-weighting ``1 / mean(sqrt(-dt))^2``, the mean over the
      rows of the row's step (``per_step_mean``), i.e. ``1 / (sigma - sigma_next)``: it undoes the
      ``|dt|`` that the step mean's dependence on the velocity (``d mu / d v ~ dt``) puts in the
      gradient of a normalised log-ratio.

    The weights multiply the per-element policy loss only, never a KL or value term.
    """
    kind = check_step_weighting(kind)
    if kind == "none":
        return None
    with torch.no_grad():
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        if kind == "tempflow":
            return TEMPFLOW_COEFFICIENT * _per_row(scale, sigma.shape[0], "scale", sigma)
        return 1.0 / per_step_mean(sqrt_neg_dt(sigma, sigma_next), sigma, sigma_next) ** 2


def weighted_mean(per_element: Tensor, weight: Tensor | None) -> Tensor:
    """``mean(per_element)`` when ``weight`` is None (exactly the unweighted loss), else ``mean(weight * per_element)``."""
    if weight is None:
        return per_element.mean()
    _same_shape(per_element=per_element, weight=weight)
    return (per_element * weight.to(per_element.dtype)).mean()


# --------------------------------------------------------------------------- GRPO-Guard's RatioNorm
def rationorm_scale(scale: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """GRPO-Guard's normalising scalar ``S = mean(std factor) * mean(sqrt(-dt))`` per row, ``(N,)``.

    The means are over the rows of the same denoising step (``per_step_mean``): the reference code
    takes them over its loss call's batch, which always holds one step. Every registered kernel's
    std depends on the sigmas only, so the rows of one step share ``sigma_t`` and ``sqrt(-dt)`` and
    ``S = sigma_t * sqrt(-dt) = scale``, the step's std, to rounding.
    """
    std_factor = step_std_factor(scale, sigma, sigma_next)
    return per_step_mean(std_factor, sigma, sigma_next) * per_step_mean(sqrt_neg_dt(sigma, sigma_next), sigma, sigma_next)


def rationorm_log_ratio(
    log_ratio: Tensor, loc_new: Tensor, loc_old: Tensor, norm_scale: Tensor, reduce: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """GRPO-Guard's RatioNorm log-ratio (with gradient through ``log_ratio`` and ``loc_new``), ``(N,)``::

        log r = S * (log_ratio + reduce_dims((loc_new - loc_old)^2) / (2 S^2))

    ``log_ratio = logp_new - logp_old`` reduced over the latent dimensions by ``reduce`` (the same
    reduction is used for the squared mean shift; "mean" is the published scale). Why: with the
    sampled action ``x' = loc_old + s * eps`` and ``d = loc_new - loc_old``,
    ``log_ratio = mean(eps * d) / s - mean(d^2) / (2 s^2)``; the added term removes the negative
    bias and the factor ``S`` the ``1 / s`` blow-up, so for ``S = s``::

        log r = mean_dims(eps * d)

    which has mean 0 under the rollout's noise and a spread (``sqrt(mean(d^2) / D)``) that no
    longer depends on the step's std. ``log r`` is exactly 0 when ``loc_new == loc_old``.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")
    _same_shape(loc_new=loc_new, loc_old=loc_old)
    n = log_ratio.shape[0]
    norm_scale = _per_row(norm_scale, n, "norm_scale", log_ratio).to(log_ratio.dtype)
    diff = loc_new.float() - loc_old.float()
    dims = tuple(range(1, diff.dim()))
    squared = diff.square()
    shift = (squared.mean(dim=dims) if reduce == "mean" else squared.sum(dim=dims)) if dims else squared
    return norm_scale * (log_ratio + shift.to(log_ratio.dtype) / (2.0 * norm_scale**2))
