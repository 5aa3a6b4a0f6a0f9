"""A tiny randomly initialised backend: for tests, overhead benchmarks and examples.

It has the full backend contract (prompt cache, CFG, reference, decode) but no pretrained
knowledge: prompts are hashed into a learned embedding table, the velocity model is a small MLP.
"""

from __future__ import annotations

import zlib

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.backends.base import FlowBackend, register_backend
from flowgym.hub import resolve_device

__all__ = ["ToyBackend"]


class _ToyVelocityNet(nn.Module):
    def __init__(self, numel: int, hidden: int, num_buckets: int) -> None:
        super().__init__()
        self.prompt_embedding = nn.Embedding(num_buckets, hidden)
        self.net = nn.Sequential(nn.Linear(numel + 1, hidden), nn.SiLU(), nn.Linear(hidden, numel))

    def forward(self, latents: Tensor, sigma: Tensor, bucket: Tensor) -> Tensor:
        flat = latents.flatten(1)
        h = self.net[0](torch.cat([flat, sigma[:, None].to(flat.dtype)], dim=1)) + self.prompt_embedding(bucket)
        return self.net[2](self.net[1](h)).view_as(latents)


@register_backend("toy")
class ToyBackend(FlowBackend):
    """Random MLP velocity model over latents of any shape; images are the latents squashed to [0, 1]."""

    name = "toy"
    env_id = "FlowDenoise-Toy-v0"
    env_defaults = {"num_steps": 10, "shift": 3.0, "group_size": 1}

    def __init__(
        self,
        latent_shape: tuple[int, ...] = (1, 4, 4),
        hidden: int = 64,
        num_buckets: int = 64,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        device = resolve_device(device)  # a CUDA device on a machine without CUDA: a clear ValueError
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.num_buckets = num_buckets
        numel = 1
        for d in self.latent_shape:
            numel *= d
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _ToyVelocityNet(numel, hidden, num_buckets)
        self.to(device)
        self.snapshot_reference()

    def prompt_sets(self) -> dict[str, list[str]]:
        train = [f"toy prompt {i}" for i in range(8)]
        return {"train": train, "heldout": [f"held-out toy prompt {i}" for i in range(4)], "all": train}

    def _encode(self, prompts: list[str]) -> TensorDict:
        # crc32 is stable across processes (Python's hash() is salted)
        buckets = [zlib.crc32(p.encode()) % self.num_buckets for p in prompts]
        return TensorDict({"bucket": torch.tensor(buckets, device=self.device)}, batch_size=[len(prompts)])

    def _forward(self, latents: Tensor, sigma: Tensor, cond: TensorDict) -> Tensor:
        return self.active_velocity_model()(latents, sigma, cond.get("bucket"))

    def decode(self, latents: Tensor) -> Tensor:
        images = torch.sigmoid(latents.float())
        return images if images.dim() == 4 else images.reshape(images.shape[0], 1, 1, -1)

    def velocity_model(self) -> nn.Module:
        return self.model
