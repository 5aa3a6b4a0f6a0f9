"""The fused rollout (``FlowDenoiseEnv.rollout`` with a ``FlowPolicy``) against TorchRL's own loop.

``EnvBase.rollout(env, ...)`` is TorchRL's generic loop (``policy(td)`` then ``env.step(td)`` at
every step); ``env.rollout(...)`` takes the fused path for a whole episode with a ``FlowPolicy``.
Both must give the same trajectory, key for key, from the same generators.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type

import flowgym.rollout as fused
from flowgym.backends.toy import ToyBackend
from flowgym.env import FlowDenoiseEnv
from flowgym.policy import FlowPolicy
from flowgym.rewards import Reward, RewardComposer


class Brightness(Reward):
    def __call__(self, images, prompts):
        return images.flatten(1).mean(1)


class Contrast(Reward):
    def __call__(self, images, prompts):
        return images.flatten(1).std(1)


def rewards() -> RewardComposer:
    return RewardComposer({"brightness": (Brightness(), 1.0), "contrast": (Contrast(), 0.5)})


@pytest.fixture(scope="module")
def backend() -> ToyBackend:
    return ToyBackend(latent_shape=(2, 4, 4), seed=0)


def make_env(backend, **kwargs) -> FlowDenoiseEnv:
    kwargs = {"num_prompts": 2, "group_size": 3, "num_steps": 6, "rewards": rewards(), "seed": 0, **kwargs}
    return FlowDenoiseEnv(backend, **kwargs)


def both(backend, env_kwargs=None, policy_kwargs=None, episodes=2, request=None):
    """``episodes`` trajectories each from the fused path and from TorchRL's loop, same seeds."""
    out = []
    for generic in (False, True):
        env = make_env(backend, **(env_kwargs or {}))
        policy = FlowPolicy(backend, seed=3, **(policy_kwargs or {}))
        runs = []
        with torch.no_grad():
            for _ in range(episodes):
                req = None if request is None else request.clone()
                if generic:
                    runs.append(EnvBase.rollout(env, env.num_steps, policy, tensordict=req))
                else:
                    runs.append(env.rollout(env.num_steps, policy, tensordict=req))
        out.append((env, runs))
    return out


def assert_same_trajectory(got: TensorDict, want: TensorDict) -> None:
    assert type(got) is type(want) and got.batch_size == want.batch_size and got.device == want.device
    keys = sorted(want.keys(True, True), key=str)
    assert sorted(got.keys(True, True), key=str) == keys
    for key in keys:
        a, b = got.get(key), want.get(key)
        if not isinstance(b, torch.Tensor):
            assert a.tolist() == b.tolist(), key
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if key == "sample_log_prob":
            # log(std) may differ in its last bit between a vectorised and a scalar log
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b), key
    for key in ("prompt", ("next", "prompt")):
        assert got.get(key).tolist() == want.get(key).tolist()
        assert got.get(key).batch_size == want.get(key).batch_size


CASES = [
    pytest.param({}, {}, id="flow_sde-all_but_last"),
    pytest.param({"stochastic_steps": {"window": 2, "range": [1, 5]}}, {}, id="window"),
    pytest.param({"stochastic_steps": [0, 2, 4]}, {"kernel": "cps", "noise_level": 0.8}, id="cps-list"),
    pytest.param({"stochastic_steps": "none"}, {}, id="ode-episode"),
    pytest.param({}, {"kernel": "ode"}, id="ode-kernel-on-stochastic-steps"),
    pytest.param({"share_initial_noise": True}, {"kernel": "dance_sde", "noise_level": 0.3, "reduce": "sum"}, id="dance-sum"),
    pytest.param({}, {"kernel": "cps", "log_prob_convention": "cps_legacy"}, id="cps-legacy"),
    pytest.param({"shift": "dynamic"}, {"guidance_scale": 3.0}, id="cfg-dynamic-shift"),
]


@pytest.mark.parametrize("env_kwargs, policy_kwargs", CASES)
def test_fused_rollout_equals_torchrl_loop(backend, env_kwargs, policy_kwargs):
    (fused_env, fused_runs), (generic_env, generic_runs) = both(backend, env_kwargs, policy_kwargs)
    for got, want in zip(fused_runs, generic_runs):  # the second episode checks the generators moved alike
        assert_same_trajectory(got, want)
    assert torch.equal(fused_env.last_images, generic_env.last_images)
    assert torch.equal(fused_env.generator_state(), generic_env.generator_state())
    with pytest.raises(RuntimeError, match="call reset"):  # the episode is over in both
        fused_env.step(fused_runs[-1][:, -1].clone())


def test_explicit_prompts_and_deterministic_mode(backend):
    env = make_env(backend)
    prompts = ["p0", "p1", "p0", "p2", "p2", "p1"]
    from tensordict import NonTensorStack

    request = TensorDict({"prompt": NonTensorStack(*prompts)}, batch_size=env.batch_size)
    (_, fused_runs), (_, generic_runs) = both(backend, request=request)
    for got, want in zip(fused_runs, generic_runs):
        assert_same_trajectory(got, want)
        assert got.get("prompt")[:, 0].tolist() == prompts
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        (_, fused_runs), (_, generic_runs) = both(backend, episodes=1)
    assert_same_trajectory(fused_runs[0], generic_runs[0])
    assert torch.equal(fused_runs[0].get("action"), fused_runs[0].get("loc"))


def test_fused_trajectory_owns_its_storage_and_fits_the_specs(backend):
    env = make_env(backend)
    with torch.no_grad():
        td = env.rollout(env.num_steps, FlowPolicy(backend, seed=0))
    tensors = [td.get(k) for k in td.keys(True, True) if "conditioning" not in k and k[-1:] != ("prompt",)]
    assert all(t.is_contiguous() for t in tensors)  # like TorchRL's stacked output: .view() works
    # no two entries share an element (only the conditioning is an expanded view of the episode's)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert td.exclude("conditioning", ("next", "conditioning")).view(-1).batch_size == (env.batch_size[0] * env.num_steps,)
    assert td.reshape(-1).get(("conditioning", "bucket")).is_contiguous()
    before = td.get(("next", "latent")).clone()
    td.get("action").add_(1.0)
    assert torch.equal(td.get(("next", "latent")), before)
    for k in range(env.num_steps):
        assert env.full_observation_spec.is_in(td[:, k].select(*env.full_observation_spec.keys(True, True)))
    check_env_specs(env)


def test_gradients_flow_like_the_generic_loop(backend):
    env = make_env(backend, num_steps=3)
    td = env.rollout(env.num_steps, FlowPolicy(backend, seed=0))
    (td.get("sample_log_prob").sum() + td.get(("next", "latent")).sum()).backward()
    grads = [p.grad for p in backend.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    backend.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda env, policy: env.rollout(env.num_steps - 1, policy), id="partial-episode"),
        pytest.param(lambda env, policy: env.rollout(env.num_steps, policy, callback=lambda e, td: None), id="callback"),
        pytest.param(lambda env, policy: env.rollout(env.num_steps, lambda td: policy(td)), id="plain-callable"),
        pytest.param(lambda env, policy: env.rollout(env.num_steps, policy, set_truncated=True), id="set_truncated"),
        pytest.param(lambda env, policy: env.rollout(2 * env.num_steps, policy, break_when_any_done=False), id="auto-reset"),
    ],
)
def test_other_calls_take_torchrl_loop(backend, call, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused path must not run for this call")

    monkeypatch.setattr(fused, "fused_rollout", refuse)
    env = make_env(backend)
    with torch.no_grad():
        td = call(env, FlowPolicy(backend, seed=0))
    assert td.batch_size[0] == env.batch_size[0]


def test_unplannable_episodes_raise_the_policy_error(backend):
    # a stochastic kernel at noise level 0 has a zero std on stochastic steps, hence no density: the
    # fused path hands the episode to TorchRL's loop, whose policy raises, exactly as without it
    for runner in (lambda env, p: env.rollout(env.num_steps, p), lambda env, p: EnvBase.rollout(env, env.num_steps, p)):
        env = make_env(backend)
        with pytest.raises(ValueError, match="std must be finite and > 0"), torch.no_grad():
            runner(env, FlowPolicy(backend, seed=0, noise_level=0.0))


@pytest.mark.parametrize("stochastic_steps", ["all_but_last", "all", {"window": 2, "range": [1, 5]}, [0, 3]])
def test_ode_kernel_runs_on_any_env_as_deterministic_steps(backend, stochastic_steps):
    """``FlowPolicy(kernel="ode")`` ignores where the env asks for noise: on every step it takes the Euler
    step (scale 0, action = loc, sample_log_prob 0), so it samples exactly what an ODE episode does."""
    runs = []
    for spec in (stochastic_steps, "none"):
        env = make_env(backend, stochastic_steps=spec)
        with torch.no_grad():
            runs.append(env.rollout(env.num_steps, FlowPolicy(backend, seed=0, kernel="ode")))
    td, ode_episode = runs
    assert td.get("stochastic").any()  # the env's flags are kept: they say where noise was asked for
    assert torch.equal(td.get("action"), td.get("loc"))
    assert not td.get("scale").any() and not td.get("sample_log_prob").any()
    for key in ("action", "loc", "velocity", ("next", "latent"), ("next", "reward")):
        assert torch.equal(td.get(key), ode_episode.get(key)), key


def test_ode_kernel_has_no_log_prob_to_train_on(backend):
    from algos.losses import make_loss

    env = make_env(backend)
    policy = FlowPolicy(backend, seed=0, kernel="ode")
    with torch.no_grad():
        td = env.rollout(env.num_steps, policy).reshape(-1)
    stochastic = td.get("stochastic")
    with pytest.raises(ValueError, match=r"kernel='ode'\) is deterministic.*stochastic kernel"):
        policy.log_prob(td.get("action"), td.get("loc"), td.get("scale"), stochastic)
    # deterministic rows keep their log-prob of 0
    assert not policy.log_prob(td.get("action"), td.get("loc"), td.get("scale"), torch.zeros_like(stochastic)).any()
    with pytest.raises(ValueError, match="deterministic 'ode' kernel"):
        make_loss("grpo", policy)


class NaNBackend(ToyBackend):
    def _forward(self, latents, sigma, cond):
        v = super()._forward(latents, sigma, cond)
        return torch.where(sigma.reshape(-1, 1, 1, 1) < 0.5, torch.full_like(v, float("nan")), v)


def test_non_finite_action_is_reported_with_its_step():
    backend = NaNBackend(latent_shape=(1, 4, 4), seed=0)
    for stochastic_steps in ("all_but_last", "none"):
        env = make_env(backend, stochastic_steps=stochastic_steps, shift=1.0)
        with pytest.raises(ValueError, match=r"action at step \d+ holds NaN or inf"), torch.no_grad():
            env.rollout(env.num_steps, FlowPolicy(backend, seed=0))


def test_applies_only_to_whole_neutral_episodes(backend):
    env = make_env(backend)
    policy = FlowPolicy(backend, seed=0)
    K = env.num_steps
    assert fused.fused_rollout_applies(env, K, policy, None, True, None, {})
    assert fused.fused_rollout_applies(env, K + 3, policy, None, True, None, {"break_when_any_done": True, "return_contiguous": True})
    request = TensorDict({}, batch_size=env.batch_size)
    assert fused.fused_rollout_applies(env, K, policy, None, True, request, {})
    request.set("extra", torch.zeros(env.batch_size))
    assert not fused.fused_rollout_applies(env, K, policy, None, True, request, {})
    assert not fused.fused_rollout_applies(env, K, policy, None, False, None, {})
    assert not fused.fused_rollout_applies(env, K, policy, None, True, None, {"storing_device": "meta"})
    assert not fused.fused_rollout_applies(env, K, policy, None, True, None, {"out": TensorDict()})
    assert not fused.fused_rollout_applies(env, K, policy, None, True, None, {"unknown_option": 1})


def test_env_overhead_benchmark_runs(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "env_overhead.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as `python benchmarks/env_overhead.py` sees its folder
    spec = importlib.util.spec_from_file_location("env_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.measure("toy", batch=16, device="cpu", repeats=2)
    for key in ("bare_ms", "rollout_ms", "stepwise_ms", "full_rollout_ms", "models_ms", "noise_ms"):
        assert result[key] > 0, key
    assert result["env_ratio"] > 0 and result["all_in_ratio"] > 0 and result["noise_share"] > 0 and result["floor_ratio"] > 0
