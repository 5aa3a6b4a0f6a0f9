"""FlowDenoise-Compose-v0: the ecosystem's checkers, the vector env, and a 2-iteration training run."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torchrl.envs.utils import check_env_specs

import flowgym
from flowgym.registration import make_env

ROOT = Path(__file__).resolve().parents[1]


def test_registered_with_its_defaults():
    assert flowgym.env_ids()["FlowDenoise-Compose-v0"] == "compose"
    env = make_env("compose", num_prompts=2, group_size=2, num_steps=3)
    assert env.num_steps == 3 and env.rewards.names == ["compose_partial"]
    assert env.observation_spec["latent"].shape == (4, 3, 32, 32)


def test_torchrl_checker_and_every_kernel_with_guidance():
    env = make_env("compose", num_prompts=2, group_size=2, num_steps=4, stochastic_steps={"window": 2, "range": [0, 3]}, seed=0)
    check_env_specs(env, seed=0)
    for kernel, noise in (("flow_sde", 0.7), ("cps", 0.8), ("dance_sde", 0.3)):
        traj = env.rollout(env.num_steps, env.make_policy(kernel=kernel, noise_level=noise, guidance_scale=2.0, seed=0))
        assert traj.batch_size == torch.Size([4, 4])
        assert torch.isfinite(traj.get(("next", "reward"))).all()


def test_gymnasium_and_sb3_checkers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gym_check_env(gym.make("FlowDenoise-Compose-v0", num_steps=3).unwrapped, skip_render_check=True)
        sb3_check_env(gym.make("FlowDenoise-Compose-v0", num_steps=3), warn=False)
    venv = gym.make_vec("FlowDenoise-Compose-v0", num_envs=4, group_size=2, num_steps=2)
    obs, _ = venv.reset(seed=0)
    assert obs["latent"].shape == (4, 3, 32, 32)
    for _ in range(2):
        obs, reward, terminated, truncated, info = venv.step(torch.zeros(4, 3, 32, 32))
    assert terminated.all()


def test_two_iterations_train_and_report_the_compose_metrics(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", "env=compose", "reward=compose", "trainer.iterations=2", "trainer.eval_every=2",
         "env.num_prompts=2", "env.group_size=4", "env.eval_samples_per_prompt=1", "env.eval_prompts=heldout_balanced",
         "env.prompts=train_balanced", "logger.backends=[csv]", "device=cpu", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for split in ("train", "heldout"):
        for key in ("compose", "compose/counting", "compose/position", "compose_fd", "compose/clean", "drift_kl"):
            assert f"eval/{split}/{key}" in rows[-1], (split, key)
