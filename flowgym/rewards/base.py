"""The reward registry and weighted composition."""

from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from flowgym.registry import Registry

__all__ = ["REWARDS", "Reward", "check_reward_batch", "RewardComposer", "available_rewards", "make_reward", "register_reward"]

def check_reward_batch(images: Tensor, prompts: Sequence[str] | None) -> None:
    """``ValueError`` unless ``images`` is ``(B, C, H, W)`` with at least one channel and pixel, every
    pixel finite, and one prompt per image (``prompts=None``: a prompt-free reward, not checked).

    A reward of an image with NaN or inf pixels is undefined (a classifier's softmax turns it into
    NaN, a clamp or a JPEG encoder into an arbitrary number), so it is an error, not a value. The
    finiteness check costs one device sync per call.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    if 0 in images.shape[1:]:
        raise ValueError(f"images must have at least one channel and one pixel; got shape {tuple(images.shape)}")
    if images.is_floating_point() and images.numel() and not bool(torch.isfinite(images).all()):
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
        kind = " and ".join(w for w, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(images).any()))
        raise ValueError(
            f"images hold {kind} pixels in {int(bad.sum())} of {images.shape[0]} images (first: index "
            f"{int(bad.nonzero()[0])}); a reward is undefined on them (a diverged sampler?)"
        )


class Reward:
    """A reward: ``__call__(images, prompts) -> Tensor (B,)`` of float32, higher is better.

    ``images`` are float tensors in [0, 1] with shape ``(B, C, H, W)``; ``prompts`` is a list of
    B strings. Subclasses implement ``__call__`` and may move their models with ``to(device)``.
    """

    name: str = "reward"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Reward":
        return self


#: rewards by name; every module of ``flowgym.rewards`` is imported on the first lookup, so heavy
#: dependencies (transformers reward models) load only when a reward is asked for
REWARDS: Registry[Callable[..., Reward]] = Registry("reward", builtin_package="flowgym.rewards")


def register_reward(name: str) -> Callable:
    """Decorator registering a ``Reward`` subclass (or factory returning one) under ``name``."""
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    """Names accepted by ``make_reward``."""
    return REWARDS.names()


def make_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as ``name`` with keyword arguments ``kwargs`` (an argument it does
    not take is a ``ValueError`` naming it and the accepted ones)."""
    builder = REWARDS.lookup(name)
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # a builder without a signature: let it check its arguments
        parameters = None
    if parameters is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        accepted = [p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"reward {name!r} does not take {unknown}; accepted: {accepted or 'no arguments'}")
    reward = builder(**kwargs)
    reward.name = name
    return reward


class RewardComposer:
    """Weighted sum of named rewards; returns the total and every term.

    ``RewardComposer({"digit_alignment": 1.0, "ink": 0.5})`` or with pre-built rewards
    ``RewardComposer({"a": (reward_a, 1.0)})``. Per-reward keyword arguments go in ``kwargs``:
    ``RewardComposer({"pickscore": 1.0}, kwargs={"pickscore": {"model": "/path"}})``.
    """

    def __init__(
        self,
        weights: Mapping[str, float | tuple[Reward, float]],
        kwargs: Mapping[str, Mapping] | None = None,
    ) -> None:
        if not weights:
            raise ValueError("at least one reward is needed; accepted names: " + ", ".join(available_rewards()))
        kwargs = dict(kwargs or {})
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        for name, spec in weights.items():
            if isinstance(spec, tuple):
                reward, weight = spec
            else:
                reward, weight = make_reward(name, **dict(kwargs.get(name, {}))), spec
            if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
                raise ValueError(f"the weight of reward {name!r} must be a finite number; got {weight!r}")
            self.rewards[name] = reward
            self.weights[name] = float(weight)
        unknown = sorted(set(kwargs) - set(self.rewards))
        if unknown:
            raise ValueError(f"kwargs given for rewards that are not composed: {unknown}")

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    def to(self, device: torch.device | str) -> "RewardComposer":
        for reward in self.rewards.values():
            reward.to(device)
        return self

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(total (B,), {name: term (B,)})`` with ``total = sum_i weight_i * term_i``."""
        terms = {name: reward(images, prompts).float().reshape(-1) for name, reward in self.rewards.items()}
        total = torch.zeros_like(next(iter(terms.values())))
        for name, term in terms.items():
            total = total + self.weights[name] * term
        return total, terms
