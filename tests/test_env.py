"""The TorchRL env, the gymnasium views and the policy module, on a tiny random backend."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torchrl.envs import GymWrapper
from torchrl.envs.utils import check_env_specs

import flowgym  # noqa: F401  (registers the ids)
from flowgym.backends.toy import ToyBackend
from flowgym.env import FlowDenoiseEnv, stochastic_step_mask
from flowgym.gym import FlowDenoiseVectorEnv
from flowgym.policy import FlowPolicy
from flowgym.rewards import Reward, RewardComposer


class Brightness(Reward):
    """Mean pixel value: a trivial reward for env tests."""

    def __call__(self, images, prompts):
        return images.flatten(1).mean(1)


def brightness() -> RewardComposer:
    return RewardComposer({"brightness": (Brightness(), 1.0)})


@pytest.fixture(scope="module")
def backend() -> ToyBackend:
    return ToyBackend(latent_shape=(1, 4, 4), seed=0)


def make_env(backend, **kwargs) -> FlowDenoiseEnv:
    kwargs.setdefault("num_prompts", 2)
    kwargs.setdefault("group_size", 3)
    kwargs.setdefault("rewards", brightness())
    kwargs.setdefault("seed", 0)
    return FlowDenoiseEnv(backend, **kwargs)


def rollout(env: FlowDenoiseEnv, policy: FlowPolicy):
    return env.rollout(env.num_steps + 5, policy, break_when_any_done=True)


def test_torchrl_check_env_specs(backend):
    check_env_specs(make_env(backend))


def test_full_rollout_with_policy(backend):
    env = make_env(backend, num_steps=6)
    td = rollout(env, FlowPolicy(backend, seed=0))
    B, K = 6, 6
    assert td.batch_size == torch.Size([B, K])
    reward = td.get(("next", "reward")).squeeze(-1)
    assert (reward[:, :-1] == 0).all() and (reward[:, -1] != 0).all()
    assert td.get(("next", "done"))[:, -1].all() and not td.get(("next", "done"))[:, :-1].any()
    # Flow-GRPO default: all steps but the last are stochastic, with a log-prob; the last is ODE
    stochastic = td.get("stochastic")
    assert stochastic[:, :-1].all() and not stochastic[:, -1].any()
    assert (td.get("sample_log_prob")[:, -1] == 0).all()
    assert (td.get("scale")[:, -1] == 0).all() and (td.get("scale")[:, :-1] > 0).all()
    # the last action is the deterministic Euler step from its state
    assert torch.equal(td.get("action")[:, -1], td.get("loc")[:, -1])
    # actions chain into the next latents
    assert torch.equal(td.get(("next", "latent"))[:, :-1], td.get("latent")[:, 1:])
    sig = td.get("sigma")[0]
    assert torch.allclose(sig, env.sigmas[:-1])
    # reward terms are logged next to the total
    assert torch.allclose(td.get(("next", "reward_terms", "brightness"))[:, -1], reward[:, -1:])


def test_same_seed_bit_identical_different_seed_differs(backend):
    def run(seed):
        env = make_env(backend, seed=seed)
        return rollout(env, FlowPolicy(backend, seed=seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.get("action"), b.get("action"))
    assert torch.equal(a.get(("next", "reward")), b.get(("next", "reward")))
    assert a.get("prompt").tolist() == b.get("prompt").tolist()
    assert not torch.equal(a.get("latent")[:, 0], c.get("latent")[:, 0])
    assert not torch.equal(a.get(("next", "reward")), c.get(("next", "reward")))


def test_shared_initial_noise_within_groups(backend):
    env = make_env(backend, num_prompts=3, group_size=4, share_initial_noise=True)
    latent = env.reset().get("latent").reshape(3, 4, -1)
    for g in range(3):
        for i in range(1, 4):
            assert torch.equal(latent[g, 0], latent[g, i])
    assert not torch.equal(latent[0, 0], latent[1, 0])
    independent = make_env(backend, num_prompts=3, group_size=4).reset().get("latent").reshape(3, 4, -1)
    assert not torch.equal(independent[0, 0], independent[0, 1])


def test_groups_share_prompts_and_explicit_prompts(backend):
    env = make_env(backend, num_prompts=2, group_size=3)
    td = env.reset()
    prompts = td.get("prompt").tolist()
    assert prompts[:3] == [prompts[0]] * 3 and prompts[3:] == [prompts[3]] * 3
    assert td.get("group_id").tolist() == [0, 0, 0, 1, 1, 1]
    request = td.empty()
    from tensordict import NonTensorStack

    chosen = ["a", "a", "a", "b", "b", "b"]
    request.set("prompt", NonTensorStack(*chosen, batch_size=[6]))
    assert env.reset(request).get("prompt").tolist() == chosen


def test_stochastic_step_specs():
    assert stochastic_step_mask("all_but_last", 4).tolist() == [True, True, True, False]
    assert stochastic_step_mask("none", 3).tolist() == [False] * 3
    assert stochastic_step_mask([0, 2], 4).tolist() == [True, False, True, False]
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        mask = stochastic_step_mask({"window": 2, "range": [1, 6]}, 10, gen)
        idx = mask.nonzero().flatten().tolist()
        assert len(idx) == 2 and idx[1] == idx[0] + 1 and 1 <= idx[0] and idx[1] <= 5
        starts.add(idx[0])
    assert starts == {1, 2, 3, 4}
    for bad in ("sometimes", [10], {"window": 4, "range": [0, 3]}, {"range": [0, 3]}):
        with pytest.raises(ValueError, match="accepted|fit|range"):
            stochastic_step_mask(bad, 10)


def test_sliding_window_moves_with_the_iteration_and_stops_at_the_end():
    # MixGRPO's schedule on a 10-step episode: W = 4 inside [0, 9), one step further every 25 iterations
    spec = {"window": 4, "range": [0, 9], "slide_every": 25, "stride": 1}
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    starts = {}
    for iteration in (0, 24, 25, 49, 50, 124, 125, 1000):
        idx = stochastic_step_mask(spec, 10, gen, iteration).nonzero().flatten().tolist()
        assert idx == list(range(idx[0], idx[0] + 4))
        starts[iteration] = idx[0]
    assert starts == {0: 0, 24: 0, 25: 1, 49: 1, 50: 2, 124: 4, 125: 5, 1000: 5}  # last position hi - W = 5
    assert torch.equal(gen.get_state(), state)  # deterministic: the window draws nothing
    assert stochastic_step_mask({**spec, "stride": 2}, 10, gen, 50).nonzero().flatten().tolist() == [4, 5, 6, 7]
    for bad, message in (({**spec, "slide_every": 0}, "'slide_every' must be an integer >= 1"),
                         ({**spec, "stride": 1.5}, "'stride' must be an integer >= 1"),
                         ({**spec, "slide": 3}, r"unknown stochastic_steps keys \['slide'\]")):
        with pytest.raises(ValueError, match=message):
            stochastic_step_mask(bad, 10, gen)


def test_sliding_window_env_follows_env_iteration(backend):
    env = make_env(backend, num_steps=6, stochastic_steps={"window": 2, "range": [0, 6], "slide_every": 3})
    policy = FlowPolicy(backend, seed=0)
    for iteration, expected in ((0, [0, 1]), (3, [1, 2]), (7, [2, 3]), (100, [4, 5])):
        env.iteration = iteration
        td = rollout(env, policy)
        assert td.get("stochastic")[0].nonzero().flatten().tolist() == expected


def test_window_env_marks_only_window_steps(backend):
    env = make_env(backend, num_steps=10, stochastic_steps={"window": 3, "range": [0, 6]})
    td = rollout(env, FlowPolicy(backend, seed=0))
    per_step = td.get("stochastic")[0]
    assert int(per_step.sum()) == 3
    assert (td.get("sample_log_prob")[:, ~per_step] == 0).all()


@pytest.mark.parametrize(
    "bad_action, message",
    [
        (torch.zeros(6, 1, 4, 5), "shape"),
        (torch.zeros(6, 1, 4, 4, dtype=torch.float64), "dtype"),
        (torch.zeros(6, 1, 4, 4, device="meta"), "device"),
        (torch.full((6, 1, 4, 4), float("nan")), "NaN"),
        (torch.full((6, 1, 4, 4), float("inf")), "NaN or inf"),
    ],
)
def test_bad_actions_raise_and_leave_state_unchanged(backend, bad_action, message):
    env = make_env(backend)
    td = env.reset()
    latent_before = td.get("latent").clone()
    if bad_action.device.type == "meta":
        # a second real device is not available on every machine; meta stands in for "elsewhere"
        with pytest.raises(ValueError, match=message):
            env.validate_action(bad_action)
    else:
        td.set("action", bad_action)
        with pytest.raises(ValueError, match=message):
            env.step(td)
    # the env still accepts a good step from the same state
    td.set("action", latent_before.clone())
    out = env.step(td).get("next")
    assert int(out.get("step")[0]) == 1
    assert torch.equal(out.get("latent"), latent_before)


def test_stepping_finished_episode_raises(backend):
    env = make_env(backend, num_steps=2)
    td = rollout(env, FlowPolicy(backend, seed=0))
    last = td[:, -1].get("next").clone()
    last.set("action", last.get("latent"))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(last)


def test_bad_configuration_errors(backend):
    with pytest.raises(ValueError, match="unknown reward 'nope'.*accepted"):
        FlowDenoiseEnv(backend, rewards={"nope": 1.0})
    with pytest.raises(ValueError, match="unknown prompt set 'nope'.*accepted"):
        make_env(backend, prompts="nope")
    with pytest.raises(ValueError, match="group_size"):
        make_env(backend, group_size=0)
    with pytest.raises(ValueError, match="divisor of num_envs 6; accepted: \\[1, 2, 3, 6\\]"):
        FlowDenoiseVectorEnv(backend, 6, group_size=4, rewards=brightness())


def test_prompt_file(backend, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    env = make_env(backend, prompts=str(path), num_prompts=2, group_size=1)
    assert sorted(env.reset().get("prompt").tolist()) == ["first prompt", "second prompt"]


def test_gym_observation_is_what_its_docstring_lists():
    """The gym views' observation holds exactly the entries ``flowgym.gym`` documents, no more, no less."""
    import re

    import flowgym.gym as gym_module

    section = gym_module.__doc__.split("Observation (")[1].split("Unlike the TorchRL")[0]
    documented = set(re.findall(r"``(\w+)``", section)) - {"observation_space_for", "Dict"}
    env = gym.make("FlowDenoise-Toy-v0", rewards=brightness(), num_steps=2)
    obs, info = env.reset(seed=0)
    assert set(env.observation_space.spaces) == set(obs) == documented
    assert isinstance(info["prompt"], str)  # the prompt text travels in info, not in the observation
    venv = gym.make_vec("FlowDenoise-Toy-v0", num_envs=2, group_size=2, rewards=brightness(), num_steps=2)
    obs, _ = venv.reset(seed=0)
    assert set(venv.single_observation_space.spaces) == set(obs) == documented


def test_gymnasium_and_sb3_checkers():
    env = gym.make("FlowDenoise-Toy-v0", rewards=brightness())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 advises on image-like boxes; errors still raise
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)


def test_gym_episode_and_bad_action():
    env = gym.make("FlowDenoise-Toy-v0", rewards=brightness(), num_steps=3)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    policy = env.unwrapped.make_policy(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full(env.action_space.shape, np.nan, dtype=np.float32))
    total = 0.0
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample() * 0.01)
        total += reward
    assert terminated and not truncated and "brightness" in info["reward_terms"]
    assert policy.kernel_name == "flow_sde"


def test_vector_env_through_torchrl_gym_wrapper():
    venv = gym.make_vec("FlowDenoise-Toy-v0", num_envs=4, group_size=2, rewards=brightness(), num_steps=3)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert venv.autoreset_mode == gym.vector.AutoresetMode.SAME_STEP
    obs, _ = venv.reset(seed=0)
    assert isinstance(obs["latent"], torch.Tensor) and obs["latent"].shape == (4, 1, 4, 4)
    for step in range(3):
        obs, rewards, terminated, truncated, infos = venv.step(torch.zeros(4, 1, 4, 4))
    assert terminated.all() and "final_obs" in infos
    assert int(infos["final_obs"]["step"][0, 0]) == 3 and int(obs["step"][0, 0]) == 0  # SAME_STEP reset
    wrapped = GymWrapper(gym.make_vec("FlowDenoise-Toy-v0", num_envs=4, group_size=2, rewards=brightness()))
    check_env_specs(wrapped)
    assert wrapped.rollout(12).batch_size == torch.Size([4, 10])


def test_string_entry_point_without_import():
    code = (
        "import gymnasium as gym, sys\n"
        "assert 'flowgym' not in sys.modules\n"
        "env = gym.make('flowgym:FlowDenoise-Toy-v0', rewards={'jpeg_compressibility': 1.0})\n"
        "print(env.reset(seed=0)[0]['latent'].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(1, 4, 4)" in out.stdout


def test_policy_deterministic_mode_and_log_prob(backend):
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    env = make_env(backend)
    td = env.reset()
    policy = FlowPolicy(backend, seed=0)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        out = policy(td.clone())
    assert torch.equal(out.get("action"), out.get("loc"))
    sampled = policy(td.clone())
    normal = torch.distributions.Normal(sampled.get("loc"), sampled.get("scale").expand_as(sampled.get("loc")))
    expected = normal.log_prob(sampled.get("action")).flatten(1).mean(1)
    assert torch.allclose(sampled.get("sample_log_prob"), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown kernel"):
        FlowPolicy(backend, kernel="euler")
