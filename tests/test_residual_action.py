"""The residual action parameterisation (``flowgym.residual_action``): spaces, checkers, the zero action
as the pretrained sampler, and the change-of-variables log-prob against ``torch.distributions``."""

from __future__ import annotations

import warnings

import gymnasium as gym
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch.distributions import Normal
from torchrl.envs.utils import ExplorationType, set_exploration_type

import flowgym  # noqa: F401  (registers the ids)
from flowgym.kernels import gaussian_log_prob
from flowgym.residual_action import (
    ResidualActionWrapper,
    latent_log_prob,
    latent_to_residual,
    make_residual_env,
    residual_to_latent,
    standard_normal_log_prob,
)

ENV_ID = "FlowDenoise-Digits-v0"
K = 10  # the digits env's registered number of steps


@pytest.fixture(scope="module")
def env():
    return make_residual_env(ENV_ID)


def _zeros(env):
    return np.zeros(env.action_space.shape, dtype=np.float32)


# --------------------------------------------------------------------------- spaces
def test_action_space_is_the_declared_box(env):
    space = env.action_space
    assert isinstance(space, gym.spaces.Box) and space.dtype == np.float32
    assert space.shape == (1, 8, 8) == env.unwrapped.core.backend.latent_shape
    assert np.all(space.low == -3.0) and np.all(space.high == 3.0)
    assert env.observation_space == env.unwrapped.observation_space  # observations unchanged
    wide = make_residual_env(ENV_ID, action_bound=5.0).action_space
    assert np.all(wide.low == -5.0) and np.all(wide.high == 5.0)
    unbounded = make_residual_env(ENV_ID, action_bound=None).action_space
    assert np.all(np.isinf(unbounded.low)) and np.all(np.isinf(unbounded.high))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="action_bound"):
            make_residual_env(ENV_ID, action_bound=bad)


def test_actions_outside_the_box_are_clipped(env):
    latents = []
    for value in (3.0, 100.0):
        env.reset(seed=3)
        obs, *_ = env.step(np.full(env.action_space.shape, value, dtype=np.float32))
        latents.append(obs["latent"])
    np.testing.assert_array_equal(latents[0], latents[1])


def test_bad_actions_and_order_are_rejected_clearly():
    env = make_residual_env(ENV_ID)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_zeros(env))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((64,), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        env.step(np.full(env.action_space.shape, np.nan, dtype=np.float32))
    for _ in range(K):
        *_, terminated, _, _ = env.step(_zeros(env))
    assert terminated
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(_zeros(env))


def test_factory_takes_an_env_or_an_id():
    base = gym.make(ENV_ID, num_steps=4)
    wrapped = make_residual_env(base)
    assert isinstance(wrapped, ResidualActionWrapper) and wrapped.env is base
    assert wrapped.unwrapped.core.num_steps == 4
    with pytest.raises(ValueError, match="env id"):
        make_residual_env(base, num_steps=4)
    with pytest.raises(TypeError, match="FlowDenoise"):
        ResidualActionWrapper(gym.make("CartPole-v1"))


# --------------------------------------------------------------------------- ecosystem checkers
def test_gymnasium_and_sb3_checkers_pass_on_the_wrapped_env():
    env = make_residual_env(ENV_ID)
    with warnings.catch_warnings():
        # advisory warnings only (SB3 recommends a [-1, 1] action box and flags image-like float
        # boxes; gymnasium notes the env is wrapped); every error still raises
        warnings.simplefilter("ignore")
        gym_check_env(env)
        sb3_check_env(env)


# --------------------------------------------------------------------------- the pretrained sampler
def _reference_trajectory(seed: int, policy_seed: int | None = None, deterministic: bool = True, **kwargs):
    """Latents and reward of the pretrained sampler (``env.make_policy()`` on the TorchRL core)."""
    base = gym.make(ENV_ID, **kwargs)
    core = base.unwrapped.core
    policy = base.unwrapped.make_policy(**({} if policy_seed is None else {"seed": policy_seed}))
    core.set_seed(seed)  # what the gym view's reset(seed=seed) does before its core.reset()
    mode = ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM
    with set_exploration_type(mode), torch.no_grad():
        td = core.rollout(core.num_steps, policy)
    return td.get(("next", "latent"))[0].numpy(), float(td.get(("next", "reward"))[0, -1, 0])


@pytest.mark.parametrize("kwargs", [{}, {"kernel": "cps", "noise_level": 0.8}, {"kernel": "ode"}])
def test_zero_action_reproduces_the_pretrained_mean_sampler_exactly(kwargs):
    seed = 11
    expected_latents, expected_reward = _reference_trajectory(seed, **kwargs)
    env = make_residual_env(ENV_ID, **kwargs)
    obs, _ = env.reset(seed=seed)
    np.testing.assert_array_equal(obs["latent"], env.unwrapped.core.episode.latent[0].numpy())
    for k in range(K):
        obs, reward, terminated, truncated, info = env.step(_zeros(env))
        np.testing.assert_array_equal(obs["latent"], expected_latents[k])
    assert terminated and not truncated and reward == expected_reward


def test_standard_normal_actions_reproduce_the_stochastic_sampler_exactly():
    seed, policy_seed = 5, 123
    expected_latents, expected_reward = _reference_trajectory(seed, policy_seed, deterministic=False)
    env = make_residual_env(ENV_ID, action_bound=None)  # no clip: a ~ N(0, I) exactly
    env.reset(seed=seed)
    generator = torch.Generator().manual_seed(policy_seed)  # the policy's noise stream, one draw per step
    for k in range(K):
        action = torch.randn((1, *env.action_space.shape), generator=generator)[0].numpy()
        obs, reward, terminated, _, info = env.step(action)
        np.testing.assert_array_equal(obs["latent"], expected_latents[k])
        assert info["stochastic_step"] == (k < K - 1)  # all_but_last: the last step is the ODE step
    assert terminated and reward == expected_reward


def test_deterministic_steps_ignore_the_residual():
    env = make_residual_env(ENV_ID, stochastic_steps=[0, 1])
    finals = []
    for value in (0.0, 2.0):
        env.reset(seed=2)
        stds = []
        for k in range(K):
            action = np.full(env.action_space.shape, value if k >= 2 else 0.0, dtype=np.float32)
            obs, _, _, _, info = env.step(action)
            stds.append(info["step_std"])
        finals.append(obs["latent"])
        assert all(s > 0 for s in stds[:2]) and all(s == 0.0 for s in stds[2:])
    np.testing.assert_array_equal(finals[0], finals[1])  # residuals on ODE steps changed nothing
    ode = make_residual_env(ENV_ID, kernel="ode")  # the ODE kernel: std 0 on every step
    ode.reset(seed=0)
    _, _, _, _, info = ode.step(np.ones(ode.action_space.shape, dtype=np.float32))
    assert info["step_std"] == 0.0 and info["stochastic_step"] is False


def test_residual_scales_with_the_step_std(env):
    env.reset(seed=4)
    mean, std, stochastic = env.step_distribution()
    assert stochastic and float(std) > 0
    obs, *_ = env.step(np.ones(env.action_space.shape, dtype=np.float32))
    np.testing.assert_allclose(obs["latent"], (mean + std)[0].numpy(), rtol=0, atol=0)


# --------------------------------------------------------------------------- log-prob identity
_shapes = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5)


@st.composite
def _step(draw, per_element_std: bool = False):
    shape = draw(_shapes)
    floats = lambda lo, hi: hnp.arrays(np.float32, shape, elements=st.floats(lo, hi, width=32))  # noqa: E731
    mean = draw(floats(-5.0, 5.0))
    residual = draw(floats(-3.0, 3.0))
    std_shape = shape if per_element_std else (shape[0],) + (1,) * (len(shape) - 1)
    std = draw(hnp.arrays(np.float32, std_shape, elements=st.floats(2.0**-10, 10.0, width=32)))
    return torch.from_numpy(mean), torch.from_numpy(std), torch.from_numpy(residual)


def _sum(x):
    return x.sum(dim=tuple(range(1, x.dim())))


@settings(max_examples=60, deadline=None)
@given(step=st.one_of(_step(), _step(per_element_std=True)))
def test_standard_normal_residual_gives_the_kernel_density(step):
    mean, std, residual = step
    next_latent = residual_to_latent(mean, std, residual)
    ours = latent_log_prob(standard_normal_log_prob(residual), std, residual)
    m64, s64 = mean.double(), std.double().expand(mean.shape)
    expected = _sum(Normal(m64, s64).log_prob(m64 + s64 * residual.double()))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=2e-3)
    # the same value as the project's kernel density of the latent step (both reductions)
    torch.testing.assert_close(ours, gaussian_log_prob(next_latent, mean, std, "sum"), rtol=1e-4, atol=2e-3)
    ours_mean = latent_log_prob(standard_normal_log_prob(residual, "mean"), std, residual, "mean")
    torch.testing.assert_close(ours_mean, gaussian_log_prob(next_latent, mean, std, "mean"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(standard_normal_log_prob(residual).double(), _sum(Normal(0.0, 1.0).log_prob(residual.double())), rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(step=_step(), agent=st.tuples(st.floats(-1.0, 1.0), st.floats(0.05, 2.0)))
def test_any_agent_density_maps_by_the_change_of_variables(step, agent):
    """An SB3-style diagonal Gaussian agent ``a ~ N(mu, s^2)`` induces ``x ~ N(mean + std mu, (std s)^2)``."""
    mean, std, residual = step
    mu, s = (torch.tensor(v, dtype=torch.float64) for v in agent)
    agent_log_prob = _sum(Normal(mu, s).log_prob(residual.double()))
    ours = latent_log_prob(agent_log_prob, std, residual)
    m64, s64 = mean.double(), std.double().expand(mean.shape)
    expected = _sum(Normal(m64 + s64 * mu, s64 * s).log_prob(m64 + s64 * residual.double()))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=2e-3)


@settings(max_examples=40, deadline=None)
@given(step=st.one_of(_step(), _step(per_element_std=True)))
def test_residual_round_trip(step):
    mean, std, residual = step
    back = latent_to_residual(residual_to_latent(mean, std, residual), mean, std)
    torch.testing.assert_close(back, residual, rtol=1e-4, atol=1e-3 * float(mean.abs().max() / std.min() + 1))


def test_deterministic_steps_have_no_log_density():
    a = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="ODE"):
        latent_log_prob(standard_normal_log_prob(a), torch.zeros(2, 1, 1, 1), a)
    with pytest.raises(ValueError, match="reduce"):
        standard_normal_log_prob(a, "none")


# --------------------------------------------------------------------------- the example
def test_sb3_ppo_example_runs(tmp_path):
    """A smoke run of ``examples/sb3_ppo_residual.py`` (the measured run uses the default 240 s budget);
    it leaves nothing in the temporary folder (SB3's default logger would write SB3-<date> there)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "examples/sb3_ppo_residual.py", "--budget-s", "3", "--eval-episodes", "2"],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("eval reward") and "nan" not in last
    assert not list(tmp_path.glob("SB3-*")), "the example left an SB3 log folder behind"
