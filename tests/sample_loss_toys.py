"""Shared set-up of the per-sample loss tests (DiffusionNFT, AWM): a toy rollout turned into the
per-sample rows the trainer builds, a LoRA-like toy backend, and the (sample, timestep) rows
written out independently of ``SampleLoss.rows``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import TensorDict
from torch import nn

from flowgym.backends.toy import ToyBackend
from flowgym.env import FlowDenoiseEnv
from flowgym.policy import FlowPolicy
from flowgym.rewards import Reward, register_reward

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
# the small complete run of tests/test_trainer.py: 2 prompts x 4 samples, 4 steps, eval / checkpoint every 2
SMALL = [
    "env.num_prompts=2",
    "env.group_size=4",
    "env.num_steps=4",
    "env.stochastic_steps=[0,1]",
    "env.eval_samples_per_prompt=1",
    "trainer.eval_every=2",
    "trainer.checkpoint_every=2",
    "logger.backends=[csv]",
    "device=cpu",
]
NUM_STEPS = 4


def run_config(algo: str, *overrides: str) -> dict:
    """The resolved ``algos.run`` config of ``algo=<algo>`` at the SMALL size."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"algo={algo}", *SMALL, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall times, for run-vs-run equality."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@register_reward("test_sample_loss_brightness")
class _Brightness(Reward):
    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


class AdapterToy(ToyBackend):
    """The ToyBackend with LoRA's semantics: frozen base weights, a trainable low-rank additive
    adapter (B = 0 at the start), and the reference policy = the adapter switched off."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model.requires_grad_(False)
        numel = 1
        for d in self.latent_shape:
            numel *= d
        g = torch.Generator().manual_seed(7)
        self.adapter_a = nn.Parameter(0.3 * torch.randn(numel, 2, generator=g))
        self.adapter_b = nn.Parameter(torch.zeros(2, numel))
        self.adapter_off = False

    def _forward(self, latents, sigma, cond):
        v = super()._forward(latents, sigma, cond)
        if self.adapter_off:
            return v
        return v + (latents.flatten(1) @ self.adapter_a @ self.adapter_b).view_as(latents)

    def trainable_parameters(self):
        yield self.adapter_a
        yield self.adapter_b

    @contextlib.contextmanager
    def reference(self):
        previous, self.adapter_off = self.adapter_off, True
        try:
            yield
        finally:
            self.adapter_off = previous


def rollout_samples(backend: ToyBackend | None = None, seed: int = 0):
    """An ODE policy, one rollout, and its per-sample rows as the trainer builds them."""
    backend = backend or ToyBackend(latent_shape=(1, 4, 4), seed=seed)
    env = FlowDenoiseEnv(backend, num_prompts=2, group_size=4, num_steps=NUM_STEPS, stochastic_steps="none",
                         rewards={"test_sample_loss_brightness": 1.0}, seed=seed)
    policy = FlowPolicy(backend, kernel="ode", seed=seed)
    with torch.no_grad():
        traj = env.rollout(NUM_STEPS, policy)
    reward = traj["next", "reward"][:, -1, 0]
    advantage = (reward - reward.mean()) / (reward.std() + 1e-4)
    B = traj.batch_size[0]
    samples = TensorDict(
        {"sample": traj["action"][:, -1], "sigmas": traj["sigma"], "advantage": advantage,
         "conditioning": traj["conditioning"][:, 0], "sample_index": torch.arange(B)},
        batch_size=[B],
    )
    return policy, samples


def perturb(policy: FlowPolicy, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def sample_rows(samples: TensorDict):
    """(x0, eps, t, x_t, conditioning) of the (sample, timestep) rows, sample-major, written out here."""
    n, T = samples["sigma"].shape
    x0 = samples["sample"].repeat_interleave(T, dim=0)
    eps = samples["noise"].flatten(0, 1)
    t = samples["sigma"].reshape(-1)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    cond = samples["conditioning"][torch.arange(n).repeat_interleave(T)]
    return x0, eps, t, x_t, cond
