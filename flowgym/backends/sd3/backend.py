"""Stable Diffusion 3 / 3.5 through diffusers: the ``"sd3"`` family adapter on ``DiffusersBackend``.

``SD3Backend.from_pretrained(model)`` takes a hub id (default ``stabilityai/stable-diffusion-3.5-medium``)
or a local folder in the diffusers layout (or ``tiny:sd3``) and loads the ``StableDiffusion3Pipeline``
components one by one: ``SD3Transformer2DModel`` (the velocity model), ``AutoencoderKL`` and the
three text encoders (two CLIP, one optional T5) with their tokenizers. Nothing runs remote code.
Loading, LoRA, the reference policy, the prompt cache and decoding are the shared ones
(``flowgym.backends.diffusers``); this file holds what is SD3's own.

Conventions (those of diffusers' ``StableDiffusion3Pipeline``):

* ``_forward(latents, sigma, cond)`` runs only the transformer with ``timestep = 1000 * sigma``
  (``FlowMatchEulerDiscreteScheduler`` timesteps are ``sigma * num_train_timesteps``) and returns
  the velocity ``v ≈ eps - x_data`` in the dtype of ``latents``; no packing (the transformer
  patchifies itself).
* Schedule: ``set_timesteps(K)`` without custom sigmas (the static shift applied twice, as diffusers
  does); with ``use_dynamic_shifting`` the pipeline's mu on ``(h / patch) * (w / patch)`` tokens.
* Prompt encoding: CLIP-L and CLIP-G penultimate hidden states (77 tokens each, concatenated on
  the feature axis and zero-padded to the T5 width) followed by ``max_sequence_length`` T5
  tokens; pooled = ``concat(CLIP-L text_embeds, CLIP-G text_embeds)``. Without T5 the T5 part is
  zeros, exactly as diffusers does when ``text_encoder_3=None``.
* ``decode``: ``latents / scaling_factor + shift_factor`` through the VAE; images ``(x + 1) / 2``
  clamped to [0, 1], float32.
* ``latent_shape = (in_channels, resolution // vae_scale_factor, resolution // vae_scale_factor)``.
* Guidance: true CFG with the negative prompt ``""`` (one batched forward).

dtypes: bfloat16 by default on CUDA (float16 accepted), float32 on CPU; half precision on CPU is
rejected (``ValueError``). LoRA weights are kept in float32 (``trainable_dtype``) while the frozen
base runs in bf16/fp16, the usual mixed-precision LoRA recipe.

Reference policy: with LoRA, ``reference()`` disables the adapters (no second copy of the model);
with ``full_finetune=True`` a frozen copy is taken by ``snapshot_reference()`` when the backend is
built (twice the transformer's memory).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.backends.base import register_backend
from flowgym.backends.diffusers import Component, DiffusersBackend, calculate_shift
from flowgym.backends.lora import SD3_LORA_TARGETS
from flowgym.hub import module_device, resolve_device, resolve_dtype

__all__ = ["DEFAULT_SD3_MODEL", "SD3_LORA_TARGETS", "SD3Backend"]

DEFAULT_SD3_MODEL = "stabilityai/stable-diffusion-3.5-medium"


@register_backend("sd3")
class SD3Backend(DiffusersBackend):
    """Stable Diffusion 3 / 3.5 (diffusers) as a flowgym backend.

    Build it with ``SD3Backend.from_pretrained(...)``; the constructor takes already-loaded
    components. Trainable parameters: the LoRA adapters (``lora_rank > 0``), the whole transformer
    (``full_finetune=True``) or nothing (``lora_rank=0``: a frozen model, its own reference).
    """

    name = "sd3"
    env_id = "FlowDenoise-SD3-v0"
    what = "Stable Diffusion 3 model"
    # shift None = the model's own scheduler shift (3.0 for SD3.5)
    env_defaults = {"num_steps": 10, "shift": None, "group_size": 1, "prompts": "pickscore_demo"}
    pipeline_classes = ("StableDiffusion3Pipeline",)
    components = (
        Component("transformer", "diffusers", "SD3Transformer2DModel"),
        Component("vae", "diffusers", "AutoencoderKL"),
        Component("text_encoder", "transformers", "CLIPTextModelWithProjection"),
        Component("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
        Component("text_encoder_3", "transformers", "T5EncoderModel", required=False),
        Component("tokenizer", "transformers", "CLIPTokenizer", "tokenizer"),
        Component("tokenizer_2", "transformers", "CLIPTokenizer", "tokenizer"),
        Component("tokenizer_3", "transformers", "AutoTokenizer", "tokenizer", required=False),
    )
    default_model = DEFAULT_SD3_MODEL
    default_lora_targets = SD3_LORA_TARGETS
    default_max_sequence_length = 256
    max_sequence_length_limit = 512
    timestep = "t"
    sigma_inputs = "scheduler"
    default_scheduler_config = {"shift": 3.0}
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        text_encoder_2: nn.Module,
        tokenizer_2,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3=None,
        *,
        resolution: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] = SD3_LORA_TARGETS,
        full_finetune: bool = False,
        max_sequence_length: int = 256,
        trainable_dtype: torch.dtype | None = torch.float32,
        gradient_checkpointing: bool = False,
        scheduler_shift: float = 3.0,
        scheduler_config: Mapping[str, Any] | None = None,
        pipeline_config: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        decode_batch_size: int | None = 8,
    ) -> None:
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 must be given together (or both None)")
        components = {
            "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "text_encoder_3": text_encoder_3, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "tokenizer_3": tokenizer_3,
        }
        if scheduler_config is None:
            scheduler_config = {"shift": float(scheduler_shift)}
        super().__init__(
            components, resolution=resolution, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
            full_finetune=full_finetune, max_sequence_length=max_sequence_length, trainable_dtype=trainable_dtype,
            gradient_checkpointing=gradient_checkpointing, scheduler_config=scheduler_config,
            pipeline_config=pipeline_config, model_id=model_id, decode_batch_size=decode_batch_size,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_SD3_MODEL,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        resolution: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] = SD3_LORA_TARGETS,
        full_finetune: bool = False,
        max_sequence_length: int = 256,
        local_files_only: bool | None = None,
        load_t5: bool = True,
        trainable_dtype: torch.dtype | None = torch.float32,
        gradient_checkpointing: bool = False,
        revision: str | None = None,
        decode_batch_size: int | None = 8,
    ) -> "SD3Backend":
        """Load SD3 / SD3.5 from a hub id or a local diffusers folder.

        ``dtype``: ``None`` -> bfloat16 on CUDA, float32 on CPU (half on CPU is rejected).
        ``device``: ``None`` -> CUDA if available. ``lora_rank=0`` with ``full_finetune=False``
        gives a frozen model; ``full_finetune=True`` trains every transformer weight in ``dtype``
        and ignores the LoRA arguments. ``trainable_dtype`` is the dtype of the LoRA weights
        (float32 by default; ``None`` keeps ``dtype``).
        ``load_t5=False`` skips the T5 encoder (zeros in its place, as diffusers does when it is
        absent; saves ~9 GB for SD3.5). ``local_files_only=None`` follows ``HF_HUB_OFFLINE``.
        ``decode_batch_size``: images per VAE call (None: one call, the fastest where it fits).
        A model that is not available raises ``ModelNotAvailableError`` (a ``FileNotFoundError``).
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        skip = () if load_t5 else ("text_encoder_3", "tokenizer_3")
        parts, pipeline_config, scheduler_config = cls.read_pretrained(
            model, dtype=dtype, local_files_only=local_files_only, revision=revision, skip=skip
        )
        if (parts["text_encoder_3"] is None) != (parts["tokenizer_3"] is None):
            parts["text_encoder_3"] = parts["tokenizer_3"] = None  # T5 needs both; diffusers then feeds zeros
        backend = cls(
            parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
            parts["text_encoder_2"], parts["tokenizer_2"], parts["text_encoder_3"], parts["tokenizer_3"],
            resolution=resolution, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
            full_finetune=full_finetune, max_sequence_length=max_sequence_length, trainable_dtype=trainable_dtype,
            gradient_checkpointing=gradient_checkpointing, scheduler_config=scheduler_config or {"shift": 3.0},
            pipeline_config=pipeline_config, model_id=os.fspath(model), decode_batch_size=decode_batch_size,
        )
        return backend.to(device)

    from_config = from_pretrained

    # ------------------------------------------------------------------ geometry and schedule
    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    def latent_geometry(self, resolution: int) -> tuple[int, int, int]:
        """``(in_channels, resolution / vae_scale_factor, same)``; the position embedding bounds the size."""
        self.check_resolution_multiple(resolution, self.vae_scale_factor * self.patch_size)
        latent_side = resolution // self.vae_scale_factor
        max_side = int(self.transformer.config.pos_embed_max_size or 0) * self.patch_size
        if max_side and latent_side > max_side:
            raise ValueError(
                f"resolution {resolution} needs {latent_side // self.patch_size} patches a side; this transformer's "
                f"position embedding holds at most {max_side // self.patch_size} (resolution <= "
                f"{max_side * self.vae_scale_factor})"
            )
        return (int(self.transformer.config.in_channels), latent_side, latent_side)

    @property
    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // self.patch_size) * (self.latent_shape[2] // self.patch_size)

    def scheduler_mu(self, image_seq_len: int, num_steps: int, config: Mapping[str, Any]) -> float:
        """SD3's pipeline: ``calculate_shift`` with its own default ``max_shift`` of 1.16."""
        return calculate_shift(image_seq_len, config, max_shift_default=1.16)

    # ------------------------------------------------------------------ prompts
    @property
    def has_t5(self) -> bool:
        return self.text_encoder_3 is not None

    def _clip_embeds(self, prompts: list[str], index: int) -> tuple[Tensor, Tensor]:
        tokenizer = (self.tokenizer, self.tokenizer_2)[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids.to(module_device(encoder)), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _t5_embeds(self, prompts: list[str]) -> Tensor:
        if self.text_encoder_3 is None:
            width = int(self.transformer.config.joint_attention_dim)
            return torch.zeros(len(prompts), self.max_sequence_length, width)
        ids = self.tokenizer_3(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids
        return self.text_encoder_3(ids.to(module_device(self.text_encoder_3)))[0]

    def _encode(self, prompts: list[str]) -> TensorDict:
        """TensorDict(prompt_embeds (n, 77 + max_sequence_length, joint_dim), pooled_prompt_embeds (n, 2 * proj))."""
        self.check_encoders_available(prompts)
        device, dtype = self.device, self.compute_dtype
        with torch.no_grad():
            clip_l, pooled_l = self._clip_embeds(prompts, 0)
            clip_g, pooled_g = self._clip_embeds(prompts, 1)
            clip = torch.cat([clip_l.to(device), clip_g.to(device)], dim=-1)
            t5 = self._t5_embeds(prompts).to(device=device, dtype=clip.dtype)
            clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            prompt_embeds = torch.cat([clip, t5], dim=-2).to(dtype)
            pooled = torch.cat([pooled_l.to(device), pooled_g.to(device)], dim=-1).to(dtype)
        return TensorDict(
            {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}, batch_size=[len(prompts)], device=device
        )

    # ------------------------------------------------------------------ transformer and VAE
    def transformer_inputs(self, hidden_states: Tensor, timestep: Tensor, cond: TensorDict, guidance: Tensor | None) -> dict[str, Any]:
        dtype = hidden_states.dtype
        return {
            "hidden_states": hidden_states,
            "timestep": timestep,
            "encoder_hidden_states": cond["prompt_embeds"].to(dtype=dtype),
            "pooled_projections": cond["pooled_prompt_embeds"].to(dtype=dtype),
        }

    def decode_latents(self, latents: Tensor) -> Tensor:
        """``vae.decode(latents / scaling_factor + shift_factor)``."""
        config = self.vae.config
        x = latents / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(x, return_dict=False)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, t5={self.has_t5}"
