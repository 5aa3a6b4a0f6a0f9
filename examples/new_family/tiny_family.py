"""A model family added from outside the package: one backend class (this file) plus one env yaml
(``configs/env/tiny_family.yaml`` beside it). Nothing in flowgym is edited::

    PYTHONPATH=examples/new_family python -m algos.run env=tiny_family reward=jpeg_compressibility \\
        hydra.searchpath=[file://$PWD/examples/new_family/configs]

The yaml's ``module: tiny_family`` makes the trainer import this file, whose decorator registers the
family; its options (``env.backend.*``) are the constructor's keyword arguments.

The model is a deliberately small random MLP: a real family would load its pretrained weights in
``__init__`` (through ``flowgym.hub`` for a hub id or a local folder) and decode through its VAE.
"""

from __future__ import annotations

import zlib

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.backends.base import FlowBackend, register_backend


class TinyVelocityNet(nn.Module):
    """``v = MLP([x, sigma]) + embedding(prompt bucket)`` over flattened latents."""

    def __init__(self, numel: int, hidden: int, buckets: int) -> None:
        super().__init__()
        self.inp = nn.Linear(numel + 1, hidden)
        self.prompt = nn.Embedding(buckets, hidden)
        self.out = nn.Linear(hidden, numel)

    def forward(self, x: Tensor, sigma: Tensor, bucket: Tensor) -> Tensor:
        h = self.inp(torch.cat([x.flatten(1), sigma[:, None].to(x.dtype)], dim=1)) + self.prompt(bucket)
        return self.out(torch.nn.functional.silu(h)).view_as(x)


@register_backend("tiny_family")
class TinyFamilyBackend(FlowBackend):
    """3 x 8 x 8 latents decoded by a sigmoid; prompts hashed into 16 buckets."""

    name = "tiny_family"
    env_id = "FlowDenoise-TinyFamily-v0"
    env_defaults = {"num_steps": 6, "shift": 1.0, "group_size": 4}
    latent_shape = (3, 8, 8)
    buckets = 16

    def __init__(self, hidden: int = 32, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.model = TinyVelocityNet(3 * 8 * 8, hidden, self.buckets)
        torch.random.set_rng_state(generator_state)
        self.to(device)
        self.snapshot_reference()

    def prompt_sets(self) -> dict[str, list[str]]:
        return {"train": [f"a tiny picture {i}" for i in range(4)], "heldout": ["a tiny held-out picture"]}

    def _encode(self, prompts: list[str]) -> TensorDict:
        buckets = torch.tensor([zlib.crc32(p.encode()) % self.buckets for p in prompts], device=self.device)
        return TensorDict({"bucket": buckets}, batch_size=[len(prompts)], device=self.device)

    def _forward(self, latents: Tensor, sigma: Tensor, cond: TensorDict) -> Tensor:
        return self.active_velocity_model()(latents, sigma, cond.get("bucket"))

    def decode(self, latents: Tensor) -> Tensor:
        return torch.sigmoid(latents.float())

    def velocity_model(self) -> nn.Module:
        return self.model

    def prior_capability_metrics(self, images: Tensor, prompts) -> dict[str, float]:
        # a family's own forgetting metrics: here, how far the mean colour drifts from grey
        return {"mean_brightness": float(images.mean())}
