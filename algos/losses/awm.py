"""AWM, advantage weighted matching: PPO-clip on a flow-matching surrogate log-probability.

Per trained (sample, timestep) row, on fresh noise ``eps`` stored once per rollout and
``x_t = (1 - t) x0 + t eps``, with ``e = mean_dims((v_theta(x_t, t) - (eps - x0))^2)``::

    l      = -((e + 1e-10)^p - (1e-10)^p) * t / p            generalised Huber, p = 0.25 (weighting="ghuber")
    l_old  = the same with the policy before this rollout's updates, at the same x_t and eps
    A'     = clamp(A, -5, 5) / 5 * advantage_max              (advantage_max = 1: A' in [-1, 1])
    ratio  = exp(l - l_old)                        per row            (ratio_type="exp_first", default)
           = exp(mean_t l - mean_t l_old)          per sample         (ratio_type="sum_first", GSPO-like)
    L      = mean(max(-A' ratio, -A' clamp(ratio, 1 - eps, 1 + eps)))
             + beta * mean(mean_dims((v - v_ref)^2)) + ema_beta * mean(mean_dims((v - v_ema)^2))

The EMA copy of the trained weights is moved after every rollout, ``ema = d * ema + (1 - d) * live``
with ``d = min(0.001 * steps, 0.3)`` (``steps``: optimiser steps so far). ``l_old`` is computed once
per rollout by ``prepare`` (no gradient, pre-update weights), so the ratio moves only from the
second optimiser step of a rollout on: with one step per rollout (the official on-policy recipe,
which accumulates every micro-batch into one step) the clip never acts and the loss's gradient is
``-A' grad l``; proximity then comes from the EMA and reference penalties.

Read from scxue/advantage_weighted_matching ``scripts/train_sd3_awm.py`` and ``config/dgx_awm.py``
(re-implemented): ``compute_log_prob_awm`` (weightings "Uniform", "t", "t**2", "huber", "ghuber";
float64), ``loss_type`` exp_first / sum_first, ``clip_range = 1``, ``beta = 1e-3`` (GenEval; 3e-3
OCR, 1e-4 PickScore), ``ema_beta = 1``, ``kl_ema_decay = 0.3`` linear at 0.001 per step,
``train_timesteps = 6``, ``time_type = "discrete_wo_init"`` with ``timestep_fraction = 0.9``,
``advantage_max = 1``, lr 3e-4, global-std advantages, on-policy, CFG-free training. Not
implemented: the continuous time samplers ("uniform", "logit_normal"), the "ELBO" KL weighting,
off-policy sampling from the EMA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Literal

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from algos.losses.base import register_loss
from algos.losses.functional import approx_kl, check_nonnegative, importance_ratio, ppo_clip_active, ppo_clip_objective
from algos.losses.sample_base import SampleBatch, SampleLoss
from algos.losses.sample_functional import (
    AWM_WEIGHTINGS,
    AWMWeighting,
    awm_log_prob,
    clip_scale_advantage,
    mean_dims,
    stratified_step_indices,
)

__all__ = ["AWMLoss"]

RATIO_TYPES = ("exp_first", "sum_first")


@register_loss("awm")
class AWMLoss(SampleLoss):
    """AWM's loss (see the module docstring).

    Args:
        policy: the ``FlowPolicy`` being trained (ODE sampling by default, ``policy_defaults``).
        clip_range: eps of ``clamp(ratio, 1 - eps, 1 + eps)`` (1.0: ratio in [0, 2]).
        ratio_type: ``"exp_first"`` (a ratio per (sample, timestep), default) or ``"sum_first"``
            (one ratio per sample from the mean over its timesteps).
        weighting: the surrogate log-prob, ``"ghuber"`` (default), ``"huber"``, ``"uniform"``, ``"t"``,
            ``"t2"`` (``sample_functional.awm_log_prob``).
        ghuber_power: p of "ghuber" (0.25).
        beta: weight of the reference penalty ``mean(mean_dims((v - v_ref)^2))`` (1e-3).
        ema_beta: weight of the EMA penalty ``mean(mean_dims((v - v_ema)^2))`` (1.0; 0 drops the EMA).
        ema_decay_rate, ema_decay_max, ema_decay_flat: the EMA's decay schedule (0.001, 0.3, 0).
        num_timesteps: T, trained timesteps per sample (6).
        timestep_fraction: the trained step indices lie below ``int(K * fraction)`` (0.9).
        skip_first_step: never train step 0, the pure-noise step (True: "discrete_wo_init").
        advantage_clip, advantage_max: ``A' = clamp(A, -clip, clip) / clip * max`` (5.0, 1.0).
        log_ref: see ``SampleLoss``.
    """

    extra_diagnostic_keys = ("ref_velocity_mse", "ema_velocity_mse", "log_prob_mean")

    @dataclass
    class _AcceptedKeys(SampleLoss._AcceptedKeys):
        """``SampleLoss``'s keys and the old surrogate log-prob that ``prepare`` adds."""

        log_prob_old: str = "log_prob_old"

    default_keys = _AcceptedKeys

    def __init__(
        self,
        policy: nn.Module,
        *,
        clip_range: float = 1.0,
        ratio_type: Literal["exp_first", "sum_first"] = "exp_first",
        weighting: AWMWeighting = "ghuber",
        ghuber_power: float = 0.25,
        beta: float = 1e-3,
        ema_beta: float = 1.0,
        ema_decay_rate: float = 0.001,
        ema_decay_max: float = 0.3,
        ema_decay_flat: int = 0,
        num_timesteps: int = 6,
        timestep_fraction: float = 0.9,
        skip_first_step: bool = True,
        advantage_clip: float = 5.0,
        advantage_max: float = 1.0,
        log_ref: bool = False,
    ) -> None:
        super().__init__(policy, beta=beta, log_ref=log_ref)
        self.clip_range = check_nonnegative("clip_range", clip_range)
        if ratio_type not in RATIO_TYPES:
            raise ValueError(f"ratio_type must be one of {list(RATIO_TYPES)}; got {ratio_type!r}")
        if weighting not in AWM_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(AWM_WEIGHTINGS)}; got {weighting!r}")
        if not isinstance(ghuber_power, (int, float)) or not ghuber_power > 0 or math.isinf(ghuber_power):
            raise ValueError(f"ghuber_power must be a finite number > 0; got {ghuber_power!r}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1; got {num_timesteps!r}")
        if not isinstance(timestep_fraction, (int, float)) or not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must lie in (0, 1]; got {timestep_fraction!r}")
        if not isinstance(advantage_clip, (int, float)) or not advantage_clip > 0 or math.isinf(advantage_clip):
            raise ValueError(f"advantage_clip must be a finite number > 0; got {advantage_clip!r}")
        self.ratio_type = ratio_type
        self.weighting = weighting
        self.ghuber_power = float(ghuber_power)
        self.ema_beta = check_nonnegative("ema_beta", ema_beta, allow_inf=False)
        self.num_timesteps = num_timesteps
        self.timestep_fraction = float(timestep_fraction)
        self.skip_first_step = bool(skip_first_step)
        self.advantage_clip = float(advantage_clip)
        self.advantage_max = check_nonnegative("advantage_max", advantage_max, allow_inf=False)
        if self.ema_beta > 0:
            self.add_copy("ema", ema_decay_rate, ema_decay_max, ema_decay_flat)

    # ------------------------------------------------------------------ the training batch
    def timestep_indices(self, num_samples: int, num_steps: int, generator: torch.Generator) -> Tensor:
        return stratified_step_indices(num_samples, num_steps, self.num_timesteps, self.timestep_fraction, self.skip_first_step, generator)

    def frozen_velocities(self) -> tuple[str, ...]:
        return (*(("ema",) if self.ema_beta > 0 else ()), *super().frozen_velocities())

    def log_prob(self, velocity: Tensor, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """The surrogate ``l`` per row, float64 (``sample_functional.awm_log_prob``)."""
        return awm_log_prob(velocity, x0, noise, sigma, self.weighting, self.ghuber_power)

    @torch.no_grad()
    def precompute(self, samples: TensorDictBase, chunk_size: int, autocast: Callable[[], ContextManager[Any]]) -> None:
        """``log_prob_old`` (N, T): ``l`` under the pre-update policy at the stored x_t and eps."""
        k = self.tensor_keys
        n, T = samples.get(k.sigma).shape
        old = []
        for start in range(0, n, chunk_size):
            chunk = samples[start : start + chunk_size]
            x0, noise, sigma, x_t, cond, m, _ = self.rows(chunk)
            with autocast():
                velocity = self._velocity(x_t, sigma, cond)
            old.append(self.log_prob(velocity, x0, noise, sigma).reshape(m, T))
        samples.set(k.log_prob_old, torch.cat(old).to(samples.get(k.sigma).device))

    @property
    def in_keys(self) -> list[str]:
        return [*super().in_keys, self.tensor_keys.log_prob_old]

    # ------------------------------------------------------------------ the objective
    def objective(self, batch: SampleBatch) -> dict[str, Tensor]:
        k = self.tensor_keys
        if k.log_prob_old not in batch.td.keys(include_nested=True):
            raise KeyError(f"AWMLoss needs {k.log_prob_old!r} from loss.prepare(samples, generator=...)")
        n, T = batch.num_samples, batch.num_timesteps
        logp = self.log_prob(batch.velocity, batch.x0, batch.noise, batch.sigma)  # (R,) float64
        logp_old = batch.td.get(k.log_prob_old).detach().to(device=logp.device, dtype=logp.dtype).reshape(n * T)
        if self.ratio_type == "exp_first":
            log_ratio = logp - logp_old
            advantage = batch.advantage
        else:  # one ratio per sample: the mean over its timesteps, GSPO's sequence-level ratio
            log_ratio = logp.reshape(n, T).mean(dim=1) - logp_old.reshape(n, T).mean(dim=1)
            advantage = batch.sample_advantage
        advantage = clip_scale_advantage(advantage, self.advantage_clip, self.advantage_max).to(log_ratio.dtype)
        with torch.no_grad():
            active = ppo_clip_active(torch.exp(log_ratio.detach()), advantage, self.clip_range)
        # no gradient enters exp() where the clipped branch is active: finite even under ratio overflow
        ratio = importance_ratio(log_ratio, ~active & (advantage != 0))
        per_element, high, low = ppo_clip_objective(ratio, advantage, self.clip_range)
        out: dict[str, Tensor] = {"loss_objective": per_element.mean().float()}
        detached = ratio.detach()
        out.update(
            ratio_mean=detached.mean(), ratio_min=detached.min(), ratio_max=detached.max(),
            approx_kl=approx_kl(log_ratio.detach()),
            clip_frac_high=high.float().mean(), clip_frac_low=low.float().mean(),
            log_prob_mean=logp.detach().mean(),
        )
        if self.ema_beta > 0:
            ema_mse = mean_dims((batch.velocity - batch.frozen["ema"]) ** 2)
            out["loss_ema"] = self.ema_beta * ema_mse.mean()
            out["ema_velocity_mse"] = ema_mse.detach().mean()
        return out

    @property
    def loss_keys(self) -> list[str]:
        return [*super().loss_keys, *(("loss_ema",) if self.ema_beta > 0 else ())]
