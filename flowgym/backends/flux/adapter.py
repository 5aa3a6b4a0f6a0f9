"""FLUX.1 (dev / schnell) through diffusers: the ``"flux"`` family adapter on ``DiffusersBackend``.

What is FLUX.1's own, following diffusers' ``FluxPipeline`` (0.42); the rest is the shared base:

* Components: ``FluxTransformer2DModel``, ``AutoencoderKL`` (16 channels), ``CLIPTextModel`` (pooled
  prompt embedding, 77 tokens) and ``T5EncoderModel`` (the token sequence) with their tokenizers.
  Default model: ``black-forest-labs/FLUX.1-dev``.
* Latents: the env's latents are the VAE's scaled latents ``(16, H/8, W/8)``; ``pack`` turns 2 x 2
  patches into 64-channel tokens ``(B, (h/2)(w/2), 4C)`` exactly as ``FluxPipeline._pack_latents``;
  image position ids ``(0, i, j)`` per patch, text ids zeros ``(L, 3)``.
* Timestep: ``sigma`` (the pipeline's ``t / 1000``).
* Schedule: ``np.linspace(1, 1/K, K)`` through the scheduler with FLUX's ``calculate_shift`` mu on the
  packed token count (dynamic shifting for dev; schnell's config has none: shift 1.0).
* Guidance: ``"embedded"`` when the transformer has a guidance embedding (FLUX.1-dev: the scale goes
  into the embedding, one forward, no negative prompt), else ``"distilled"`` (schnell: ignored).
* Decode: ``latents / scaling_factor + shift_factor`` through the VAE.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from tensordict import TensorDict
from torch import Tensor

from flowgym.backends.base import register_backend
from flowgym.backends.diffusers import Component, DiffusersBackend
from flowgym.backends.lora import SD3_LORA_TARGETS
from flowgym.hub import module_device

__all__ = ["DEFAULT_FLUX_MODEL", "FLUX_LORA_TARGETS", "FluxBackend"]

DEFAULT_FLUX_MODEL = "black-forest-labs/FLUX.1-dev"

#: Flow-GRPO's attention targets (those of SD3): in FLUX.1 they cover the double-stream blocks'
#: joint attention and the single-stream blocks' q / k / v
FLUX_LORA_TARGETS: tuple[str, ...] = SD3_LORA_TARGETS


@register_backend("flux")
class FluxBackend(DiffusersBackend):
    """FLUX.1-dev / FLUX.1-schnell (diffusers ``FluxPipeline``) as a flowgym backend; see the module docstring."""

    name = "flux"
    env_id = "FlowDenoise-FLUX-v0"
    what = "FLUX.1 model"
    env_defaults = {"num_steps": 10, "shift": None, "group_size": 1, "prompts": "pickscore_demo"}
    pipeline_classes = ("FluxPipeline",)
    components = (
        Component("transformer", "diffusers", "FluxTransformer2DModel"),
        Component("vae", "diffusers", "AutoencoderKL"),
        Component("text_encoder", "transformers", "CLIPTextModel"),
        Component("text_encoder_2", "transformers", "T5EncoderModel"),
        Component("tokenizer", "transformers", "CLIPTokenizer", "tokenizer"),
        Component("tokenizer_2", "transformers", "AutoTokenizer", "tokenizer"),
    )
    default_model = DEFAULT_FLUX_MODEL
    default_lora_targets = FLUX_LORA_TARGETS
    default_max_sequence_length = 512
    max_sequence_length_limit = 512
    timestep = "t/1000"
    sigma_inputs = "linspace"
    #: FLUX.1-dev's published scheduler settings, for a folder without scheduler/
    default_scheduler_config = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                                "max_shift": 1.15, "shift": 3.0, "use_dynamic_shifting": True}
    text_encoder_names = ("text_encoder", "text_encoder_2")

    # ------------------------------------------------------------------ geometry and schedule
    def latent_geometry(self, resolution: int) -> tuple[int, int, int]:
        self.check_resolution_multiple(resolution, self.vae_scale_factor * 2)
        side = resolution // self.vae_scale_factor
        return (int(self.transformer.config.in_channels) // 4, side, side)

    @property
    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    @property
    def guidance(self) -> Literal["cfg", "embedded", "distilled"]:
        return "embedded" if self.transformer.config.guidance_embeds else "distilled"

    # ------------------------------------------------------------------ packing and position ids
    def pack(self, latents: Tensor) -> Tensor:
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: Tensor) -> Tensor:
        b, _, channels = tokens.shape
        c, h, w = self.latent_shape
        x = tokens.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)

    def image_ids(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``((h/2)(w/2), 3)`` ids ``(0, row, column)`` of the packed patches, row-major."""
        h, w = self.latent_shape[1] // 2, self.latent_shape[2] // 2
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> TensorDict:
        """TensorDict(prompt_embeds (n, max_sequence_length, t5_dim), pooled_prompt_embeds (n, clip_dim))."""
        self.check_encoders_available(prompts)
        clip_ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        t5_ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            pooled = self.text_encoder(clip_ids.to(module_device(self.text_encoder)), output_hidden_states=False).pooler_output
            embeds = self.text_encoder_2(t5_ids.to(module_device(self.text_encoder_2)), output_hidden_states=False)[0]
        device, dtype = self.device, self.compute_dtype
        return TensorDict(
            {"prompt_embeds": embeds.to(device=device, dtype=dtype), "pooled_prompt_embeds": pooled.to(device=device, dtype=dtype)},
            batch_size=[len(prompts)], device=device,
        )

    # ------------------------------------------------------------------ transformer and VAE
    def transformer_inputs(self, hidden_states: Tensor, timestep: Tensor, cond: TensorDict, guidance: Tensor | None) -> dict[str, Any]:
        dtype, device = hidden_states.dtype, hidden_states.device
        embeds = cond["prompt_embeds"].to(dtype=dtype)
        return {
            "hidden_states": hidden_states,
            "timestep": timestep.to(dtype),
            "guidance": guidance,
            "pooled_projections": cond["pooled_prompt_embeds"].to(dtype=dtype),
            "encoder_hidden_states": embeds,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            "img_ids": self.image_ids(device, dtype),
        }

    def decode_latents(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        x = latents / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(x, return_dict=False)[0]
