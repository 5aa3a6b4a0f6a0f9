"""Reward functions by name: ``images (B, C, H, W) in [0, 1] + prompts -> float32 tensor (B,)``.

Use ``make_reward(name, **kwargs)`` to build one, ``available_rewards()`` to list the names, and
``RewardComposer`` to combine several with weights. Modules defining rewards register them with
``@register_reward("name")`` (the registry is ``REWARDS``); every module of this package is imported
on the first lookup, so a new reward is one new file, and heavy dependencies (transformers reward
models) load only when asked for.
"""

from flowgym.rewards.base import (
    REWARDS,
    Reward,
    RewardComposer,
    available_rewards,
    make_reward,
    register_reward,
)

__all__ = ["REWARDS", "Reward", "RewardComposer", "available_rewards", "make_reward", "register_reward"]
