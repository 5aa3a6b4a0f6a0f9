"""Random tiny pipelines of the real diffusers / transformers classes, built offline: model source ``tiny``.

``tiny_pipeline_path("flux2_klein")`` (or ``model="tiny:flux2_klein"`` anywhere a model is accepted,
once this module is imported; ``flowgym.hub`` imports it on the first ``tiny:`` lookup) returns a
folder in the diffusers layout (``model_index.json``, ``scheduler/scheduler_config.json`` with the
family's real schedule settings, one sub-folder of safetensors weights per component) written by the
pipeline's own ``save_pretrained``. The folder is built on first use (a few seconds) into a cache
folder (``$FLOWGYM_TINY_CACHE``, else ``~/.cache/flowgym/tiny_pipelines``), keyed by the family, a
format version and the diffusers / transformers versions, and reused afterwards. Weights are
deterministic (seed 0) and the global RNG is left untouched.

Families (``TINY_FAMILIES``):

* ``sd3``: ``flowgym.testing.tiny_sd3.save_tiny_sd3`` (StableDiffusion3Pipeline, static shift 3.0).
* ``flux`` (FLUX.1-dev-like): ``FluxPipeline`` with ``CLIPTextModel`` (pooled 16) + ``T5EncoderModel``
  (d_model 32), a ``FluxTransformer2DModel`` with ``guidance_embeds=True`` (1 double + 1 single block),
  an ``AutoencoderKL`` with FLUX.1's scaling / shift factors; FLUX.1-dev's dynamic-shift scheduler.
* ``flux_schnell``: the same without the guidance embedding and with FLUX.1-schnell's scheduler
  (static shift 1.0, no dynamic shifting): a step-distilled model (guidance ``"distilled"``).
* ``flux2_klein`` (FLUX.2-klein-base-like): ``Flux2KleinPipeline`` with a 28-layer ``Qwen3ForCausalLM``
  (hidden 16: the pipeline stacks hidden states 9, 18, 27 -> joint dim 48), a ``Flux2Transformer2DModel``
  without guidance embedding, an ``AutoencoderKLFlux2`` whose batch-norm statistics are random (so the
  de-normalisation in decode is tested), ``is_distilled=False`` (true CFG); FLUX.2's dynamic scheduler.
* ``flux2_klein_distilled``: the same with ``is_distilled=True`` (guidance ignored, as FLUX.2-klein-4B/9B).
* ``qwen_image``: ``QwenImagePipeline`` with a tiny ``Qwen2_5_VLForConditionalGeneration`` (text hidden
  16) and the Qwen tokenizer of ``tiny_tokenizers`` (its template prefix is 34 tokens, as the
  pipeline's drop index expects), a ``QwenImageTransformer2DModel``, an ``AutoencoderKLQwenImage``
  (z_dim 4, random ``latents_mean`` / ``latents_std``); Qwen-Image's dynamic scheduler with
  ``shift_terminal`` 0.02.

Every VAE here downsamples by 2 (``vae_scale_factor`` 2), so resolution 32 gives 16 x 16 latents
(8 x 8 = 64 image tokens after 2 x 2 packing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from flowgym.hub import register_model_source
from flowgym.testing.tiny_sd3 import fill_zero_parameters, save_tiny_sd3, tiny_clip_tokenizer, tiny_t5_tokenizer
from flowgym.testing.tiny_tokenizers import QWEN3_CHAT_TEMPLATE, tiny_qwen_tokenizer

__all__ = [
    "FORMAT_VERSION",
    "SCHEDULER_CONFIGS",
    "TINY_FAMILIES",
    "save_tiny_flux",
    "save_tiny_flux2_klein",
    "save_tiny_qwen_image",
    "tiny_cache_dir",
    "tiny_pipeline_path",
]

#: bumped whenever a builder changes, so that stale cached folders are not reused
FORMAT_VERSION = 1

#: the schedule settings of the real models' ``scheduler/scheduler_config.json`` (the keys that differ
#: from ``FlowMatchEulerDiscreteScheduler``'s defaults), written into the tiny folders
SCHEDULER_CONFIGS: dict[str, dict] = {
    # black-forest-labs/FLUX.1-dev
    "flux": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "shift": 3.0, "use_dynamic_shifting": True},
    # black-forest-labs/FLUX.1-schnell
    "flux_schnell": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "shift": 1.0, "use_dynamic_shifting": False},
    # black-forest-labs/FLUX.2-klein-base-9B (the pipeline passes its own empirical mu; the base / max keys
    # are those of the published config and unused by Flux2KleinPipeline)
    "flux2_klein": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                    "shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "exponential"},
    # Qwen/Qwen-Image
    "qwen_image": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                   "shift": 1.0, "shift_terminal": 0.02, "use_dynamic_shifting": True,
                   "time_shift_type": "exponential"},
}


def _scheduler(family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[family])


def _clip_text_model(tokenizer, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _randomise_buffers(vae: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics (a fresh BatchNorm has mean 0 / var 1: de-normalising is then a no-op)."""
    for module in vae.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.5)
            module.running_var.uniform_(0.5, 2.0)


def save_tiny_flux(path: str | Path, *, schnell: bool = False, seed: int = 0) -> Path:
    """A tiny ``FluxPipeline`` (FLUX.1-dev-like, or FLUX.1-schnell-like with ``schnell=True``) in ``path``."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    clip_tok = tiny_clip_tokenizer()
    t5_tok = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _clip_text_model(clip_tok, hidden=16)
        text_encoder_2 = _t5_encoder(t5_tok, d_model=32)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=not schnell, axes_dims_rope=(4, 6, 6),
        ).eval()
        fill_zero_parameters(transformer)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        ).eval()
    pipe = FluxPipeline(
        scheduler=_scheduler("flux_schnell" if schnell else "flux"), vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_flux2_klein(path: str | Path, *, distilled: bool = False, seed: int = 0) -> Path:
    """A tiny ``Flux2KleinPipeline`` (FLUX.2-klein-base-like; ``distilled=True``: step-distilled) in ``path``."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    tokenizer = tiny_qwen_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
        text_encoder = Qwen3ForCausalLM(config).eval()
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32, mlp_ratio=2.0,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        ).eval()
        fill_zero_parameters(transformer)
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
            use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
        ).eval()
        _randomise_buffers(vae)
    pipe = Flux2KleinPipeline(
        scheduler=_scheduler("flux2_klein"), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=distilled,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_qwen_image(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``QwenImagePipeline`` in ``path``."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    tokenizer = tiny_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = {
            "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        }
        vision_config = {
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [0],
            "window_size": 112,
        }
        config = Qwen2_5_VLConfig(
            text_config=text_config, vision_config=vision_config,
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
        ).eval()
        fill_zero_parameters(transformer)
        generator = torch.Generator().manual_seed(seed + 1)
        latents_mean = (torch.randn(4, generator=generator) * 0.5).tolist()
        latents_std = (torch.rand(4, generator=generator) + 0.5).tolist()
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
            latents_mean=latents_mean, latents_std=latents_std,
        ).eval()
    pipe = QwenImagePipeline(
        scheduler=_scheduler("qwen_image"), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


#: ``{name: builder(path)}`` of the ``tiny:<name>`` pipelines
TINY_FAMILIES: dict[str, Callable[[Path], Path]] = {
    "sd3": lambda path: save_tiny_sd3(path, seed=0),
    "flux": lambda path: save_tiny_flux(path),
    "flux_schnell": lambda path: save_tiny_flux(path, schnell=True),
    "flux2_klein": lambda path: save_tiny_flux2_klein(path),
    "flux2_klein_distilled": lambda path: save_tiny_flux2_klein(path, distilled=True),
    "qwen_image": lambda path: save_tiny_qwen_image(path),
}


def tiny_cache_dir() -> Path:
    """Where the tiny folders are kept: ``$FLOWGYM_TINY_CACHE`` or ``~/.cache/flowgym/tiny_pipelines``."""
    configured = os.environ.get("FLOWGYM_TINY_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path("~/.cache/flowgym/tiny_pipelines").expanduser()


def _version_key() -> str:
    import diffusers
    import transformers

    text = json.dumps([FORMAT_VERSION, diffusers.__version__, transformers.__version__, torch.__version__])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def tiny_pipeline_path(name: str) -> Path:
    """The folder of the tiny pipeline ``name`` (built on first use; ``KeyError`` naming the accepted ones)."""
    if name not in TINY_FAMILIES:
        raise KeyError(f"no tiny pipeline {name!r}; accepted: {sorted(TINY_FAMILIES)}")
    root = tiny_cache_dir()
    folder = root / f"{name}-{_version_key()}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        TINY_FAMILIES[name](staging)
        try:
            os.replace(staging, folder)  # atomic: a concurrent builder's folder wins, ours is dropped
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


register_model_source("tiny", tiny_pipeline_path)
