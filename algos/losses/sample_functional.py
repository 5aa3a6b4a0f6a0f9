"""The maths of the per-sample (forward-process) losses: DiffusionNFT and AWM, as plain functions.

Conventions (docs/maths.md#conventions): the rollout gives clean samples ``x0``; a trained
(sample, timestep) pair draws fresh noise ``eps`` and noises the sample along the rectified-flow
forward process at the noise level ``t`` (a sigma of the sampling schedule)::

    x_t = (1 - t) * x0 + t * eps          the model's velocity target is  eps - x0

Every reduction over latent dimensions is a MEAN (as in both official code bases); batch shapes are
``(R, ...)`` for R (sample, timestep) rows and ``(R,)`` per-row values. Nothing here reads a
tensordict or a model; ``algos.losses.diffusion_nft`` and ``algos.losses.awm`` call these.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AWM_WEIGHTINGS",
    "NFTTerms",
    "awm_log_prob",
    "clip_scale_advantage",
    "mean_dims",
    "nft_objective",
    "nft_optimality",
    "noisy_sample",
    "random_step_subset",
    "soft_update_decay",
    "stratified_step_indices",
]

AWMWeighting = Literal["ghuber", "huber", "uniform", "t", "t2"]
#: the surrogate log-probability weightings of the AWM code (``compute_log_prob_awm``)
AWM_WEIGHTINGS: tuple[str, ...] = ("ghuber", "huber", "uniform", "t", "t2")

#: the constant the AWM code adds inside its (generalised) Huber root, so that d/dx is finite at 0
_HUBER_EPS = 1e-10


def mean_dims(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(R, ...) -> (R,)``."""
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def _per_row(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (R,) reshaped to broadcast against ``like`` (R, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noisy_sample(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The forward process ``x_t = (1 - t) * x0 + t * eps`` per row (``sigma``: (R,), float32)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape; got {tuple(x0.shape)} and {tuple(noise.shape)}")
    t = _per_row(sigma, x0)
    return (1.0 - t) * x0 + t * noise


# --------------------------------------------------------------------------- advantages
def clip_scale_advantage(advantage: Tensor, clip: float, scale: float = 1.0) -> Tensor:
    """``clamp(A, -clip, clip) / clip * scale``: AWM's ``advantage_max`` rescaling (scale 1 maps to [-1, 1])."""
    return advantage.clamp(-clip, clip) / clip * scale


def nft_optimality(advantage: Tensor, clip: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability ``r = clamp(clamp(A, -c, c) / c / 2 + 0.5, 0, 1)``.

    With ``c = 5`` (the official ``adv_clip_max``) this is ``clamp(A, -5, 5) / 10 + 0.5``: A = 0
    gives 0.5 (positive and negative branches weighted alike), A >= 5 gives 1 (positive only).
    """
    return (advantage.clamp(-clip, clip) / clip / 2.0 + 0.5).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- DiffusionNFT
class NFTTerms(NamedTuple):
    """Output of ``nft_objective``."""

    #: ``(r * L_pos + (1 - r) * L_neg) / b`` per row, (R,), with gradient
    per_row: Tensor
    #: ``L_pos`` and ``L_neg`` per row, (R,), with gradient
    positive: Tensor
    negative: Tensor


def nft_objective(
    velocity: Tensor,
    velocity_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor,
    optimality: Tensor,
    strength: float,
    weight_floor: float = 1e-5,
) -> NFTTerms:
    """DiffusionNFT's negative-aware fine-tuning loss per (sample, timestep) row, to be minimised.

    With ``v`` the trained velocity (gradient), ``v_old`` the old policy's (no gradient), the
    strength ``b`` and the optimality probability ``r`` (``nft_optimality``)::

        v_pos  = b * v + (1 - b) * v_old              implicit positive policy
        v_neg  = (1 + b) * v_old - b * v              implicit negative policy (mirror of v_pos about v_old)
        x0_pos = x_t - t * v_pos,   x0_neg = x_t - t * v_neg        predicted clean samples
        L_pos  = mean_dims((x0_pos - x0)^2) / sg(max(mean_dims|x0_pos - x0|, floor))   (L_neg alike)
        per_row = (r * L_pos + (1 - r) * L_neg) / b

    The adaptive weight ``1 / mean|x0_hat - x0|`` is computed in float64 without gradient and
    floored at ``weight_floor`` (1e-5 in the official code), as in NVlabs/DiffusionNFT's
    ``train_nft_sd3.py``. The official loss is ``mean(per_row) * adv_clip_max`` (x 5); the caller
    applies that factor.
    """
    if not strength > 0 or math.isinf(strength):
        raise ValueError(f"strength must be a finite number > 0; got {strength!r}")
    t = _per_row(sigma, x_t)
    velocity_old = velocity_old.detach()
    v_pos = strength * velocity + (1.0 - strength) * velocity_old
    v_neg = (1.0 + strength) * velocity_old - strength * velocity

    def adaptive(x0_hat: Tensor) -> Tensor:
        with torch.no_grad():  # the official weight: float64, detached, floored
            weight = mean_dims((x0_hat.double() - x0.double()).abs()).clamp(min=weight_floor)
        return (mean_dims((x0_hat - x0) ** 2).double() / weight).to(torch.float32)

    positive = adaptive(x_t - t * v_pos)
    negative = adaptive(x_t - t * v_neg)
    r = optimality.to(positive.dtype)
    per_row = (r * positive + (1.0 - r) * negative) / strength
    return NFTTerms(per_row, positive, negative)


# --------------------------------------------------------------------------- AWM
def awm_log_prob(
    velocity: Tensor,
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    weighting: AWMWeighting = "ghuber",
    power: float = 0.25,
) -> Tensor:
    """AWM's surrogate log-probability per (sample, timestep) row, float64, shape (R,).

    With the flow-matching error ``e = mean_dims((v - (eps - x0))^2)`` (computed in float64, as
    the official ``compute_log_prob_awm``)::

        "uniform":  l = -e
        "t":        l = -e * t
        "t2":       l = -e * t^2
        "huber":    l = -(sqrt(e + 1e-10) - 1e-5) * t
        "ghuber":   l = -((e + 1e-10)^p - (1e-10)^p) * t / p       generalised Huber, power p (0.25)

    "ghuber" with p = 0.5 is 2x "huber"; all are 0 at e = 0 (up to float rounding) and decrease
    in e, so maximising l is flow matching toward the sample. Its gradient in e is
    ``t * (e + 1e-10)^(p - 1)``: large errors are down-weighted (robust regression).
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(AWM_WEIGHTINGS)}; got {weighting!r}")
    target = noise.double() - x0.double()
    error = mean_dims((velocity.double() - target) ** 2)
    t = sigma.reshape(-1).double()
    if weighting == "uniform":
        return -error
    if weighting == "t":
        return -error * t
    if weighting == "t2":
        return -error * t**2
    if weighting == "huber":
        return -(torch.sqrt(error + _HUBER_EPS) - math.sqrt(_HUBER_EPS)) * t
    if not power > 0:
        raise ValueError(f"the generalised-Huber power must be > 0; got {power!r}")
    return -(torch.pow(error + _HUBER_EPS, power) - _HUBER_EPS**power) * t / power


# --------------------------------------------------------------------------- timesteps and schedules
def random_step_subset(num_samples: int, num_steps: int, num_trained: int, generator: torch.Generator) -> Tensor:
    """DiffusionNFT's timesteps: per sample a random permutation of the K sampling steps, the first T kept.

    Returns ``(num_samples, num_trained)`` long indices into the rollout's schedule, distinct within
    a row (T <= K). The official code keeps ``int(K * timestep_fraction)`` steps (0.99: K - 1 of K).
    """
    if not 1 <= num_trained <= num_steps:
        raise ValueError(f"cannot train {num_trained} distinct timesteps of a {num_steps}-step schedule")
    keys = torch.rand((num_samples, num_steps), generator=generator)
    return keys.argsort(dim=1)[:, :num_trained]


def stratified_step_indices(
    num_samples: int, num_steps: int, num_trained: int, fraction: float, skip_first: bool, generator: torch.Generator
) -> Tensor:
    """AWM's "discrete" timesteps: one step index drawn uniformly in each of T equal bins.

    The bins split the step indices ``[lo, hi)`` with ``lo = 1`` (``skip_first``: the official
    default "discrete_wo_init" never trains the pure-noise step) or 0 and
    ``hi = int(K * fraction)`` (0.9 in the recipes): boundaries ``linspace(lo, hi, T + 1)`` rounded
    down, index ``lower + floor(u * (upper - lower))`` with ``u ~ U[0, 1)``; an empty bin gives its
    lower bound (bins may then repeat an index, as in the official code). The official code draws
    one index per bin for a whole micro-batch; here every sample draws its own.

    Returns ``(num_samples, num_trained)`` long indices, all in ``[0, K)``.
    """
    lo = 1 if skip_first else 0
    hi = int(num_steps * fraction)
    if hi <= lo:
        raise ValueError(
            f"timestep_fraction={fraction} of a {num_steps}-step schedule leaves no step index in [{lo}, {hi}); "
            "use more sampling steps, a larger fraction, or skip_first_step=False"
        )
    bounds = torch.linspace(lo, hi, num_trained + 1).long()
    lower, upper = bounds[:-1], bounds[1:]
    u = torch.rand((num_samples, num_trained), generator=generator)
    index = lower + (u * (upper - lower)).long()
    return index.clamp(max=num_steps - 1)


def soft_update_decay(num_updates: int, rate: float, maximum: float, flat: int = 0) -> float:
    """Decay of a soft parameter copy after ``num_updates`` optimiser steps: ``copy = d * copy + (1 - d) * live``.

    ``d = 0`` for the first ``flat`` steps, then ``min(rate * (num_updates - flat), maximum)``:
    DiffusionNFT's ``return_decay`` (decay_type 1: rate 0.001, max 0.5, flat 0; decay_type 2: rate
    0.0075, max 0.999, flat 75) and AWM's linear EMA decay (rate 0.001, max 0.3). Both official
    codes count gradient steps, which is the number of rollouts at one step per rollout.
    """
    if num_updates < flat:
        return 0.0
    return float(min(rate * (num_updates - flat), maximum))
