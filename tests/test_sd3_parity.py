"""SD3 on the shared diffusers base reproduces the SD3 backend it replaced, bit for bit.

``tests/legacy/sd3_backend_v1.py`` is a frozen copy of ``flowgym/backends/sd3/backend.py`` from
before the move onto ``flowgym.backends.diffusers`` (written before the refactor, as its oracle).
Both load the same tiny offline SD3 pipeline; every tensor of an episode (latents, log-probs,
conditioning, rewards, decoded images) must be *equal*, not close, for every kernel, with and
without CFG, with perturbed LoRA weights and under ``reference()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flowgym.backends.sd3 import SD3Backend
from flowgym.registration import make_env
from flowgym.testing.tiny_sd3 import save_tiny_sd3

sys.path.insert(0, str(Path(__file__).resolve().parent / "legacy"))
from sd3_backend_v1 import LegacySD3Backend  # noqa: E402

RES = 16
OPTIONS = {"resolution": RES, "lora_rank": 4, "lora_alpha": 8, "max_sequence_length": 8, "device": "cpu"}
PROMPTS = ["a red cube on a table", "two cats", "a lighthouse at night"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_parity"), seed=0))


def perturb(backend, seed: int = 1) -> None:
    """Move the LoRA weights off zero, identically in both backends (same names, same order)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(backend.transformer.named_parameters())
    with torch.no_grad():
        for name in backend.lora_parameter_names():
            params[name].add_(0.1 * torch.randn(params[name].shape, generator=g))


@pytest.fixture(scope="module")
def pair(tiny_path):
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    new = SD3Backend.from_pretrained(tiny_path, **OPTIONS)
    torch.manual_seed(0)
    old = LegacySD3Backend.from_pretrained(tiny_path, **OPTIONS)
    perturb(new), perturb(old)
    return new, old


def episode(backend, kernel: str, guidance: float, reference: bool = False):
    env = make_env("sd3", backend=backend, num_prompts=2, group_size=2, num_steps=3, prompts=PROMPTS,
                   rewards={"jpeg_compressibility": 1.0}, seed=0,
                   stochastic_steps="none" if kernel == "ode" else "all_but_last")
    policy = env.make_policy(seed=0, kernel=kernel, guidance_scale=guidance)
    with torch.no_grad():
        if reference:
            with backend.reference():
                td = env.rollout(env.num_steps, policy)
        else:
            td = env.rollout(env.num_steps, policy)
    return env, td


def test_same_structure_and_trainable_weights(pair):
    new, old = pair
    assert new.latent_shape == old.latent_shape and new.scheduler_shift == old.scheduler_shift
    assert new.lora_parameter_names() == old.lora_parameter_names()
    a, b = new.trainable_state_dict(), old.trainable_state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in old.named_parameters()]


@pytest.mark.parametrize("kernel, guidance", [("flow_sde", 1.0), ("cps", 4.5), ("dance_sde", 1.0), ("ode", 2.0)])
def test_episode_is_bit_identical(pair, kernel, guidance):
    (env_new, new), (env_old, old) = episode(pair[0], kernel, guidance), episode(pair[1], kernel, guidance)
    assert torch.equal(env_new.sigmas, env_old.sigmas) and env_new.shift == env_old.shift
    keys = sorted(old.keys(True, True), key=str)
    assert sorted(new.keys(True, True), key=str) == keys
    for key in keys:
        if isinstance(old.get(key), torch.Tensor):
            assert torch.equal(new.get(key), old.get(key)), key
    assert torch.equal(env_new.last_images, env_old.last_images)


def test_reference_episode_is_bit_identical(pair):
    (_, new), (_, old) = episode(pair[0], "flow_sde", 1.0, reference=True), episode(pair[1], "flow_sde", 1.0, reference=True)
    assert torch.equal(new.get(("next", "latent")), old.get(("next", "latent")))


def test_gradients_are_bit_identical(pair):
    new, old = pair
    grads = []
    for backend in (new, old):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, *backend.latent_shape, generator=g)
        cond = backend.encode_prompts(["two cats", "a red cube on a table"])
        backend.zero_grad(set_to_none=True)
        backend.velocity(x, torch.tensor([0.9, 0.4]), cond, guidance_scale=3.0).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in backend.transformer.named_parameters() if p.grad is not None})
        backend.zero_grad(set_to_none=True)
    assert list(grads[0]) == list(grads[1])
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
