"""Advantage estimators: from terminal rewards of a batch of samples to one advantage per sample.

The formulas: docs/maths.md#advantages.

The terminal reward is the only reward of an episode, so a sample's advantage is broadcast to all
of its trained steps by the trainer. Every estimator in ``ADVANTAGES`` is built by name with
``make_advantage(name, **kwargs)`` and called the same way::

    estimator(rewards_total (B,), reward_terms {name: (B,)}, prompts [B strings], group_ids (B,)) -> (B,)

* ``"group"``      Flow-GRPO: ``(r - mean_group) / (std_batch + eps)``, clipped to [-5, 5];
* ``"group_std"``  the same with each group's own std;
* ``"per_prompt"`` DDPO: per-prompt running statistics (``PerPromptStatTracker``);
* ``"gdpo"``       multi-reward GDPO: each reward normalised within its group, weighted sum,
  the sum normalised over the batch.

Zero-variance groups (every sample of a prompt got the same reward) carry no learning signal:
their advantages are exactly 0 (``zero_std="zero"``, the default); Flow-GRPO drops samples whose
advantage is 0 and a trainer may do the same (``advantages != 0``). Standard deviations are
population ones (``ddof = 0``, numpy's default that the reference code uses). Results are float32
on the rewards' device.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Literal, Mapping, Protocol, Sequence, TypeVar

import torch
from torch import Tensor

from flowgym.registry import Registry

__all__ = [
    "ADVANTAGES",
    "AdvantageEstimator",
    "GDPOAdvantage",
    "GroupAdvantage",
    "GroupStdAdvantage",
    "PerPromptStatTracker",
    "gdpo_advantages",
    "group_relative_advantages",
    "make_advantage",
    "register_advantage",
    "weighted_sum_advantages",
]

ZeroStd = Literal["zero", "formula"]


# --------------------------------------------------------------------------- helpers
def _rewards(rewards: Tensor | Sequence[float], name: str = "rewards") -> Tensor:
    rewards = torch.as_tensor(rewards)
    if rewards.dim() == 2 and rewards.shape[1] == 1:
        rewards = rewards.reshape(-1)
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-d tensor (B,) or (B, 1); got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32)) if rewards.is_floating_point() else rewards.float()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{name} hold NaN or inf values")
    return rewards


def _group_index(group_ids: Tensor | Sequence[int], n: int, device: torch.device) -> tuple[Tensor, int]:
    """``(inverse, num_groups)``: each sample's group as an index in 0 .. num_groups - 1."""
    ids = torch.as_tensor(group_ids, device=device).reshape(-1)
    if ids.numel() != n:
        raise ValueError(f"group_ids must hold one id per sample ({n}); got {ids.numel()}")
    _, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1


def _check_clip_eps(clip: float | None, eps: float) -> None:
    if clip is not None and not (float(clip) > 0):
        raise ValueError(f"clip must be > 0 (or None for no clipping); got {clip!r}")
    if not (float(eps) > 0) or math.isinf(float(eps)):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")


def _check_zero_std(zero_std: str) -> None:
    if zero_std not in ("zero", "formula"):
        raise ValueError(f"zero_std must be 'zero' or 'formula'; got {zero_std!r}")


def _group_stats(values: Tensor, inverse: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(group_mean, group_std, group_is_constant)`` (population std)."""
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    mean = (sums / counts)[inverse]
    sq = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, (values - mean) ** 2)
    std = torch.sqrt(sq / counts)[inverse]
    high = torch.full((num_groups,), -math.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, inverse, values, "amax")
    low = torch.full((num_groups,), math.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, inverse, values, "amin")
    constant = (high == low)[inverse]
    return mean, std, constant


def _finish(advantages: Tensor, clip: float | None) -> Tensor:
    if clip is not None:
        advantages = advantages.clamp(-float(clip), float(clip))
    return advantages.float()


# --------------------------------------------------------------------------- functions
def group_relative_advantages(
    rewards: Tensor | Sequence[float],
    group_ids: Tensor | Sequence[int],
    *,
    std: Literal["global", "group"] = "global",
    clip: float | None = 5.0,
    eps: float = 1e-4,
    zero_std: ZeroStd = "zero",
) -> Tensor:
    """Flow-GRPO's group-relative advantage, one per sample.

    ::

        A_i = clip((r_i - mean_{j in g(i)} r_j) / (s + eps), -clip, clip)

    with ``s = std(r)`` over the whole batch (``std="global"``, Flow-GRPO's default) or
    ``s = std_{j in g(i)} r_j`` (``std="group"``); population std. Samples of a group whose rewards
    are all equal get ``A = 0`` exactly with ``zero_std="zero"`` (default); ``"formula"`` leaves the
    formula's value (0 up to rounding of the mean). ``clip=None`` disables clipping.
    """
    if std not in ("global", "group"):
        raise ValueError(f"std must be 'global' or 'group'; got {std!r}")
    _check_clip_eps(clip, eps)
    _check_zero_std(zero_std)
    r = _rewards(rewards)
    inverse, num_groups = _group_index(group_ids, r.numel(), r.device)
    mean, group_std, constant = _group_stats(r, inverse, num_groups)
    scale = r.std(unbiased=False) if std == "global" else group_std
    advantages = (r - mean) / (scale + eps)
    if zero_std == "zero":
        advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    return _finish(advantages, clip)


def _weighted_total(reward_terms: Mapping[str, Tensor], weights: Mapping[str, float] | None) -> tuple[dict[str, Tensor], dict[str, float]]:
    terms = {name: _rewards(value, f"reward term {name!r}") for name, value in reward_terms.items()}
    if not terms:
        raise ValueError("reward_terms must hold at least one named reward")
    sizes = {name: t.numel() for name, t in terms.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"reward terms must all hold B values; got sizes {sizes}")
    weights = {name: 1.0 for name in terms} if weights is None else {name: float(w) for name, w in weights.items()}
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise ValueError(f"no weight for reward terms {missing}; weights given for {sorted(weights)}")
    return terms, {name: weights[name] for name in terms}


def weighted_sum_advantages(
    reward_terms: Mapping[str, Tensor],
    weights: Mapping[str, float] | None,
    group_ids: Tensor | Sequence[int],
    **kwargs,
) -> Tensor:
    """Multi-reward baseline: ``group_relative_advantages(sum_k w_k r_k, group_ids, **kwargs)``.

    ``weights=None`` weighs every term 1. Terms absent from ``weights`` raise ``ValueError``;
    extra weights (for rewards not in ``reward_terms``) are ignored.
    """
    terms, weights = _weighted_total(reward_terms, weights)
    total = sum(weights[name] * term for name, term in terms.items())
    return group_relative_advantages(total, group_ids, **kwargs)


def gdpo_advantages(
    reward_terms: Mapping[str, Tensor],
    weights: Mapping[str, float] | None,
    group_ids: Tensor | Sequence[int],
    *,
    eps: float = 1e-4,
    clip: float | None = 5.0,
    zero_std: ZeroStd = "zero",
) -> Tensor:
    """GDPO's decoupled multi-reward advantage.

    ::

        a_k,i = (r_k,i - mean_{g(i)} r_k) / (std_{g(i)} r_k + eps)     each reward within its group
        s_i   = sum_k w_k * a_k,i                                        (a_k,i = 0 in groups where r_k is constant)
        A_i   = clip((s_i - mean(s)) / (std(s) + eps), -clip, clip)     the sum over the whole batch

    Normalising each reward separately keeps a reward with a large scale from drowning the
    others. Samples of groups whose weighted sum ``s`` is constant get ``A = 0`` with
    ``zero_std="zero"`` (default). ``weights=None`` weighs every term 1.
    """
    _check_clip_eps(clip, eps)
    _check_zero_std(zero_std)
    terms, weights = _weighted_total(reward_terms, weights)
    first = next(iter(terms.values()))
    inverse, num_groups = _group_index(group_ids, first.numel(), first.device)
    total = torch.zeros_like(first)
    for name, r in terms.items():
        mean, std, constant = _group_stats(r, inverse, num_groups)
        normalised = (r - mean) / (std + eps)
        if zero_std == "zero":
            normalised = torch.where(constant, torch.zeros_like(normalised), normalised)
        total = total + weights[name] * normalised
    advantages = (total - total.mean()) / (total.std(unbiased=False) + eps)
    if zero_std == "zero":
        _, _, constant = _group_stats(total, inverse, num_groups)
        advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    return _finish(advantages, clip)


# --------------------------------------------------------------------------- per-prompt statistics (DDPO)
class PerPromptStatTracker:
    """DDPO's per-prompt running reward statistics.

    Each prompt keeps a buffer of its most recent ``buffer_size`` rewards (None: unbounded). On
    ``update(prompts, rewards)`` the batch's rewards are appended to their prompts' buffers first;
    then a prompt whose buffer holds at least ``min_count`` rewards is normalised with the
    buffer's mean and std, and one with fewer with the mean and std of the whole current batch::

        A_i = clip((r_i - mean) / (std + eps), -clip, clip)

    (population std; ``eps = 1e-6`` as DDPO; ``clip = 5`` is DDPO's advantage clip, which DDPO
    applies in its loss). ``reset()`` empties every buffer (Flow-GRPO resets each epoch). It is
    also an advantage estimator: ``tracker(rewards_total, reward_terms, prompts, group_ids)``;
    ``state_dict()`` / ``load_state_dict()`` checkpoint its buffers.
    """

    #: needs no group of samples per prompt (the trainer may use group_size 1)
    group_relative = False

    def __init__(self, buffer_size: int | None = 16, min_count: int = 16, *, eps: float = 1e-6, clip: float | None = 5.0) -> None:
        if buffer_size is not None and (not isinstance(buffer_size, int) or buffer_size < 1):
            raise ValueError(f"buffer_size must be an integer >= 1 or None (unbounded); got {buffer_size!r}")
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1; got {min_count!r}")
        if buffer_size is not None and min_count > buffer_size:
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}): per-prompt statistics would never be used"
            )
        _check_clip_eps(clip, eps)
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = float(eps)
        self.clip = clip
        self.buffers: dict[str, deque[float]] = {}

    def reset(self) -> None:
        """Forget every prompt's history."""
        self.buffers.clear()

    def state_dict(self) -> dict[str, list[float]]:
        """The buffers, ``{prompt: [recent rewards, oldest first]}`` (plain Python, JSON-safe)."""
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, Sequence[float]]) -> None:
        """Restore buffers saved by ``state_dict`` (keeping at most ``buffer_size`` per prompt)."""
        self.buffers = {str(p): deque((float(v) for v in values), maxlen=self.buffer_size) for p, values in state.items()}

    def stats(self) -> dict[str, tuple[float, float, int]]:
        """``{prompt: (mean, std, count)}`` of the current buffers."""
        out = {}
        for prompt, buffer in self.buffers.items():
            values = torch.tensor(list(buffer), dtype=torch.float64)
            out[prompt] = (float(values.mean()), float(values.std(unbiased=False)), len(buffer))
        return out

    def update(self, prompts: Sequence[str], rewards: Tensor | Sequence[float]) -> Tensor:
        """Append the batch to the buffers and return its advantages (B,)."""
        r = _rewards(rewards)
        prompts = [str(p) for p in prompts]
        if len(prompts) != r.numel():
            raise ValueError(f"got {len(prompts)} prompts for {r.numel()} rewards")
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        advantages = torch.empty_like(r)
        for prompt in dict.fromkeys(prompts):
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=r.device)
            values = r[index]
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values.detach().cpu().double().tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer), dtype=torch.float64)
                mean = history.mean().to(r.device, r.dtype)
                std = history.std(unbiased=False).to(r.device, r.dtype)
            advantages[index] = (values - mean) / (std + self.eps)
        return _finish(advantages, self.clip)

    def __call__(self, rewards_total: Tensor, reward_terms: Mapping[str, Tensor], prompts: Sequence[str], group_ids: Tensor) -> Tensor:
        return self.update(prompts, rewards_total)


# --------------------------------------------------------------------------- the estimator interface
class AdvantageEstimator(Protocol):
    """``estimator(rewards_total (B,), reward_terms {name: (B,)}, prompts, group_ids (B,)) -> (B,)``."""

    def __call__(self, rewards_total: Tensor, reward_terms: Mapping[str, Tensor], prompts: Sequence[str], group_ids: Tensor) -> Tensor: ...


#: advantage estimators by name; ``@register_advantage("name")`` adds one
ADVANTAGES: Registry[Callable[..., AdvantageEstimator]] = Registry("advantage estimator")
_T = TypeVar("_T")


def register_advantage(name: str) -> Callable[[_T], _T]:
    """Decorator registering an estimator factory (a class whose instances follow ``AdvantageEstimator``)."""
    return ADVANTAGES.register(name)


def make_advantage(name: str, **kwargs) -> AdvantageEstimator:
    """Build the estimator registered as ``name`` (one of ``ADVANTAGES``) with its keyword arguments."""
    return ADVANTAGES.lookup(name)(**kwargs)


@register_advantage("group")
class GroupAdvantage:
    """``group_relative_advantages`` of the weighted reward total (global std by default)."""

    default_std: str = "global"
    #: needs several samples per prompt (group_size >= 2) to be meaningful
    group_relative = True

    def __init__(self, *, std: Literal["global", "group"] | None = None, clip: float | None = 5.0, eps: float = 1e-4, zero_std: ZeroStd = "zero") -> None:
        self.kwargs = dict(std=std or self.default_std, clip=clip, eps=eps, zero_std=zero_std)
        group_relative_advantages(torch.zeros(1), torch.zeros(1), **self.kwargs)  # validate now

    def __call__(self, rewards_total: Tensor, reward_terms: Mapping[str, Tensor], prompts: Sequence[str], group_ids: Tensor) -> Tensor:
        return group_relative_advantages(rewards_total, group_ids, **self.kwargs)


@register_advantage("group_std")
class GroupStdAdvantage(GroupAdvantage):
    """``group_relative_advantages`` with each group's own std."""

    default_std = "group"


register_advantage("per_prompt")(PerPromptStatTracker)


@register_advantage("gdpo")
class GDPOAdvantage:
    """``gdpo_advantages`` of the reward terms; ``weights=None`` weighs every term 1 (pass the
    reward composer's weights to match the environment's total)."""

    group_relative = True

    def __init__(self, *, weights: Mapping[str, float] | None = None, eps: float = 1e-4, clip: float | None = 5.0, zero_std: ZeroStd = "zero") -> None:
        _check_clip_eps(clip, eps)
        _check_zero_std(zero_std)
        self.weights = None if weights is None else dict(weights)
        self.kwargs = dict(eps=eps, clip=clip, zero_std=zero_std)

    def __call__(self, rewards_total: Tensor, reward_terms: Mapping[str, Tensor], prompts: Sequence[str], group_ids: Tensor) -> Tensor:
        return gdpo_advantages(reward_terms, self.weights, group_ids, **self.kwargs)
