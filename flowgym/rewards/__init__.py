"""Reward functions by name: ``images (B, C, H, W) in [0, 1] + prompts -> float32 tensor (B,)``.

Use ``make_reward(name, **kwargs)`` to build one, ``available_rewards()`` to list the names, and
``RewardComposer`` to combine several with weights. Modules defining rewards register them with
``@register_reward("name")``; built-in modules are imported lazily on first lookup so that heavy
dependencies (transformers reward models) load only when asked for.
"""

from flowgym.rewards.base import (
    Reward,
    RewardComposer,
    available_rewards,
    make_reward,
    register_reward,
)

__all__ = ["Reward", "RewardComposer", "available_rewards", "make_reward", "register_reward"]
