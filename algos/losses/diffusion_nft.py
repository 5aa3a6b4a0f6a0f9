"""DiffusionNFT (NVlabs): negative-aware fine-tuning on the forward process, likelihood-free.

Sample with the old policy (the ODE by default), keep only each sample's clean ``x0``, and train on
FRESH noise at the sampling timesteps. Per (sample, timestep) row, ``x_t = (1 - t) x0 + t eps``,
``v`` the trained velocity at ``x_t``, ``v_old`` the old policy's (no gradient), strength ``b``::

    r      = clamp(clamp(A, -c, c) / c / 2 + 0.5, 0, 1)              c = advantage_clip = 5: clamp(A,-5,5)/10 + 0.5
    v_pos  = b v + (1 - b) v_old,       v_neg = (1 + b) v_old - b v
    x0_pos = x_t - t v_pos,             x0_neg = x_t - t v_neg
    L_pos  = mean_dims((x0_pos - x0)^2) / sg(max(mean_dims|x0_pos - x0|, 1e-5))   (L_neg alike)
    L      = c * mean_rows((r L_pos + (1 - r) L_neg) / b)  +  beta * mean_rows(mean_dims((v - v_ref)^2))

``mean_rows`` averages over the samples and their T trained timesteps (the official code averages
each timestep's batch and accumulates gradients over the T timesteps). The old policy is a soft copy
of the trained weights, moved after every rollout: ``old = d * old + (1 - d) * live`` with
``d = min(0.001 * steps, 0.5)`` (``steps``: optimiser steps so far; one per rollout in the recipe).
No ratio and no clipping: proximity comes from ``b`` and the slowly moving old policy.

Read from NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` and ``config/nft.py`` (re-implemented):
``train.beta = 1e-4`` (our ``beta``), ``config.beta = 1`` (our ``strength``; 0.1 for OCR and
multi-reward), ``decay_type = 1`` (rate 0.001, max 0.5; OCR: type 2, flat 75, rate 0.0075, max
0.999), ``timestep_fraction = 0.99`` (T = int(0.99 K): K - 1 of the K sampling timesteps, a random
subset per sample), ``adv_clip_max = 5``, lr 3e-4, one gradient step per rollout, global-std
advantages, rollouts from the old adapter with a deterministic solver, CFG-free (guidance 1).

With ``b = 1`` and ``r = 1`` the loss is ``c * mean(t * mse / mae)`` with ``mse, mae`` the mean
squared / absolute flow-matching error ``v - (eps - x0)``: an adaptively weighted flow-matching
regression toward the policy's own samples (``tests/test_loss_diffusion_nft.py``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from algos.losses.base import register_loss
from algos.losses.sample_base import SampleBatch, SampleLoss
from algos.losses.sample_functional import mean_dims, nft_objective, nft_optimality, random_step_subset

__all__ = ["DiffusionNFTLoss"]


@register_loss("diffusion_nft")
class DiffusionNFTLoss(SampleLoss):
    """DiffusionNFT's loss (see the module docstring).

    Args:
        policy: the ``FlowPolicy`` being trained (ODE sampling by default, ``policy_defaults``).
        strength: ``b`` > 0, how far the implicit positive / negative policies move from the old
            one (1.0; 0.1 in the OCR and multi-reward recipes).
        beta: weight of ``mean(mean_dims((v - v_ref)^2))`` (1e-4).
        advantage_clip: ``c``: advantages are clamped to [-c, c] for ``r``, and the loss is scaled by
            ``c``, as the official ``adv_clip_max`` does both (5.0).
        timestep_fraction: T = max(1, int(K * fraction)) distinct sampling timesteps per sample,
            a random subset (0.99).
        old_decay_rate, old_decay_max, old_decay_flat: the old policy's decay schedule
            ``d = 0 before flat steps, then min(rate * (steps - flat), max)`` (0.001, 0.5, 0).
        sample_with_old: collect rollouts with the old policy (True, the official code) or with the
            live one.
        weight_floor: floor of the adaptive weight's denominator (1e-5).
        log_ref: see ``SampleLoss``.
    """

    extra_diagnostic_keys = ("ref_velocity_mse", "old_velocity_mse", "optimality_mean", "positive_loss", "negative_loss")

    def __init__(
        self,
        policy: nn.Module,
        *,
        strength: float = 1.0,
        beta: float = 1e-4,
        advantage_clip: float = 5.0,
        timestep_fraction: float = 0.99,
        old_decay_rate: float = 0.001,
        old_decay_max: float = 0.5,
        old_decay_flat: int = 0,
        sample_with_old: bool = True,
        weight_floor: float = 1e-5,
        log_ref: bool = False,
    ) -> None:
        super().__init__(policy, beta=beta, log_ref=log_ref)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength > 0 or math.isinf(strength):
            raise ValueError(f"strength must be a finite number > 0 (b = 0 divides by zero); got {strength!r}")
        if not isinstance(advantage_clip, (int, float)) or not advantage_clip > 0 or math.isinf(advantage_clip):
            raise ValueError(f"advantage_clip must be a finite number > 0; got {advantage_clip!r}")
        if not isinstance(timestep_fraction, (int, float)) or not 0 < timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must lie in (0, 1]; got {timestep_fraction!r}")
        if not isinstance(weight_floor, (int, float)) or not weight_floor > 0:
            raise ValueError(f"weight_floor must be a number > 0; got {weight_floor!r}")
        self.strength = float(strength)
        self.advantage_clip = float(advantage_clip)
        self.timestep_fraction = float(timestep_fraction)
        self.sample_with_old = bool(sample_with_old)
        self.weight_floor = float(weight_floor)
        self.add_copy("old", old_decay_rate, old_decay_max, old_decay_flat)

    def num_timesteps(self, num_steps: int) -> int:
        """T, the trained timesteps per sample of a K-step rollout."""
        return max(1, int(num_steps * self.timestep_fraction))

    def timestep_indices(self, num_samples: int, num_steps: int, generator: torch.Generator) -> Tensor:
        return random_step_subset(num_samples, num_steps, self.num_timesteps(num_steps), generator)

    def frozen_velocities(self) -> tuple[str, ...]:
        return ("old", *super().frozen_velocities())

    def sampling(self) -> ContextManager[Any]:
        # the official code samples with the "old" adapter: rollouts come from the slow policy
        return self.copy("old").swapped_in() if self.sample_with_old else contextlib.nullcontext()

    def objective(self, batch: SampleBatch) -> dict[str, Tensor]:
        v_old = batch.frozen["old"]
        r = nft_optimality(batch.advantage, self.advantage_clip)
        terms = nft_objective(batch.velocity, v_old, batch.x_t, batch.x0, batch.sigma, r, self.strength, self.weight_floor)
        return {
            "loss_objective": self.advantage_clip * terms.per_row.mean(),
            "old_velocity_mse": mean_dims((batch.velocity.detach() - v_old) ** 2).mean(),
            "optimality_mean": r.mean(),
            "positive_loss": terms.positive.detach().mean(),
            "negative_loss": terms.negative.detach().mean(),
        }
