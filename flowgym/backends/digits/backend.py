"""``DigitsBackend``: the embedded default task's backend (see ``flowgym.backends.digits.core`` for the
conventions: image in [0, 1], latent = 2 image - 1, prompts naming one digit, label 10 unconditional)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.backends.base import FlowBackend, register_backend
from flowgym.backends.digits.core import (
    DEFAULT_SHIFT,
    FLOW_FILE,
    DigitVelocityNet,
    digit_prompt,
    image_to_latent,
    latent_to_image,
    load_module,
    prompt_digits,
    resolve_weights,
)
from flowgym.backends.digits.metrics import digits_prior_capability
from flowgym.backends.sampling import sample_ode
from flowgym.hub import parse_dtype, resolve_device

__all__ = ["DigitsBackend", "sample_ode"]


# =========================================================================== backend
@register_backend("digits")
class DigitsBackend(FlowBackend):
    """Class-conditional rectified flow over 8x8 digits (latent = image in [-1, 1], ``(1, 8, 8)``).

    ``weights``: ``None`` for the shipped model in ``flowgym/assets``, a folder holding
    ``digits_flow.safetensors``, or the path of such a file. Prompt sets: ``"train"`` (digits 0-4,
    what RL trains on), ``"heldout"`` (digits 5-9, where forgetting is measured) and ``"all"``.
    """

    name = "digits"
    env_id = "FlowDenoise-Digits-v0"
    env_defaults = {"num_steps": 10, "shift": DEFAULT_SHIFT, "group_size": 8}
    latent_shape = (1, 8, 8)
    negative_prompt = ""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__()
        device, dtype = resolve_device(device), parse_dtype(dtype)  # a clear error before the weights load
        self.weights_path = resolve_weights(weights, FLOW_FILE)
        self.model = load_module(self.weights_path, DigitVelocityNet).to(device=device, dtype=dtype)
        self.model.eval()
        self.snapshot_reference()

    # ------------------------------------------------------------------ hooks
    def prompt_sets(self) -> dict[str, list[str]]:
        return {
            "train": [digit_prompt(d) for d in range(0, 5)],
            "heldout": [digit_prompt(d) for d in range(5, 10)],
            "all": [digit_prompt(d) for d in range(10)],
        }

    def _encode(self, prompts: list[str]) -> TensorDict:
        labels = prompt_digits(prompts, allow_empty=True).to(self.device)
        return TensorDict({"label": labels}, batch_size=[len(prompts)], device=self.device)

    def _forward(self, latents: Tensor, sigma: Tensor, cond: TensorDict) -> Tensor:
        model = self.active_velocity_model()
        label = cond["label"].to(latents.device)
        v = model(latents, sigma.to(latents.device), label)
        return v.to(latents.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        return latent_to_image(latents)

    def velocity_model(self) -> nn.Module:
        return self.model

    def default_rewards(self) -> dict[str, float]:
        return {"digit_alignment": 1.0}

    def prior_capability_metrics(self, images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """``digit_accuracy`` and ``digit_fd`` (``flowgym.backends.digits.metrics``)."""
        return digits_prior_capability(images, prompts)

    # ------------------------------------------------------------------ extras
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] ``(B, 1, 8, 8)`` -> latents (the inverse of ``decode`` on [0, 1])."""
        return image_to_latent(images.to(self.device, torch.float32))
