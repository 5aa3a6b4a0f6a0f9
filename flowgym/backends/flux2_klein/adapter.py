"""FLUX.2-klein through diffusers: the ``"flux2_klein"`` family adapter on ``DiffusersBackend``.

The worked example of a family adapter: everything shared (loading, LoRA, the reference policy, the
prompt cache, guidance modes, decoding in chunks, the model's own sigma schedule) comes from
``flowgym.backends.diffusers``; this file declares the components and implements the six hooks
``latent_geometry``, ``image_seq_len``, ``pack`` / ``unpack``, ``_encode``, ``transformer_inputs`` and
``decode_latents`` (plus ``scheduler_mu`` and ``guidance``), following diffusers'
``Flux2KleinPipeline`` (0.42):

* Components: ``Flux2Transformer2DModel`` (the velocity model), ``AutoencoderKLFlux2``, a
  ``Qwen3ForCausalLM`` text encoder and its Qwen2 tokenizer. Default model: the paper's
  ``black-forest-labs/FLUX.2-klein-base-9B``.
* Latents: the env's latents are the pipeline's ``latents`` argument, already patchified:
  ``(in_channels, H / (2 vae_scale_factor), W / (2 vae_scale_factor))`` = ``(128, H/16, W/16)`` for the
  real model (32 VAE channels x 2 x 2 patches), *normalised* by the VAE's batch-norm statistics.
  Packing is one token per latent position, ``(B, C, h, w) -> (B, h w, C)``; image position ids
  ``(t, h, w, l) = (0, i, j, 0)``, text ids ``(0, 0, 0, k)``.
* Prompt encoding: the Qwen3 chat template (one user turn, generation prompt, ``enable_thinking=False``),
  padded to ``max_sequence_length`` (512 by default, as the pipeline), the hidden states of layers
  9, 18 and 27 stacked on the feature axis (``3 x hidden``: 12288 for the 9B model). No attention
  mask reaches the transformer (the pipeline passes none).
* Timestep: ``sigma`` (the pipeline's ``t / 1000``); no guidance embedding.
* Schedule: ``np.linspace(1, 1/K, K)`` sigmas through the scheduler with FLUX.2's *empirical* mu
  (``compute_empirical_mu``: a function of the image token count and of K), passed always.
* Guidance: true CFG against the empty prompt (the pipeline's convention, two branches combined as
  ``v_neg + s (v_cond - v_neg)``; flowgym batches them in one forward), or ``"distilled"`` for the
  step-distilled klein models (``is_distilled`` in ``model_index.json``: the scale is ignored).
* Decode: ``latents * sqrt(bn.running_var + eps) + bn.running_mean``, unpatchify 2 x 2, ``vae.decode``.
  ``vae_latents`` gives the de-normalised, unpatchified latents (the pipeline's ``output_type="latent"``).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from tensordict import TensorDict
from torch import Tensor

from flowgym.backends.base import register_backend
from flowgym.backends.diffusers import Component, DiffusersBackend
from flowgym.backends.lora import SD3_LORA_TARGETS
from flowgym.hub import module_device

__all__ = ["DEFAULT_FLUX2_KLEIN_MODEL", "FLUX2_LORA_TARGETS", "Flux2KleinBackend", "empirical_mu"]

DEFAULT_FLUX2_KLEIN_MODEL = "black-forest-labs/FLUX.2-klein-base-9B"

#: the joint attention projections of the double-stream blocks (Flow-GRPO's SD3 / FLUX.1 targets) and
#: the fused QKV + MLP input projection of the single-stream blocks. flowgym's choice: no published
#: FLUX.2 recipe names its targets.
FLUX2_LORA_TARGETS: tuple[str, ...] = (*SD3_LORA_TARGETS, "attn.to_qkv_mlp_proj")


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent ``mu`` (the pipeline's ``compute_empirical_mu``).

    Above 4300 image tokens: linear in the token count (``a2 n + b2``); below, linear in the step
    count between the 10-step line ``a1 n + b1`` and the 200-step line ``a2 n + b2``.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    at_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = a1 * image_seq_len + b1
    slope = (at_200 - at_10) / 190.0
    return float(slope * num_steps + at_200 - 200.0 * slope)


@register_backend("flux2_klein")
class Flux2KleinBackend(DiffusersBackend):
    """FLUX.2-klein (diffusers ``Flux2KleinPipeline``) as a flowgym backend; see the module docstring.

    Build it with ``Flux2KleinBackend.from_pretrained(model)`` (a hub id, a local folder, ``tiny:flux2_klein``).
    """

    name = "flux2_klein"
    env_id = "FlowDenoise-FLUX2Klein-v0"
    what = "FLUX.2-klein model"
    env_defaults = {"num_steps": 10, "shift": None, "group_size": 1, "prompts": "pickscore_demo"}
    pipeline_classes = ("Flux2KleinPipeline",)
    components = (
        Component("transformer", "diffusers", "Flux2Transformer2DModel"),
        Component("vae", "diffusers", "AutoencoderKLFlux2"),
        Component("text_encoder", "transformers", "Qwen3ForCausalLM"),
        Component("tokenizer", "transformers", "AutoTokenizer", "tokenizer"),
    )
    default_model = DEFAULT_FLUX2_KLEIN_MODEL
    default_lora_targets = FLUX2_LORA_TARGETS
    default_max_sequence_length = 512
    max_sequence_length_limit = 512
    timestep = "t/1000"
    sigma_inputs = "linspace"
    #: FLUX.2's published scheduler settings, used for a folder without scheduler/ (dynamic shift, mu from the pipeline)
    default_scheduler_config = {"shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
    text_encoder_names = ("text_encoder",)
    #: the Qwen3 hidden states the pipeline stacks (``text_encoder_out_layers``)
    hidden_states_layers: tuple[int, ...] = (9, 18, 27)

    # ------------------------------------------------------------------ geometry and schedule
    @property
    def patch_multiple(self) -> int:
        """Pixels per token: the VAE's downsampling times the 2 x 2 patchify."""
        return self.vae_scale_factor * 2

    def latent_geometry(self, resolution: int) -> tuple[int, int, int]:
        self.check_resolution_multiple(resolution, self.patch_multiple)
        side = resolution // self.patch_multiple
        return (int(self.transformer.config.in_channels), side, side)

    @property
    def image_seq_len(self) -> int:
        return self.latent_shape[1] * self.latent_shape[2]

    def scheduler_mu(self, image_seq_len: int, num_steps: int, config: Mapping[str, Any]) -> float:
        return empirical_mu(image_seq_len, num_steps)

    @property
    def guidance(self) -> Literal["cfg", "embedded", "distilled"]:
        return "distilled" if self.pipeline_config.get("is_distilled") else "cfg"

    # ------------------------------------------------------------------ packing and position ids
    def pack(self, latents: Tensor) -> Tensor:
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    def unpack(self, tokens: Tensor) -> Tensor:
        b, _, c = tokens.shape
        h, w = self.latent_shape[1:]
        return tokens.permute(0, 2, 1).reshape(b, c, h, w)

    def image_ids(self, device: torch.device) -> Tensor:
        """``(h w, 4)`` coordinates ``(t, h, w, l) = (0, i, j, 0)`` in row-major order (the transformer uses one row)."""
        h, w = self.latent_shape[1:]
        zero = torch.arange(1)
        return torch.cartesian_prod(zero, torch.arange(h), torch.arange(w), zero).to(device)

    @staticmethod
    def text_ids(length: int, device: torch.device) -> Tensor:
        """``(length, 4)`` coordinates ``(0, 0, 0, k)``."""
        zero = torch.arange(1)
        return torch.cartesian_prod(zero, zero, zero, torch.arange(length)).to(device)

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str]) -> TensorDict:
        """TensorDict(prompt_embeds (n, max_sequence_length, 3 x hidden)) as ``Flux2KleinPipeline.encode_prompt``."""
        self.check_encoders_available(prompts)
        tokenizer, encoder = self.tokenizer, self.text_encoder
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for prompt in prompts
        ]
        inputs = tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_sequence_length
        )
        encoder_device = module_device(encoder)
        with torch.no_grad():
            out = encoder(
                input_ids=inputs["input_ids"].to(encoder_device), attention_mask=inputs["attention_mask"].to(encoder_device),
                output_hidden_states=True, use_cache=False,
            )
            stacked = torch.stack([out.hidden_states[k] for k in self.hidden_states_layers], dim=1)
            n, layers, length, hidden = stacked.shape
            embeds = stacked.permute(0, 2, 1, 3).reshape(n, length, layers * hidden)
        return TensorDict(
            {"prompt_embeds": embeds.to(device=self.device, dtype=self.compute_dtype)},
            batch_size=[len(prompts)], device=self.device,
        )

    # ------------------------------------------------------------------ transformer and VAE
    def transformer_inputs(self, hidden_states: Tensor, timestep: Tensor, cond: TensorDict, guidance: Tensor | None) -> dict[str, Any]:
        embeds = cond["prompt_embeds"].to(dtype=hidden_states.dtype)
        device = hidden_states.device
        return {
            "hidden_states": hidden_states,
            "timestep": timestep.to(hidden_states.dtype),
            "guidance": None,
            "encoder_hidden_states": embeds,
            "txt_ids": self.text_ids(embeds.shape[1], device),
            "img_ids": self.image_ids(device),
        }

    def vae_latents(self, latents: Tensor) -> Tensor:
        """Env latents -> the VAE's latents ``(B, C / 4, 2h, 2w)``: batch-norm de-normalised, unpatchified
        (what the pipeline returns with ``output_type="latent"``)."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents.device, latents.dtype)
        x = latents * std + mean
        b, c, h, w = x.shape
        return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.vae.decode(self.vae_latents(latents), return_dict=False)[0]
