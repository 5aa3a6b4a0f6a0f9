"""The Flow-GRPO-style loop of the benchmarks, written from the published formulas, samples what the
env and policy sample: the comparison in ``iteration_overhead.py`` times the same work."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from flow_grpo_loop import flow_grpo_rollout  # noqa: E402
from flowgym.policy import FlowPolicy  # noqa: E402
from flowgym.registration import make_env  # noqa: E402


def test_the_flow_grpo_style_loop_reproduces_the_env_rollout_with_the_same_noise():
    env = make_env("digits", num_prompts=2, group_size=4, num_steps=6, seed=0, stochastic_steps="all_but_last")
    start = env.generator_state()
    policy = FlowPolicy(env.backend, noise_level=0.7, seed=5)
    with torch.no_grad():
        traj = env.rollout(env.num_steps, policy)
    env.set_generator_state(start)  # the same prompts and initial noise
    latents, log_probs = flow_grpo_rollout(env, 0.7, 1.0, torch.Generator().manual_seed(5))  # the same step noise
    assert len(latents) == env.num_steps + 1 and len(log_probs) == env.num_steps - 1
    torch.testing.assert_close(latents[0], traj.get("latent")[:, 0], rtol=0, atol=0)
    for k in range(env.num_steps):
        torch.testing.assert_close(latents[k + 1], traj.get("action")[:, k], rtol=1e-5, atol=1e-5)
    for k in range(env.num_steps - 1):
        torch.testing.assert_close(log_probs[k], traj.get("sample_log_prob")[:, k], rtol=1e-5, atol=1e-4)
