"""FlowDenoise-Digits-v0 through every view passes the ecosystem's checkers."""

from __future__ import annotations

import warnings

import gymnasium as gym
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torchrl.envs import GymWrapper
from torchrl.envs.utils import check_env_specs

import flowgym


def test_torchrl_env_specs_and_defaults():
    env = flowgym.make_env("digits", num_prompts=2)
    assert env.num_steps == 10 and env.group_size == 8 and env.backend.latent_shape == (1, 8, 8)
    check_env_specs(env)


def test_gymnasium_and_sb3_checkers():
    env = gym.make("FlowDenoise-Digits-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 advises on image-like float boxes; errors still raise
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)


def test_vector_env_groups_and_gym_wrapper():
    venv = gym.make_vec("FlowDenoise-Digits-v0", num_envs=16)
    assert venv.unwrapped.core.group_size == 8  # the registered default when it divides num_envs
    assert gym.make_vec("FlowDenoise-Digits-v0", num_envs=6).unwrapped.core.group_size == 1
    wrapped = GymWrapper(venv)
    check_env_specs(wrapped)
    td = wrapped.rollout(10)
    assert td.batch_size == torch.Size([16, 10])
    reward = td.get(("next", "reward"))[:, -1]
    assert torch.isfinite(reward).all() and (reward > 0).all()
