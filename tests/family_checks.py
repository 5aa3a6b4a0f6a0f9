"""Checks shared by the diffusers family tests (tests/test_family_*.py), on the ``tiny:<family>`` pipelines.

Each family file supplies what is its own (how its diffusers pipeline takes ``latents=`` and what it
returns with ``output_type="latent"``, how to call its transformer) and runs these checks; none of
them skips. Sizes: 32 x 32 pixels, 3-4 steps, 4 samples, so that a family file stays well under a
minute on a shared 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from flowgym.hub import ModelNotAvailableError
from flowgym.registration import make_env

ROOT = Path(__file__).resolve().parents[1]
RES = 32
SEQ = 32
PROMPTS = ["a red cube on a table", "two cats", "a lighthouse at night"]
#: backend options that keep the tiny pipelines fast
TINY = {"resolution": RES, "lora_rank": 4, "lora_alpha": 8, "max_sequence_length": SEQ, "device": "cpu"}


def load(cls, model: str, **kwargs):
    return cls.from_pretrained(model, **{**TINY, **kwargs})


def perturb_lora(backend, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(backend.transformer.named_parameters())
    with torch.no_grad():
        for name in backend.lora_parameter_names():
            params[name].add_(scale * torch.randn(params[name].shape, generator=g))


def inputs(backend, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *backend.latent_shape, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    return x, sigma, backend.encode_prompts(PROMPTS[:batch])


def env_for(family: str, backend, **kwargs):
    kwargs = {"num_prompts": 2, "group_size": 2, "num_steps": 3, "prompts": PROMPTS,
              "rewards": {"jpeg_compressibility": 1.0}, "seed": 0, **kwargs}
    return make_env(family, backend=backend, **kwargs)


# ------------------------------------------------------------------------------ episodes
def check_episode(family: str, backend, kernel: str, guidance_scale: float) -> None:
    """One episode of the env with ``kernel``: shapes, finite log-probs on the stochastic steps, images."""
    stochastic = "none" if kernel == "ode" else "all_but_last"
    env = env_for(family, backend, stochastic_steps=stochastic)
    noise = {"flow_sde": 0.7, "cps": 0.8, "dance_sde": 0.3, "ode": 0.0}[kernel]
    policy = env.make_policy(seed=0, kernel=kernel, noise_level=noise, guidance_scale=guidance_scale)
    with torch.no_grad():
        td = env.rollout(env.num_steps, policy)
    B, K = 4, env.num_steps
    assert td.batch_size == (B, K)
    assert td.get("latent").shape == (B, K, *backend.latent_shape)
    images = env.last_images
    assert images.shape == (B, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    reward = td.get(("next", "reward"))[:, -1, 0]
    assert torch.isfinite(reward).all()
    stochastic_mask = td.get("stochastic")
    if kernel == "ode":
        assert not stochastic_mask.any()
    else:
        assert stochastic_mask[:, :-1].all() and not stochastic_mask[:, -1].any()
        assert torch.isfinite(td.get("sample_log_prob")[:, :-1]).all()
        assert (td.get("scale")[:, :-1] > 0).all()
    final = td.get(("next", "latent"))[:, -1]
    assert torch.isfinite(final).all()
    with torch.no_grad():
        torch.testing.assert_close(backend.decode(final), images)


def episode_prompts(td) -> list[str]:
    prompts = td.get("prompt")
    first = prompts[:, 0] if prompts.batch_dims == 2 else prompts
    return list(first.tolist())


def check_ode_matches_pipeline(
    family: str,
    backend,
    pipe,
    guidance_scale: float,
    to_pipeline_latents: Callable[[torch.Tensor], torch.Tensor],
    from_env_latents: Callable[[torch.Tensor], torch.Tensor],
    call_kwargs: dict[str, Any],
    num_steps: int = 3,
) -> None:
    """The env's ODE (Euler kernel) episode reproduces the pipeline's sampler from the same initial noise.

    ``to_pipeline_latents``: env latents -> the pipeline's ``latents=`` argument;
    ``from_env_latents``: env latents -> what the pipeline returns with ``output_type="latent"``.
    """
    env = env_for(family, backend, stochastic_steps="none", num_steps=num_steps)
    policy = env.make_policy(seed=0, kernel="ode", guidance_scale=guidance_scale)
    with torch.no_grad():
        td = env.rollout(env.num_steps, policy)
        x0 = td.get("latent")[:, 0]
        final = td.get(("next", "latent"))[:, -1]
        prompts = episode_prompts(td)
        out = pipe(
            prompt=prompts, height=RES, width=RES, num_inference_steps=num_steps, latents=to_pipeline_latents(x0.clone()),
            output_type="latent", max_sequence_length=SEQ, **call_kwargs,
        ).images
    # the schedule the env stepped through is the pipeline scheduler's
    torch.testing.assert_close(env.sigmas.cpu(), pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    expected = from_env_latents(final)
    assert out.shape == expected.shape
    assert out.abs().mean() > 0.1  # a real sample, not zeros
    torch.testing.assert_close(expected, out, rtol=1e-4, atol=1e-4)


def pipeline_sigmas(pipe, resolution: int, num_steps: int, **call_kwargs) -> torch.Tensor:
    """The sigmas the pipeline's scheduler is set to for ``resolution`` and ``num_steps`` (one forward, then interrupted)."""

    def stop(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return callback_kwargs

    with torch.no_grad():
        pipe(prompt="a red cube", height=resolution, width=resolution, num_inference_steps=num_steps,
             output_type="latent", callback_on_step_end=stop, max_sequence_length=SEQ, **call_kwargs)
    return pipe.scheduler.sigmas.float().clone()


def check_schedule(cls, model: str, pipe, call_kwargs: dict[str, Any]) -> None:
    """``sigma_schedule`` and the env's default schedule equal the pipeline scheduler's (dynamic shift included)."""
    seen = []
    for resolution in (32, 64):
        backend = load(cls, model, resolution=resolution, lora_rank=0)
        assert backend.default_shift() == "model"
        for steps in (3, 10):
            ours = backend.sigma_schedule(steps)
            theirs = pipeline_sigmas(pipe, resolution, steps, **call_kwargs)
            assert ours.shape == (steps + 1,) and ours[0] <= 1 and ours[-1] == 0
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
            seen.append(ours)
        env = env_for(backend.name, backend, num_steps=10)
        assert env.shift == "model"
        torch.testing.assert_close(env.sigmas.cpu(), backend.sigma_schedule(10), rtol=0, atol=0)
    # dynamic shifting: the schedule depends on the resolution
    assert not torch.allclose(seen[1], seen[3])


# ------------------------------------------------------------------------------ LoRA and reference
def check_lora_trains_and_reference(cls, model: str, frozen) -> None:
    backend = load(cls, model)
    trainable = [n for n, p in backend.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith("transformer.") for n in trainable)
    x, sigma, cond = inputs(backend)
    with torch.no_grad():
        base = frozen.velocity(x, sigma, cond)
        torch.testing.assert_close(backend.velocity(x, sigma, cond), base, rtol=0, atol=0)  # lora_B starts at zero
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    optimizer = torch.optim.Adam(list(backend.trainable_parameters()), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = (backend.velocity(x, sigma, cond) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(p.grad is None for n, p in backend.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        tuned = backend.velocity(x, sigma, cond)
        assert (tuned - base).abs().max() > 1e-3
        with backend.reference():
            assert torch.equal(backend.velocity(x, sigma, cond), base)
        assert torch.equal(backend.velocity(x, sigma, cond), tuned)
    # the adapters alone round-trip through a checkpoint
    state = backend.trainable_state_dict()
    assert sorted(state) == sorted(backend.lora_parameter_names())
    other = load(cls, model)
    other.load_trainable_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other.velocity(x, sigma, cond), tuned)


# ------------------------------------------------------------------------------ errors
def check_gym_make(env_id: str, model: str, latent_shape: tuple[int, ...]) -> None:
    """``gym.make(env_id)`` on the tiny model: one episode of small random actions, the reward terms at the end."""
    import gymnasium as gym

    env = gym.make(env_id, model=model, num_steps=2, prompts=PROMPTS, rewards={"jpeg_compressibility": 1.0},
                   resolution=RES, lora_rank=0, max_sequence_length=SEQ, device="cpu")
    obs, info = env.reset(seed=0)
    assert obs["latent"].shape == latent_shape and info["prompt"] in PROMPTS
    terminated = False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample() * 0.01)
    assert "jpeg_compressibility" in info["reward_terms"] and reward < 0


def check_errors(cls, tmp_path: Path, monkeypatch, hub_id: str) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotAvailableError) as info:
        cls.from_pretrained(str(missing), device="cpu")
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message and "hf download" in message
    assert "\n" not in message and info.value.__cause__ is None

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        cls.from_pretrained(hub_id, device="cpu")
    message = str(info.value)
    assert hub_id in message and "offline" in message and f"hf download {hub_id}" in message
    assert "\n" not in message and len(message) < 1000 and info.value.__suppress_context__

    with pytest.raises(ModelNotAvailableError, match="no tiny pipeline 'nope'; accepted"):
        cls.from_pretrained("tiny:nope", device="cpu")
    # a folder of another family is refused by name
    with pytest.raises(ModelNotAvailableError, match="holds a StableDiffusion3Pipeline"):
        cls.from_pretrained("tiny:sd3", device="cpu")


# ------------------------------------------------------------------------------ the trainer
def check_algos_run(env_name: str, tmp_path: Path) -> None:
    """``python -m algos.run env=<family>_tiny algo=flow_dppo``: 2 iterations, LoRA moves, evaluation runs."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", f"env={env_name}", "algo=flow_dppo", "reward=jpeg_compressibility",
         "trainer.iterations=2", "trainer.eval_every=2", "trainer.checkpoint_every=2", "logger.backends=[csv]",
         "device=cpu", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["num_updates"] >= 1 and row["num_pairs"] > 0, row
        assert torch.isfinite(torch.tensor(row["loss_objective"]))
    assert "eval/heldout/reward" in rows[-1] and "eval/train/drift_kl" in rows[-1]
    assert rows[2]["drift_kl"] > 0  # the second rollout came from the updated policy
    assert list((run_dir / "checkpoints").rglob("*.safetensors"))


def quiet(function: Callable[..., Any], *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)
