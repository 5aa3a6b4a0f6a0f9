"""PPO-clip over denoising steps, DDPO's formulation; the shared clipped-ratio base of GRPO and CPS.

Per trained (sample, step) pair, with ``ratio = exp(logp_new - logp_old)`` (log-probs averaged
over latent dimensions)::

    L = mean_i max(-A_i * ratio_i, -A_i * clamp(ratio_i, 1 - eps, 1 + eps))   [+ beta * KL(new || ref)]

DDPO uses per-prompt running reward statistics for ``A`` (``default_advantage = "per_prompt"``),
``eps = 1e-4`` and no KL term. DDPO clips advantages to [-5, 5]; here the estimators do that
(``algos.advantages``, ``clip=5.0``) and the loss uses the advantage it is given as is. Optionally a learned value baseline replaces the advantage
estimator (see ``PPOClipLoss``). ``step_weighting`` ("none", "tempflow", "guard") weights each
element of the mean (``L = mean_i w_i * max(...)``, see ``algos.losses.base``).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Sequence

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from algos.losses.base import FlowPolicyLoss, PolicyEvaluation, register_loss
from algos.losses.functional import check_nonnegative, importance_ratio, ppo_clip_active, ppo_clip_objective, weighted_mean
from flowgym.td_utils import as_string_list

__all__ = ["ClippedRatioLoss", "PPOClipLoss", "PromptSigmaValue"]


class ClippedRatioLoss(FlowPolicyLoss):
    """PPO's clipped surrogate on the step policy; shared by PPO-clip, Flow-GRPO and Flow-CPS.

    Args:
        policy: the ``FlowPolicy`` being trained.
        clip_range: eps of ``clamp(ratio, 1 - eps, 1 + eps)`` (>= 0).
        **kwargs: ``beta``, ``kl_convention``, ``delta``, ``log_kl_ref``, ``allow_kernel_mismatch``,
            ``step_weighting`` (see ``FlowPolicyLoss``).
    """

    default_clip_range: float = 1e-4
    supports_step_weighting = True

    def __init__(self, policy: nn.Module, *, clip_range: float | None = None, **kwargs: Any) -> None:
        super().__init__(policy, **kwargs)
        self.clip_range = check_nonnegative("clip_range", self.default_clip_range if clip_range is None else clip_range)

    def clipped_objective(self, batch: PolicyEvaluation, advantage: Tensor, log_ratio: Tensor | None = None) -> dict[str, Tensor]:
        """The (step-weighted) mean clipped surrogate and the two clip fractions for ``advantage`` (N,).

        ``log_ratio``: the log-ratio to clip, ``batch.log_ratio`` by default (GRPO-Guard passes
        its normalised one); the clip fractions are those of ``exp(log_ratio)``.
        """
        if log_ratio is None:
            log_ratio, full_ratio = batch.log_ratio, batch.ratio
        else:
            full_ratio = torch.exp(log_ratio.detach())
        with torch.no_grad():
            active = ppo_clip_active(full_ratio, advantage, self.clip_range)
        # cut the gradient (not just the value) where it is zero anyway: NaN-free under ratio overflow
        ratio = importance_ratio(log_ratio, ~active & (advantage != 0))
        terms = ppo_clip_objective(ratio, advantage, self.clip_range)
        return {
            "loss_objective": weighted_mean(terms.per_element_loss, batch.step_weight),
            "clip_frac_high": terms.clipped_high.float().mean(),
            "clip_frac_low": terms.clipped_low.float().mean(),
        }

    def objective(self, batch: PolicyEvaluation) -> dict[str, Tensor]:
        return self.clipped_objective(batch, batch.advantage)


class PromptSigmaValue(nn.Module):
    """A small learned baseline ``V(sigma, prompt)``: an MLP of Fourier features of sigma plus a
    per-prompt bias (prompts hashed with crc32 into ``num_buckets`` learned embeddings).

    It does not look at the latent: it is a per-prompt, per-noise-level baseline (an unbiased
    control variate), not a full critic. Its output is float32, shape ``(N,)``.
    """

    def __init__(self, hidden: int = 32, num_frequencies: int = 4, num_buckets: int = 1024) -> None:
        super().__init__()
        self.num_buckets = int(num_buckets)
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * num_frequencies, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.prompt_bias = nn.Embedding(self.num_buckets, 1)
        nn.init.zeros_(self.prompt_bias.weight)

    def buckets(self, prompts: Sequence[str]) -> Tensor:
        return torch.tensor([zlib.crc32(str(p).encode()) % self.num_buckets for p in prompts], dtype=torch.long)

    def forward(self, sigma: Tensor, prompts: Sequence[str]) -> Tensor:
        device = self.frequencies.device
        s = sigma.reshape(-1, 1).to(device=device, dtype=torch.float32)
        angles = s * self.frequencies
        features = torch.cat([s, torch.sin(angles), torch.cos(angles)], dim=1)
        buckets = self.buckets(prompts).to(device)
        return self.mlp(features).squeeze(1) + self.prompt_bias(buckets).squeeze(1)


def _prompt_list(td: TensorDictBase, key: str) -> list[str]:
    if key not in td.keys():
        raise KeyError(f"the value baseline needs the prompts under {key!r} in the loss input")
    prompts = td.get(key)
    prompts = as_string_list(prompts)
    return [str(p) for p in prompts]


@register_loss("ppo_clip")
class PPOClipLoss(ClippedRatioLoss):
    """DDPO's PPO-clip: per-prompt advantage statistics, clip range 1e-4, no KL by default.

    Args:
        policy: the ``FlowPolicy`` being trained.
        clip_range: 1e-4 by default (DDPO).
        value_baseline: learn ``V(sigma, prompt)`` (``PromptSigmaValue``) and use
            ``A = reward - V`` (V detached) instead of the ``advantage`` entry; V is trained with
            ``loss_value = value_coef * mean((V - reward)^2)``. Off by default. The input must
            then carry the terminal reward of each (sample, step) row under the ``reward`` key
            (shape (N,) or (N, 1)) and the prompts under ``prompt``; the value head's parameters
            are part of ``loss.trainable_parameters()``.
        value_coef: weight of ``loss_value``.
        value_hidden: hidden width of the value MLP.
        **kwargs: see ``FlowPolicyLoss``.
    """

    default_advantage = "per_prompt"
    default_clip_range = 1e-4

    def __init__(
        self,
        policy: nn.Module,
        *,
        clip_range: float | None = None,
        value_baseline: bool = False,
        value_coef: float = 0.5,
        value_hidden: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, clip_range=clip_range, **kwargs)
        self.value_coef = check_nonnegative("value_coef", value_coef, allow_inf=False)
        self.value: PromptSigmaValue | None = None
        if value_baseline:
            device = getattr(getattr(policy, "backend", None), "device", None)
            self.value = PromptSigmaValue(hidden=int(value_hidden)).to(device)
            self.requires_reward = True

    @property
    def loss_keys(self) -> list[str]:
        keys = super().loss_keys
        return [*keys, "loss_value"] if self.value is not None else keys

    def objective(self, batch: PolicyEvaluation) -> dict[str, Tensor]:
        if self.value is None:
            return self.clipped_objective(batch, batch.advantage)
        k = self.tensor_keys
        n = batch.advantage.shape[0]
        if k.reward not in batch.td.keys(include_nested=True):
            raise KeyError(
                f"PPOClipLoss(value_baseline=True) needs the terminal reward of each row under {k.reward!r}"
            )
        reward = batch.td.get(k.reward).detach()
        if reward.numel() != n:
            raise ValueError(f"{k.reward!r} must hold one value per (sample, step), shape ({n},); got {tuple(reward.shape)}")
        reward = reward.reshape(n).to(device=batch.advantage.device, dtype=torch.float32)
        value = self.value(batch.td.get(k.sigma), _prompt_list(batch.td, k.prompt)).to(reward.device)
        out = self.clipped_objective(batch, reward - value.detach())
        out["loss_value"] = self.value_coef * ((value - reward) ** 2).mean()
        return out
