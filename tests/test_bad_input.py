"""Bad input, tried as a new user would (issue 19): each is rejected before any work starts, with one
line naming the offending key (or file) and what is accepted; a broken checkpoint or a torn metrics
row on resume is named and passed over, never a raw library exception."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from omegaconf import OmegaConf

import algos.trainer as trainer_module
import flowgym  # noqa: F401  (registers the gym ids)
import flowgym.registration as registration
from algos.advantages import register_advantage
from algos.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from algos.config import load_config
from algos.health import NumericalError, all_finite, check_finite, check_rollout
from algos.run import check_same_run
from algos.trainer import Trainer
from flowgym.backends.digits import DigitsBackend
from flowgym.backends.toy import ToyBackend
from flowgym.registration import make_env
from flowgym.rewards import RewardComposer, make_reward
from sample_loss_toys import SMALL, comparable, run_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = ("logger.report=false", "logger.sample_grid=false")
#: runs whose metrics are compared across processes use one thread (the same float sums everywhere)
ONE_THREAD = (*QUIET, "num_threads=1")


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _set(cfg: dict, key: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return cfg


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the trainer gets as far as building the environment (the model)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the bad value was rejected")

    monkeypatch.setattr(trainer_module, "make_env", refuse)
    monkeypatch.setattr(registration, "make_backend", refuse)


# ================================================================ 1. values that cannot work
def test_gym_make_rejects_an_unknown_keyword_naming_it_and_the_accepted_ones():
    for make in (lambda: gym.make("FlowDenoise-Digits-v0", typo_kw=1),
                 lambda: gym.make_vec("FlowDenoise-Digits-v0", num_envs=2, typo_kw=1)):
        with pytest.raises(ValueError, match=r"unknown argument\(s\) \['typo_kw'\].*accepted.*'num_steps'"):
            make()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel": "cps", "noise_level": 1.5}, r"noise_level=1.5 is outside the 'cps' kernel's range \[0, 1\]"),
        ({"kernel": "cps", "noise_level": 2.5}, r"noise_level=2.5 is outside the 'cps' kernel's range"),
        ({"noise_level": float("inf")}, r"noise_level must be a finite number >= 0; got inf"),
        ({"noise_level": float("nan")}, r"noise_level must be a finite number >= 0; got nan"),
        ({"noise_level": -0.1}, r"noise_level must be a finite number >= 0"),
        ({"guidance_scale": float("inf")}, r"guidance_scale must be a finite number >= 0"),
        ({"kernel": "sde"}, r"kernel='sde' is not a kernel; accepted: \['cps', 'dance_sde', 'flow_sde', 'ode'\]"),
        ({"reduce": "max"}, r"reduce='max' is not accepted; accepted: \['mean', 'sum'\]"),
    ],
)
def test_the_gym_factory_rejects_policy_arguments_that_cannot_work_before_building(kwargs, message, no_model):
    with pytest.raises(ValueError, match=message):
        gym.make("FlowDenoise-Digits-v0", **kwargs)


BAD_VALUES = [
    ("trainer.checkpoint_every", -1, r"trainer.checkpoint_every must be an integer >= 0 \(every n iterations; 0 = never\)"),
    ("trainer.eval_every", -2, r"trainer.eval_every must be an integer >= 0"),
    ("trainer.ema.every", 0, r"trainer.ema.every must be a positive integer"),
    ("trainer.ema.decay", 1.5, r"trainer.ema.decay must be a number in \[0, 1\)"),
    ("trainer.max_grad_norm", float("inf"), r"trainer.max_grad_norm must be a finite number > 0, or null for no clipping"),
    ("trainer.max_grad_norm", float("nan"), r"trainer.max_grad_norm must be a finite number > 0"),
    ("trainer.lr", float("inf"), r"trainer.lr must be a positive number \(finite\); got inf"),
    ("trainer.weight_decay", float("nan"), r"trainer.weight_decay must be a finite number >= 0"),
    ("trainer.eval_num_steps", 0, r"trainer.eval_num_steps must be a positive integer"),
    ("trainer.eval_batch_size", 0, r"trainer.eval_batch_size must be a positive integer"),
    ("trainer.eval_guidance_scale", float("nan"), r"trainer.eval_guidance_scale must be a finite number >= 0"),
    ("env.eval_samples_per_prompt", 0, r"env.eval_samples_per_prompt must be a positive integer"),
    ("reward.weights.digit_alignment", float("nan"), r"reward.weights.digit_alignment must be a finite number; got nan"),
    ("reward.weights.digit_alignment", float("inf"), r"reward.weights.digit_alignment must be a finite number; got inf"),
    ("algo.noise_level", float("inf"), r"algo.noise_level must be a finite number >= 0; got inf"),
    ("algo.noise_level", float("nan"), r"algo.noise_level must be a finite number >= 0; got nan"),
    ("algo.guidance_scale", float("inf"), r"algo.guidance_scale must be a finite number >= 0"),
    ("algo.kernel", "sde", r"algo.kernel='sde' is not a kernel; accepted: \["),
    ("algo.loss.clip_range", float("nan"), r"algo.loss.clip_range must be a number >= 0 \(inf = no trust region\); got nan"),
    ("algo.loss.beta", float("inf"), r"algo.loss.beta must be a number >= 0 \(finite\); got inf"),
    # wrong types: the error names the key
    ("trainer.checkpoint_every", "often", r"trainer.checkpoint_every"),
    ("trainer.max_grad_norm", "big", r"trainer.max_grad_norm"),
    ("reward.weights.digit_alignment", "heavy", r"reward.weights.digit_alignment"),
    ("env.eval_samples_per_prompt", 1.5, r"env.eval_samples_per_prompt"),
    ("trainer.ema.enabled", "maybe", r"trainer.ema.enabled"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_config_values_that_cannot_work_are_rejected_naming_the_key(key, value, message, tmp_path, no_model):
    cfg = _set(run_config("flow_dppo"), key, value)
    with pytest.raises(ValueError, match=message):
        load_config(cfg)
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("key", ["algo.loss.delta", "algo.loss.clip_range"])
def test_an_infinite_trust_region_width_is_accepted_as_no_trust_region(key):
    load_config(_set(run_config("flow_dppo" if key.endswith("delta") else "grpo"), key, float("inf")))


def test_a_cps_eta_out_of_range_is_rejected_with_the_loss_default_kernel(tmp_path, no_model):
    # algo=cps sets kernel=cps through the loss's policy_defaults: the trainer checks the resolved pair
    cfg = _set(run_config("cps"), "algo.noise_level", 1.5)
    with pytest.raises(ValueError, match=r"algo.noise_level=1.5 is outside the 'cps' kernel's range \[0, 1\]"):
        Trainer(cfg, tmp_path, progress=False)


@pytest.mark.parametrize(
    "section, message",
    [
        ("loss", r"unknown key\(s\) algo.loss.clip_rnage; accepted keys of algo.loss: \[.*'clip_range'"),
        ("advantage_kwargs", r"unknown key\(s\) algo.advantage_kwargs.clip_rnage; accepted keys of algo.advantage_kwargs: \[.*'clip'"),
    ],
)
def test_unknown_keys_of_free_form_sections_are_named_before_the_model(section, message, tmp_path, no_model):
    cfg = _set(run_config("grpo"), f"algo.{section}.clip_rnage", 0.2)
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, tmp_path, progress=False)


def test_reward_weights_and_arguments_are_checked_where_they_enter():
    for weight in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match=r"the weight of reward 'ink' must be a finite number"):
            RewardComposer({"ink": weight})
    with pytest.raises(ValueError, match=r"the weight of reward 'ink' must be a finite number; got nan"):
        make_env("digits", rewards={"ink": float("nan")}, num_prompts=1, group_size=2)
    with pytest.raises(ValueError, match=r"reward 'jpeg_compressibility' does not take \['qualty'\]; accepted: \['scale', 'quality'\]"):
        make_reward("jpeg_compressibility", qualty=90)


# ================================================================ 2. dtype strings and devices
@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("fp32", torch.float32), ("torch.float32", torch.float32),
                                         ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_dtype_given_as_a_string_works(name, dtype):
    env = make_env("digits", backend_options={"dtype": name}, num_prompts=1, group_size=2)
    assert env.backend.dtype == dtype


@pytest.mark.parametrize("name", ["float33", "int64", "bfloat"])
def test_an_unknown_dtype_string_names_the_accepted_ones(name):
    with pytest.raises(ValueError, match=rf"unknown dtype '{name}'; accepted: \[.*'bfloat16'.*'float32'"):
        make_env("digits", backend_options={"dtype": name}, num_prompts=1, group_size=2)


def test_a_config_dtype_string_reaches_the_backend(tmp_path):
    cfg = _set(run_config("flow_dppo", "trainer.iterations=1", "trainer.eval_every=0", *QUIET), "env.backend.dtype", "float32")
    assert Trainer(cfg, tmp_path, progress=False).backend.dtype == torch.float32
    with pytest.raises(ValueError, match=r"unknown dtype 'float33'; accepted"):
        Trainer(_set(cfg, "env.backend.dtype", "float33"), tmp_path / "b", progress=False)


def test_a_cuda_device_without_cuda_fails_clearly_at_config_and_factory_time(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = r"device 'cuda' asked for, but CUDA is not available; use device=cpu or device=auto"
    attempts = {
        "make_env device": lambda: make_env("digits", device="cuda", num_prompts=1, group_size=2),
        "make_env backend_options": lambda: make_env("digits", backend_options={"device": "cuda"}, num_prompts=1, group_size=2),
        "gym.make": lambda: gym.make("FlowDenoise-Digits-v0", device="cuda"),
        "gym.make_vec": lambda: gym.make_vec("FlowDenoise-Digits-v0", num_envs=2, device="cuda"),
        "DigitsBackend": lambda: DigitsBackend(device="cuda"),
        "ToyBackend": lambda: ToyBackend(device="cuda"),
        "load_config": lambda: load_config(_set(run_config("flow_dppo"), "device", "cuda")),
        "Trainer": lambda: Trainer(_set(run_config("flow_dppo"), "device", "cuda"), tmp_path, progress=False),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ValueError, match=message):
            attempt()
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; accepted: 'auto', 'cpu', 'cuda', 'cuda:<index>'"):
        load_config(_set(run_config("flow_dppo"), "device", "gpu"))


# ================================================================ 3. non-finite training quantities
@register_advantage("test_bad_input_nan")
class _NaNAdvantage:
    """Group-free advantages with NaN for the first two samples."""

    def __call__(self, reward, terms, prompts, group_id):
        advantage = reward - reward.mean()
        advantage[:2] = float("nan")
        return advantage


def test_nan_advantages_stop_the_run_before_the_update(tmp_path):
    cfg = _set(run_config("grpo", "trainer.iterations=2", "trainer.eval_every=0", "trainer.checkpoint_every=1", *QUIET),
               "algo.advantage", "test_bad_input_nan")
    trainer = Trainer(cfg, tmp_path, progress=False)
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    with pytest.raises(NumericalError, match=r"iteration 1: the advantage is NaN for 2 of 8 samples"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_non_finite_old_log_probs_stop_the_run_naming_the_step(tmp_path):
    trainer = Trainer(run_config("ppo_clip", "trainer.iterations=2", "trainer.eval_every=0", *QUIET), tmp_path, progress=False)
    rollout = trainer.env.rollout

    def poisoned(*args, **kwargs):
        traj = rollout(*args, **kwargs)
        traj["sample_log_prob"][3, 1] = float("-inf")  # step 1 is stochastic (env.stochastic_steps=[0,1])
        return traj

    trainer.env.rollout = poisoned
    with pytest.raises(NumericalError, match=r"iteration 1: sample_log_prob is inf at denoising step 1 of 4 for 1 of 8 samples"):
        trainer.train()


def test_the_rollout_checks_cost_one_host_sync(monkeypatch):
    B, K = 4, 3
    from tensordict import TensorDict

    traj = TensorDict({"sample_log_prob": torch.zeros(B, K), "stochastic": torch.tensor([True, True, False]).expand(B, K)},
                      batch_size=[B, K])
    traj.set(("next", "latent"), torch.zeros(B, K, 1, 2, 2))
    syncs = {"n": 0}
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            syncs["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    check_rollout(traj, torch.ones(B), {"a": torch.ones(B), "b": torch.zeros(B)}, iteration=1)
    assert syncs["n"] == 1
    check_finite(torch.ones(B), "the advantage", 1)
    assert syncs["n"] == 2
    assert not all_finite(torch.ones(2), flags=(torch.tensor(False),))


@pytest.mark.parametrize(
    "name, channels, size",
    [("digit_alignment", 1, 8), ("ink", 1, 8), ("jpeg_compressibility", 3, 8), ("jpeg_incompressibility", 1, 8),
     ("compose", 3, 32), ("compose_partial", 3, 32), ("clean_canvas", 3, 32)],
)
def test_rewards_on_degenerate_images_are_finite_or_a_clear_error(name, channels, size):
    reward = make_reward(name)
    if name.startswith("compose") or name == "clean_canvas":
        from flowgym.backends.compose import grammar

        prompts = grammar.prompt_sets()["train"][:2]
    else:
        prompts = ["a handwritten 3", "a handwritten 7"]
    for images in (torch.zeros(2, channels, size, size), torch.ones(2, channels, size, size)):
        assert torch.isfinite(reward(images, prompts)).all(), name  # blank / full canvases: a defined value
    blank_channel = torch.rand(2, channels, size, size)
    blank_channel[:, 0] = 0.0
    assert torch.isfinite(reward(blank_channel, prompts)).all()
    for value, kind in ((float("nan"), "NaN"), (float("inf"), "inf")):
        images = torch.rand(2, channels, size, size)
        images[1, 0, 2, 3] = value
        with pytest.raises(ValueError, match=rf"images hold {kind} pixels in 1 of 2 images \(first: index 1\)"):
            reward(images, prompts)
    with pytest.raises(ValueError, match=r"at least one channel and one pixel|must have shape"):
        reward(torch.zeros(2, 0, size, size), prompts)


# ================================================================ 4. resume from a broken run folder
def _small_run(directory: Path, iterations: int = 3) -> tuple[dict, list[dict]]:
    cfg = run_config("flow_dppo", f"trainer.iterations={iterations}", "trainer.eval_every=0", "trainer.checkpoint_every=1", *ONE_THREAD)
    rows = Trainer(cfg, directory, progress=False).train()
    return cfg, rows


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_optimizer(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)


BREAKS = {
    "truncated weights": ("weights.safetensors", _truncate, r"weights.safetensors cannot be read .*truncated or not a safetensors file"),
    "state without its optimizer": ("state.pt", _drop_optimizer, r"state.pt has no 'optimizer' entry"),
    "garbage state": ("state.pt", lambda p: p.write_bytes(b"\x00garbage" * 32), r"state.pt cannot be read .*truncated or not a checkpoint state file"),
    "truncated state": ("state.pt", _truncate, r"state.pt cannot be read"),
    "state of another type": ("state.pt", lambda p: torch.save([1, 2], p), r"state.pt holds a list, not the training state"),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-iteration run with a checkpoint at every iteration (the newest two kept: 2 and 3)."""
    directory, threads = tmp_path_factory.mktemp("finished"), torch.get_num_threads()
    cfg, rows = _small_run(directory / "run")
    torch.set_num_threads(threads)
    return cfg, rows, directory / "run"


@pytest.mark.parametrize("broken", list(BREAKS))
def test_a_broken_newest_checkpoint_is_named_and_the_run_falls_back(broken, finished_run, tmp_path, caplog):
    cfg, full_rows, source = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    name, damage, message = BREAKS[broken]
    newest = run / "checkpoints" / "iter-000003"
    damage(newest / name)
    with pytest.raises(CheckpointError, match=re.escape(f"{newest}/") + message):
        load_checkpoint(newest, required=("iteration", "optimizer", "rng"))
    with caplog.at_level(logging.WARNING, logger="algos.trainer"):
        trainer = Trainer(cfg, run, progress=False)
        assert trainer.resume()
    assert trainer.iteration == 2
    assert any(str(newest) in r.getMessage() and "broken checkpoint" in r.getMessage() for r in caplog.records)
    assert (run / "checkpoints" / "iter-000003.broken").is_dir()  # kept for inspection, never loaded again
    assert latest_checkpoint(run / "checkpoints").name == "iter-000002"
    rows = trainer.train()  # iteration 3 again: the same row as the uninterrupted run
    assert comparable(rows) == comparable(full_rows)


def test_no_intact_checkpoint_names_every_broken_one(finished_run, tmp_path):
    cfg, _, source = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    for name in ("iter-000002", "iter-000003"):
        _truncate(run / "checkpoints" / name / "weights.safetensors")
    trainer = Trainer(cfg, run, progress=False)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint under .*iter-000003/weights.safetensors cannot be read.*iter-000002/weights.safetensors"):
        trainer.resume()
    # a checkpoint folder named explicitly is loaded as is, and its error names it
    with pytest.raises(CheckpointError, match=r"iter-000003.broken/weights.safetensors cannot be read"):
        Trainer(cfg, run, progress=False).resume(run / "checkpoints" / "iter-000003.broken")


def test_a_checkpoint_of_another_configuration_is_named_not_passed_over(finished_run, tmp_path):
    cfg, _, source = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    newest = run / "checkpoints" / "iter-000003"
    from safetensors.torch import load_file, save_file

    weights = load_file(str(newest / "weights.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(newest / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"iter-000003/weights.safetensors holds other trained parameters than this run's"):
        Trainer(cfg, run, progress=False).resume()
    assert newest.is_dir()  # not renamed: the file is fine, the config is not


def test_a_torn_last_metrics_row_is_dropped_and_a_torn_middle_row_named(finished_run, tmp_path, caplog):
    cfg, full_rows, source = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    shutil.rmtree(run / "checkpoints" / "iter-000003")  # the kill came while row 3 was being written
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])
    trainer = Trainer(cfg, run, progress=False)
    with caplog.at_level(logging.WARNING, logger="algos.run_logger"):
        assert trainer.resume() and trainer.iteration == 2
        rows = trainer.train()
    assert any("metrics.jsonl: dropping its torn last line 3" in r.getMessage() for r in caplog.records)
    assert comparable(rows) == comparable(full_rows)
    assert [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][:-10], *lines[1:]]) + "\n")
    again = Trainer(cfg, run, progress=False)
    again.resume()
    with pytest.raises(ValueError, match=r"metrics.jsonl:1 is not a metrics row .*only a torn last line is dropped"):
        again.train()


def test_resuming_another_algo_or_env_is_refused(tmp_path):
    saved = tmp_path / "run" / ".hydra"
    saved.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"algo": {"name": "flow_dppo"}, "env": {"name": "digits"}}), saved / "config.yaml")
    check_same_run(tmp_path / "run", OmegaConf.create({"algo": {"name": "flow_dppo"}, "env": {"name": "digits"}, "resume": True}))
    for key, cfg in (("algo.name", {"algo": {"name": "grpo"}, "env": {"name": "digits"}}),
                     ("env.name", {"algo": {"name": "flow_dppo"}, "env": {"name": "compose"}})):
        with pytest.raises(ValueError, match=rf"is a run with {key}=.*this command asks for {key}="):
            check_same_run(tmp_path / "run", OmegaConf.create({**cfg, "resume": True}))


def test_the_cli_names_the_broken_checkpoint_and_resumes_from_the_intact_one(finished_run, tmp_path):
    _, full_rows, source = finished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    newest = run / "checkpoints" / "iter-000003"
    (newest / "state.pt").write_bytes(b"not a checkpoint")
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", *SMALL, *ONE_THREAD, "trainer.iterations=3", "trainer.eval_every=0",
         "trainer.checkpoint_every=1", f"resume={run}", f"hydra.run.dir={tmp_path / 'new'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert f"{newest}/state.pt cannot be read" in text
    assert "at iteration 2" in out.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert comparable(rows) == comparable(full_rows)
    assert not math.isnan(rows[-1]["reward"])


def test_an_unknown_reward_argument_is_named_before_the_model_is_built(tmp_path, no_model):
    cfg = run_config("flow_dppo", "reward=remote")
    cfg["reward"]["kwargs"]["remote"]["retry"] = 5  # the key is `retries`
    with pytest.raises(ValueError, match=r"reward.kwargs.remote.retry.*accepted keys of reward.kwargs.remote: \[.*'retries'"):
        Trainer(cfg, tmp_path, progress=False)
