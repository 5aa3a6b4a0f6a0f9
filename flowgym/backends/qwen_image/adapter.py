"""Qwen-Image through diffusers: the ``"qwen_image"`` family adapter on ``DiffusersBackend``.

What is Qwen-Image's own, following diffusers' ``QwenImagePipeline`` (0.42); the rest is the shared base:

* Components: ``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage`` (a causal video VAE used
  on one frame), a ``Qwen2_5_VLForConditionalGeneration`` text encoder and its Qwen2 tokenizer.
  Default model: ``Qwen/Qwen-Image``.
* Prompt encoding: each prompt goes into the pipeline's template (a system turn asking to describe
  the image, the user turn, the assistant prefix); the last hidden state's valid tokens are kept
  and the template's first 34 tokens dropped (``prompt_template_encode_start_idx``), then at most
  ``max_sequence_length`` tokens remain. flowgym caches each prompt padded with zeros to
  ``max_sequence_length`` with a mask; before each transformer call the batch is trimmed to its
  longest prompt and the mask dropped when it is all ones, which is exactly what the pipeline feeds
  (it pads to the longest prompt of its batch).
* Latents: the env's latents are ``(z_dim, H/8, W/8)`` in the normalised latent space; ``pack`` is
  FLUX's 2 x 2 patch packing into ``4 z_dim``-channel tokens; ``img_shapes = [(1, h/2, w/2)]`` per
  sample gives the transformer its RoPE grid.
* Timestep: ``sigma`` (the pipeline's ``t / 1000``); no guidance embedding.
* Schedule: ``np.linspace(1, 1/K, K)`` through the scheduler with FLUX's ``calculate_shift`` mu on the
  packed token count (Qwen-Image's config: dynamic, ``max_image_seq_len`` 8192, ``max_shift`` 0.9,
  ``shift_terminal`` 0.02).
* Guidance: true CFG against the negative prompt ``" "`` (the model card's default), with the
  pipeline's norm rescaling: ``comb = v_neg + s (v_cond - v_neg)`` then ``comb * |v_cond| / |comb|``,
  norms taken per packed token over its channels (``combine_guidance``).
* Decode: ``latents * latents_std + latents_mean`` per channel, one frame through the VAE.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor

from flowgym.backends.base import register_backend
from flowgym.backends.diffusers import Component, DiffusersBackend
from flowgym.backends.lora import SD3_LORA_TARGETS
from flowgym.hub import module_device

__all__ = ["DEFAULT_QWEN_IMAGE_MODEL", "PROMPT_TEMPLATE", "PROMPT_TEMPLATE_DROP", "QWEN_IMAGE_LORA_TARGETS", "QwenImageBackend"]

DEFAULT_QWEN_IMAGE_MODEL = "Qwen/Qwen-Image"
#: the pipeline's ``prompt_template_encode`` and the number of its leading tokens dropped from the encoding
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34
#: the dual-stream joint attention's image and text projections (Flow-GRPO's SD3 targets); flowgym's choice
QWEN_IMAGE_LORA_TARGETS: tuple[str, ...] = SD3_LORA_TARGETS


@register_backend("qwen_image")
class QwenImageBackend(DiffusersBackend):
    """Qwen-Image (diffusers ``QwenImagePipeline``) as a flowgym backend; see the module docstring."""

    name = "qwen_image"
    env_id = "FlowDenoise-QwenImage-v0"
    what = "Qwen-Image model"
    env_defaults = {"num_steps": 10, "shift": None, "group_size": 1, "prompts": "pickscore_demo"}
    negative_prompt = " "
    pipeline_classes = ("QwenImagePipeline",)
    components = (
        Component("transformer", "diffusers", "QwenImageTransformer2DModel"),
        Component("vae", "diffusers", "AutoencoderKLQwenImage"),
        Component("text_encoder", "transformers", "Qwen2_5_VLForConditionalGeneration"),
        Component("tokenizer", "transformers", "AutoTokenizer", "tokenizer"),
    )
    default_model = DEFAULT_QWEN_IMAGE_MODEL
    default_lora_targets = QWEN_IMAGE_LORA_TARGETS
    default_max_sequence_length = 512
    max_sequence_length_limit = 1024
    timestep = "t/1000"
    sigma_inputs = "linspace"
    #: Qwen-Image's published scheduler settings, for a folder without scheduler/
    default_scheduler_config = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192,
                                "max_shift": 0.9, "shift": 1.0, "shift_terminal": 0.02,
                                "use_dynamic_shifting": True, "time_shift_type": "exponential"}
    text_encoder_names = ("text_encoder",)

    # ------------------------------------------------------------------ geometry and schedule
    @property
    def vae_scale_factor(self) -> int:
        """The pipeline's ``2 ** len(vae.temperal_downsample)`` (8 for Qwen-Image)."""
        return 2 ** len(self.vae.temperal_downsample)

    def latent_geometry(self, resolution: int) -> tuple[int, int, int]:
        self.check_resolution_multiple(resolution, self.vae_scale_factor * 2)
        side = resolution // self.vae_scale_factor
        return (int(self.vae.config.z_dim), side, side)

    @property
    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    # ------------------------------------------------------------------ packing
    def pack(self, latents: Tensor) -> Tensor:
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, tokens: Tensor) -> Tensor:
        b, _, channels = tokens.shape
        c, h, w = self.latent_shape
        x = tokens.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)

    def combine_guidance(self, v_neg: Tensor, v_cond: Tensor, guidance_scale: float) -> Tensor:
        """The pipeline's true CFG: the combination rescaled to the conditional prediction's norm, per token."""
        cond, neg = self.pack(v_cond), self.pack(v_neg)
        combined = neg + guidance_scale * (cond - neg)
        combined = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return self.unpack(combined)

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> TensorDict:
        """TensorDict(prompt_embeds (n, max_sequence_length, hidden), prompt_embeds_mask (n, max_sequence_length))."""
        self.check_encoders_available(prompts)
        texts = [PROMPT_TEMPLATE.format(prompt) for prompt in prompts]
        tokens = self.tokenizer(
            texts, max_length=1024 + PROMPT_TEMPLATE_DROP, padding=True, truncation=True, return_tensors="pt"
        )
        device = module_device(self.text_encoder)
        mask = tokens.attention_mask.to(device)
        with torch.no_grad():
            out = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        length = self.max_sequence_length
        embeds = hidden.new_zeros(len(prompts), length, hidden.shape[-1])
        valid = torch.zeros(len(prompts), length, dtype=torch.long)
        for i in range(len(prompts)):
            kept = hidden[i][mask[i].bool()][PROMPT_TEMPLATE_DROP:][:length]
            embeds[i, : kept.shape[0]] = kept
            valid[i, : kept.shape[0]] = 1
        return TensorDict(
            {"prompt_embeds": embeds.to(device=self.device, dtype=self.compute_dtype), "prompt_embeds_mask": valid.to(self.device)},
            batch_size=[len(prompts)], device=self.device,
        )

    # ------------------------------------------------------------------ transformer and VAE
    def transformer_inputs(self, hidden_states: Tensor, timestep: Tensor, cond: TensorDict, guidance: Tensor | None) -> dict[str, Any]:
        mask = cond["prompt_embeds_mask"]
        longest = max(int(mask.sum(dim=1).max()), 1)
        mask = mask[:, :longest]
        embeds = cond["prompt_embeds"][:, :longest].to(dtype=hidden_states.dtype)
        h, w = self.latent_shape[1] // 2, self.latent_shape[2] // 2
        return {
            "hidden_states": hidden_states,
            "timestep": timestep.to(hidden_states.dtype),
            "guidance": None,
            "encoder_hidden_states": embeds,
            "encoder_hidden_states_mask": None if bool(mask.all()) else mask,
            "img_shapes": [[(1, h, w)]] * hidden_states.shape[0],
        }

    def decode_latents(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        x = latents.unsqueeze(2) * std + mean
        return self.vae.decode(x, return_dict=False)[0][:, :, 0]
