"""The reward registry and weighted composition."""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["Reward", "RewardComposer", "available_rewards", "make_reward", "register_reward"]

# modules whose import registers built-in rewards; imported on the first lookup
_BUILTIN_MODULES = ("flowgym.rewards.image", "flowgym.rewards.digits", "flowgym.rewards.hf")
_REGISTRY: dict[str, Callable[..., "Reward"]] = {}
_builtins_loaded = False


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


def register_reward(name: str) -> Callable:
    """Decorator registering a ``Reward`` subclass (or factory returning one) under ``name``."""

    def decorator(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            # only a missing built-in module is tolerated, not a broken dependency inside one
            if error.name != module:
                raise


def available_rewards() -> list[str]:
    """Names accepted by ``make_reward``."""
    _load_builtins()
    return sorted(_REGISTRY)


def make_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as ``name`` with keyword arguments ``kwargs``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; accepted: {sorted(_REGISTRY)}")
    reward = _REGISTRY[name](**kwargs)
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
