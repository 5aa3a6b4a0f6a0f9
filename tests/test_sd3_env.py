"""FlowDenoise-SD3-v0 end to end on a tiny random-weight SD3 pipeline saved offline.

Everything is loaded only through the user-facing paths (``make_env("sd3", model=<folder>)``,
``gym.make("FlowDenoise-SD3-v0", model=<folder>)``, the Hydra config with ``env=sd3``), so these
tests exercise the same code as ``stabilityai/stable-diffusion-3.5-medium`` on a GPU. Also checks
that the published SD3.5 recipes (``configs/experiment/``) compose, without loading any model.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict
from torchrl.envs.utils import check_env_specs

import flowgym  # noqa: F401  (registers the ids)
from algos.trainer import Trainer
from flowgym.registration import make_env
from flowgym.rewards.image import jpeg_size_kb
from flowgym.schedules import static_shift_sigmas
from flowgym.testing.tiny_sd3 import TINY_SD3_CONFIG, save_tiny_sd3

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
RES = 32  # tiny pipeline: vae_scale_factor 2, patch 2 -> latents (4, 16, 16)
# backend arguments that keep the tiny pipeline fast (short T5 sequence, small LoRA)
TINY_BACKEND = {"resolution": RES, "lora_rank": 4, "lora_alpha": 8, "max_sequence_length": 8, "device": "cpu"}
PROMPTS = ["a red cube on a table", "two cats", "a lighthouse at night"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is fastest, and avoids oversubscribing shared CI cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_env"), seed=0))


def sd3_env(path: str, **kwargs):
    kwargs = {
        **TINY_BACKEND,
        "num_prompts": 2,
        "group_size": 2,
        "num_steps": 3,
        "prompts": PROMPTS,
        "rewards": {"jpeg_compressibility": 1.0},
        "seed": 0,
        **kwargs,
    }
    return make_env("sd3", model=path, **kwargs)


@pytest.fixture(scope="module")
def env(tiny_path):
    return sd3_env(tiny_path)


# ------------------------------------------------------------------------------ the TorchRL env
def test_torchrl_check_env_specs(env):
    check_env_specs(env)


def test_schedule_uses_the_models_own_shift(env):
    # shift defaults to None: the scheduler_config.json of the saved pipeline (3.0) is used
    assert env.shift == pytest.approx(TINY_SD3_CONFIG["shift"])
    torch.testing.assert_close(env.sigmas.cpu(), static_shift_sigmas(3, TINY_SD3_CONFIG["shift"]).float())


@pytest.mark.parametrize("resolution", [16, 32])
def test_latent_shape_follows_the_vae(tiny_path, resolution):
    env = sd3_env(tiny_path, resolution=resolution)
    backend = env.backend
    vae = backend.vae.config
    scale = 2 ** (len(vae.block_out_channels) - 1)
    expected = (vae.latent_channels, resolution // scale, resolution // scale)
    assert backend.latent_shape == expected
    assert env.observation_spec["latent"].shape == (4, *expected)
    assert env.action_spec.shape == (4, *expected)
    assert env.reset().get("latent").shape == (4, *expected)


def test_rollout_with_the_policy_decodes_images_of_the_configured_size(env):
    policy = env.make_policy(seed=0)
    td = env.rollout(env.num_steps + 2, policy, break_when_any_done=True)
    B, K = 4, 3
    assert td.batch_size == (B, K)
    images = env.last_images
    assert images.shape == (B, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    # the terminal reward is the JPEG compressibility of exactly those images
    reward = td.get(("next", "reward"))[:, -1, 0]
    torch.testing.assert_close(reward, -jpeg_size_kb(images) / 500)
    assert (td.get(("next", "reward"))[:, :-1] == 0).all()
    # all steps but the last are stochastic (Flow-GRPO default) and carry a finite log-prob
    assert td.get("stochastic")[:, :-1].all() and not td.get("stochastic")[:, -1].any()
    assert torch.isfinite(td.get("sample_log_prob")).all() and (td.get("scale")[:, :-1] > 0).all()
    # the decoded images are those of the final latents
    with torch.no_grad():
        torch.testing.assert_close(env.backend.decode(td.get(("next", "latent"))[:, -1]), images)


def test_only_lora_parameters_require_grad(env):
    backend = env.backend
    trainable = {n for n, p in backend.named_parameters() if p.requires_grad}
    lora = {f"transformer.{n}" for n in backend.lora_parameter_names()}
    assert lora and trainable == lora
    assert all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in backend.named_parameters() if n in lora)
    # gradients reach the LoRA weights through the policy, and nothing else
    policy = env.make_policy(seed=0)
    td = env.reset()
    _, loc, _ = policy.distribution(td)
    loc.square().mean().backward()
    grads = {n: p.grad for n, p in backend.named_parameters() if p.grad is not None}
    assert set(grads) <= lora and len(grads) > len(lora) // 2
    assert any(bool(g.abs().sum() > 0) for g in grads.values())
    backend.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ gymnasium views
@pytest.mark.parametrize("env_id", ["FlowDenoise-SD3-v0", "flowgym:FlowDenoise-SD3-v0"])
def test_gym_make_passes_the_gymnasium_checker(tiny_path, env_id):
    genv = gym.make(env_id, model=tiny_path, num_steps=2, prompts=PROMPTS, rewards={"jpeg_compressibility": 1.0},
                    **{**TINY_BACKEND, "resolution": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advice about image-like boxes; errors still raise
        gym_check_env(genv.unwrapped)
    obs, info = genv.reset(seed=1)
    assert obs["latent"].shape == (4, 8, 8) and info["prompt"] in PROMPTS
    policy = genv.unwrapped.make_policy(seed=0)
    assert policy.backend is genv.unwrapped.core.backend
    terminated = False
    while not terminated:
        obs, reward, terminated, truncated, info = genv.step(genv.action_space.sample() * 0.01)
    assert "jpeg_compressibility" in info["reward_terms"] and reward < 0


def test_gym_make_vec_with_groups(tiny_path):
    venv = gym.make_vec("FlowDenoise-SD3-v0", num_envs=4, group_size=2, model=tiny_path, num_steps=2,
                        prompts=PROMPTS, rewards={"jpeg_compressibility": 1.0}, **{**TINY_BACKEND, "resolution": 16})
    obs, _ = venv.reset(seed=0)
    assert obs["latent"].shape == (4, 4, 8, 8)
    assert obs["prompt_index"][0] == obs["prompt_index"][1] and obs["prompt_index"][2] == obs["prompt_index"][3]
    policy = venv.unwrapped.make_policy(seed=0)
    prompt_list = venv.unwrapped.core.prompt_list
    for _ in range(2):
        # the policy on the vector observation: conditioning from the prompts (cached encodings)
        td = TensorDict({k: obs[k] if k == "latent" else obs[k][:, 0] for k in ("latent", "sigma", "sigma_next")},
                        batch_size=[4])
        td.set("stochastic", obs["stochastic"][:, 0].bool())
        td.set("prompt", NonTensorStack(*(prompt_list[int(i)] for i in obs["prompt_index"][:, 0]), batch_size=[4]))
        obs, rewards, terminated, truncated, infos = venv.step(policy(td).get("action"))
    assert terminated.all() and (rewards < 0).all() and "final_obs" in infos


# ------------------------------------------------------------------------------ the trainer
def compose_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def tiny_training_config(path: str, algo: str) -> dict:
    return compose_config(
        f"algo={algo}", "env=sd3", "reward=jpeg_compressibility", f"env.backend.model={path}",
        "env.backend.resolution=16", "env.backend.lora_rank=4", "env.backend.lora_alpha=8",
        "env.backend.max_sequence_length=8", "env.num_prompts=2", "env.group_size=2", "env.num_steps=3",
        "env.prompts=[a red cube,two cats,a lighthouse]", "env.eval_prompts=[a blue ball]",
        "env.eval_samples_per_prompt=2", "trainer.iterations=2", "trainer.eval_every=2",
        "trainer.checkpoint_every=0", "logger.backends=[csv]", "device=cpu",
    )


@pytest.mark.parametrize("algo", ["flow_dppo", "grpo", "cps", "ppo_clip"])
def test_each_algorithm_trains_sd3_lora_on_cpu(tiny_path, algo, tmp_path):
    trainer = Trainer(tiny_training_config(tiny_path, algo), tmp_path, progress=False)
    backend = trainer.backend
    assert backend.name == "sd3" and backend.resolution == 16
    before = {k: v.clone() for k, v in backend.trainable_state_dict().items()}
    rows = trainer.train()
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [0, 1, 2]
    for row in rows[1:]:
        assert row["num_updates"] == 2 and row["num_pairs"] > 0, row
        assert np.isfinite(row["loss_objective"]) and np.isfinite(row["reward/jpeg_compressibility"]), row
    assert "eval/heldout/reward" in rows[-1] and "eval/train/drift_kl" in rows[-1]
    assert rows[2]["drift_kl"] > 0  # the second rollout was sampled by the updated policy
    after = backend.trainable_state_dict()
    assert set(after) == set(before)
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    # the last joint block is context_pre_only: its text-query projection never reaches the output
    # (zero gradient, zero-initialised LoRA B stays zero); every other LoRA weight must move
    last = backend.transformer.config.num_layers - 1
    assert unchanged <= {f"transformer_blocks.{last}.attn.add_q_proj.lora_B.default.weight"}, unchanged


# ------------------------------------------------------------------------------ configs
def test_sd3_env_group_defaults():
    cfg = compose_config("env=sd3", "reward=pickscore")
    env, backend = cfg["env"], cfg["env"]["backend"]
    assert env["name"] == "sd3" and env["shift"] is None and env["num_steps"] == 10
    assert backend["model"] == "stabilityai/stable-diffusion-3.5-medium"
    assert (backend["resolution"], backend["lora_rank"], backend["lora_alpha"]) == (512, 32, 64)
    # every backend key is an argument of SD3Backend.from_pretrained
    from flowgym.backends.sd3 import SD3Backend

    inspect.signature(SD3Backend.from_pretrained).bind(**backend)
    from flowgym.rewards.hf import PickScoreReward

    assert cfg["reward"]["weights"] == {"pickscore": 1.0}
    inspect.signature(PickScoreReward).bind(**cfg["reward"]["kwargs"]["pickscore"])


def test_jpeg_reward_group_builds():
    from flowgym.rewards import RewardComposer

    cfg = compose_config("reward=jpeg_compressibility")["reward"]
    composer = RewardComposer(cfg["weights"], cfg["kwargs"])
    images = torch.rand(2, 3, 16, 16)
    total, terms = composer(images, ["a", "b"])
    torch.testing.assert_close(total, -jpeg_size_kb(images) / 500)


RECIPES = {
    # experiment: (algo, kernel, noise, cfg, group, prompts, stochastic steps, loss values)
    "sd35_flow_grpo": ("grpo", "flow_sde", 0.7, 4.5, 24, 48, "all_but_last",
                       {"clip_range": 1e-4, "beta": 0.01, "kl_convention": "flow_grpo"}),
    "sd35_flow_dppo": ("flow_dppo", "flow_sde", 0.7, 1.0, 16, 48, {"window": 3, "range": [0, 6]},
                       {"delta": 1e-5, "beta": 0.0, "normalize": "all", "divergence": "kl"}),
    "sd35_flow_dppo_cps": ("flow_dppo", "cps", 0.8, 1.0, 16, 48, {"window": 3, "range": [0, 6]},
                           {"delta": 1e-5, "beta": 0.0}),
}


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_published_recipes_compose(experiment):
    from algos.trainer import validate_config

    algo, kernel, noise, guidance, group, prompts, stochastic, loss = RECIPES[experiment]
    cfg = compose_config(f"+experiment={experiment}")
    a, e, t = cfg["algo"], cfg["env"], cfg["trainer"]
    assert (a["name"], a["kernel"], a["noise_level"], a["guidance_scale"]) == (algo, kernel, noise, guidance)
    assert {k: a["loss"][k] for k in loss} == loss
    groups = e["num_prompts"] * t["rollout_batches"]
    assert (e["name"], e["group_size"], groups, e["num_steps"]) == ("sd3", group, prompts, 10)
    assert (t["eval_num_steps"], t["eval_guidance_scale"]) == (40, 4.5)
    assert e["stochastic_steps"] == stochastic and e["shift"] is None
    b = e["backend"]
    assert (b["model"], b["resolution"], b["lora_rank"], b["lora_alpha"]) == (
        "stabilityai/stable-diffusion-3.5-medium", 512, 32, 64)
    assert (t["lr"], t["num_minibatches"], t["inner_epochs"]) == (3e-4, 2, 1)
    assert t["ema"]["enabled"] and t["ema"]["decay"] == 0.9
    assert cfg["reward"]["weights"] == {"pickscore": 1.0}
    validate_config(cfg)  # batch splits into the mini-batches, valid values; loads nothing
    # the loss accepts every configured argument
    from algos.losses import get_loss_class

    loss_cls = get_loss_class(algo)
    params = set(inspect.signature(loss_cls.__init__).parameters)
    for klass in loss_cls.__mro__:
        if "__init__" in vars(klass):
            params |= set(inspect.signature(klass.__init__).parameters)
    assert set(a["loss"]) <= params, set(a["loss"]) - params


def test_documented_command_composes_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", "+experiment=sd35_flow_dppo", "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = OmegaConf.create(out.stdout)
    assert printed.algo.name == "flow_dppo" and printed.env.group_size == 16
    assert printed.env.stochastic_steps.window == 3


def test_fused_rollout_equals_torchrl_loop_with_cfg(tiny_path):
    from torchrl.envs import EnvBase

    runs = []
    for generic in (False, True):
        env = sd3_env(tiny_path, stochastic_steps={"window": 1, "range": [0, 2]})
        policy = env.make_policy(seed=0, guidance_scale=2.0)
        with torch.no_grad():
            runs.append(EnvBase.rollout(env, env.num_steps, policy) if generic else env.rollout(env.num_steps, policy))
    fused, loop = runs
    assert sorted(fused.keys(True, True), key=str) == sorted(loop.keys(True, True), key=str)
    for key in loop.keys(True, True):
        if key == "sample_log_prob":
            torch.testing.assert_close(fused.get(key), loop.get(key), rtol=1e-6, atol=1e-6)
        elif isinstance(loop.get(key), torch.Tensor):
            assert torch.equal(fused.get(key), loop.get(key)), key
    # the conditioning is a view of the episode's text embeddings, not one copy per step
    embeds = fused.get(("conditioning", "prompt_embeds"))
    assert embeds.stride(1) == 0 and torch.equal(embeds, loop.get(("conditioning", "prompt_embeds")))


def test_sd3_tiny_config_trains_two_iterations_offline(tmp_path):
    """``python -m algos.run env=sd3_tiny reward=jpeg_compressibility`` works as is: the config's
    ``tiny:sd3`` source builds the random pipeline offline and its resolution fits the tiny transformer."""
    from family_checks import check_algos_run

    cfg = compose_config("env=sd3_tiny")
    assert cfg["env"]["name"] == "sd3" and cfg["env"]["backend"]["model"] == "tiny:sd3"
    assert cfg["env"]["backend"]["resolution"] == RES
    check_algos_run("sd3_tiny", tmp_path)
