"""``ComposeBackend``: the compose task's backend (see ``flowgym.backends.compose.model`` for the
conventions: image in [0, 1], latent = 2 image - 1 of shape ``(3, 32, 32)``, SD3 rectified flow,
the empty prompt as the unconditional input)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.backends.base import FlowBackend, register_backend
from flowgym.backends.compose import grammar
from flowgym.backends.lora import SD3_LORA_TARGETS, LoraAdapters, check_lora_rank
from flowgym.backends.weights import load_module, resolve_weights
from flowgym.backends.compose.model import (
    ComposeTextEncoder,
    ComposeTransformer,
    image_to_latent,
    latent_to_image,
    load_tokenizer,
    tokenize,
)
from flowgym.backends.sampling import sample_ode
from flowgym.hub import parse_dtype, resolve_device

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SHIFT",
    "FLOW_FILE",
    "METADATA_FILE",
    "TEXT_FILE",
    "TOKENIZER_FILE",
    "ComposeBackend",
    "sample_ode",
]

FLOW_FILE = "compose_flow.safetensors"
TEXT_FILE = "compose_text.safetensors"
TOKENIZER_FILE = "compose_tokenizer.json"
METADATA_FILE = "compose_pretrain.json"
#: schedule shift and CFG scale the shipped model is evaluated with (see compose_pretrain.json)
DEFAULT_SHIFT = 1.0
DEFAULT_GUIDANCE = 1.0
#: entries per category of "train_by_category": the largest train category (attribute binding)
TRAIN_PER_CATEGORY = 110


@register_backend("compose")
class ComposeBackend(FlowBackend):
    """Text-conditioned rectified flow over 32x32 RGB canvases of coloured digits on a 2x2 grid.

    ``weights``: ``None`` for the shipped model in ``flowgym/assets``, or a folder holding
    ``compose_flow.safetensors``, ``compose_text.safetensors`` and ``compose_tokenizer.json``.
    The velocity model (the policy) is the transformer; the text encoder is frozen and runs once per
    distinct prompt (cached by the base class). ``lora_rank=0`` (the default) trains the whole
    transformer against a frozen copy; ``lora_rank > 0`` trains peft LoRA adapters on SD3.5's
    targets (``lora_targets``) instead, with the adapters disabled as the reference, as the SD3
    family does. Prompt sets: ``"train"``, ``"heldout"`` and
    ``"all"`` (``flowgym.backends.compose.grammar``), plus category-balanced ``"train_balanced"``
    and ``"heldout_balanced"`` (8 prompts per category, seed 0), and ``"train_by_category"``
    (every train prompt, repeated so that each category is 1/6 of the list: the RL training set).
    """

    name = "compose"
    env_id = "FlowDenoise-Compose-v0"
    env_defaults = {"num_steps": 10, "shift": DEFAULT_SHIFT, "group_size": 8}
    latent_shape = (3, 32, 32)
    negative_prompt = ""
    scheduler_shift = DEFAULT_SHIFT

    def __init__(
        self,
        weights: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_targets: Sequence[str] = SD3_LORA_TARGETS,
    ) -> None:
        super().__init__()
        device, dtype = resolve_device(device), parse_dtype(dtype)  # a clear error before the weights load
        check_lora_rank(lora_rank)
        self.weights_path = resolve_weights(weights, FLOW_FILE)
        folder = self.weights_path.parent
        self.model = load_module(self.weights_path, ComposeTransformer).to(device=device, dtype=dtype).eval()
        self.text_encoder = (
            load_module(folder / TEXT_FILE, ComposeTextEncoder).to(device=device).eval().requires_grad_(False)
        )
        self.tokenizer = load_tokenizer(str(folder / TOKENIZER_FILE))
        self.lora = LoraAdapters(self.model.sd3, lora_rank, lora_alpha, lora_targets) if lora_rank else None
        if self.lora is None:
            self.snapshot_reference()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The pretrained model: LoRA adapters disabled, or the frozen copy of a full fine-tune."""
        if self.lora is None:
            with super().reference():
                yield
        else:
            with self.lora.disabled():
                yield

    # ------------------------------------------------------------------ hooks
    def prompt_sets(self) -> dict[str, list[str]]:
        sets = grammar.prompt_sets()
        sets["train_balanced"] = grammar.balanced_prompts(sets["train"], 8, seed=0)
        sets["heldout_balanced"] = grammar.balanced_prompts(sets["heldout"], 8, seed=0)
        # every train prompt, each category equally likely (as GenEval's categories are about equal
        # in size; "train" itself is half attribute-binding prompts)
        sets["train_by_category"] = grammar.balanced_prompts(sets["train"], TRAIN_PER_CATEGORY, seed=0)
        return sets

    def _encode(self, prompts: list[str]) -> TensorDict:
        for p in prompts:
            if p.strip():
                grammar.parse_prompt(p)  # ValueError naming the grammar for a prompt outside it
        ids = tokenize(self.tokenizer, prompts).to(self.text_encoder.clip.device)
        hidden, pooled = self.text_encoder(ids)
        return TensorDict(
            {"hidden": hidden.float().to(self.device), "pooled": pooled.float().to(self.device)},
            batch_size=[len(prompts)],
            device=self.device,
        )

    def _forward(self, latents: Tensor, sigma: Tensor, cond: TensorDict) -> Tensor:
        model = self.active_velocity_model()
        v = model(latents, sigma.to(latents.device), cond["hidden"].to(latents.device), cond["pooled"].to(latents.device))
        return v.to(latents.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        return latent_to_image(latents)

    def velocity_model(self) -> nn.Module:
        return self.model

    def default_rewards(self) -> dict[str, float]:
        return {"compose_partial": 1.0}

    def prior_capability_metrics(self, images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Strict score overall (``compose``) and per category (``compose/<category>``), the partial
        score, per-object digit confidence / precision, colour / cell / digit diversity, background
        cleanliness and ``compose_fd`` (``flowgym.backends.compose.scorer``)."""
        from flowgym.backends.compose.scorer import shipped_scorer

        return shipped_scorer().metrics(images, prompts)

    # ------------------------------------------------------------------ extras
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] ``(B, 3, 32, 32)`` -> latents (the inverse of ``decode`` on [0, 1])."""
        return image_to_latent(images.to(self.device, torch.float32))
