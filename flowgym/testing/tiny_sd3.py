"""A random-weight, tiny Stable Diffusion 3 pipeline built fully offline, for tests and demos.

``save_tiny_sd3(path)`` writes a folder laid out exactly like a diffusers SD3 / SD3.5 repository
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``,
``scheduler/``) so that ``SD3Backend.from_pretrained(path)`` loads it through the same code path
as ``stabilityai/stable-diffusion-3.5-medium``. Nothing is downloaded: the tokenizers are built
from small hand-written vocabularies (a byte-level BPE vocabulary without merges for CLIP, a
character-level Unigram vocabulary for T5).

Sizes (all tiny): CLIP text encoders with hidden 16 and projection 16 (pooled 2 x 16 = 32),
T5 encoder with d_model 32 (= the transformer's ``joint_attention_dim``), a 2-block SD3.5-style
transformer (dual attention in block 0, RMS qk-norm, patch 2, 4 latent channels), and a VAE with
two blocks (``vae_scale_factor`` 2) using SD3's scaling and shift factors.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_tiny_sd3", "tiny_clip_tokenizer", "tiny_t5_tokenizer", "TINY_SD3_CONFIG"]

#: the sizes used by ``save_tiny_sd3`` (useful for assertions in tests)
TINY_SD3_CONFIG = {
    "clip_hidden": 16,
    "clip_projection": 16,
    "t5_d_model": 32,
    "latent_channels": 4,
    "vae_scale_factor": 2,
    "patch_size": 2,
    "shift": 3.0,
}

_SPECIAL_CLIP = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level mapping: every byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer over single byte-level characters (no merges): 514 tokens.

    Every byte has a plain token and an end-of-word token (``"a"`` and ``"a</w>"``), so any text
    tokenizes without unknown tokens.
    """
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in (*_SPECIAL_CLIP, *chars, *(c + "</w>" for c in chars)):
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 (Unigram) tokenizer over lower/upper-case letters, digits and punctuation."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"
    pieces += [(c, -3.0) for c in alphabet]
    pieces += [("\u2581" + c, -2.5) for c in alphabet]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def fill_zero_parameters(module: torch.nn.Module, std: float = 0.02) -> None:
    """Give zero-initialised weights (diffusers zero-inits some output layers) small random values.

    Otherwise a random-weight model may ignore its input, and tests comparing outputs could pass
    trivially.
    """
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 0 and torch.count_nonzero(p) == 0:
                p.normal_(0.0, std)


def save_tiny_sd3(path: str | Path, *, with_t5: bool = True, seed: int = 0) -> Path:
    """Build a random-weight tiny SD3 pipeline offline and ``save_pretrained`` it to ``path``.

    ``with_t5=False`` leaves out ``text_encoder_3`` / ``tokenizer_3`` (diffusers then feeds zeros
    in place of the T5 embeddings, as ``SD3Backend`` does). Weights are deterministic given
    ``seed``; the global RNG state is left untouched. Returns the folder.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = TINY_SD3_CONFIG
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clip_tok = tiny_clip_tokenizer()
    t5_tok = tiny_t5_tokenizer()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)

        def clip_encoder() -> CLIPTextModelWithProjection:
            config = CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=cfg["clip_hidden"],
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=cfg["clip_projection"],
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
            return CLIPTextModelWithProjection(config).eval()

        text_encoder = clip_encoder()
        text_encoder_2 = clip_encoder()
        text_encoder_3 = None
        if with_t5:
            t5_config = T5Config(
                vocab_size=len(t5_tok),
                d_model=cfg["t5_d_model"],
                d_kv=8,
                d_ff=48,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
                decoder_start_token_id=t5_tok.pad_token_id,
            )
            text_encoder_3 = T5EncoderModel(t5_config).eval()

        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=cfg["patch_size"],
            in_channels=cfg["latent_channels"],
            out_channels=cfg["latent_channels"],
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=cfg["t5_d_model"],
            caption_projection_dim=16,
            pooled_projection_dim=2 * cfg["clip_projection"],
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ).eval()
        fill_zero_parameters(transformer)

        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=cfg["latent_channels"],
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg["shift"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok if with_t5 else None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
