"""The compose task's text-conditioned rectified-flow model: a small diffusers ``SD3Transformer2DModel``
in pixel space, conditioned by a tiny transformers ``CLIPTextModel`` over a word-level tokenizer.

Conventions (as SD3)
--------------------
* Latent = image * 2 - 1, shape ``(3, 32, 32)`` (pixel space, no autoencoder: the canvas is only
  3x32x32 = 3,072 numbers, a VAE would cost a second model and training time for no speed-up;
  with patch size 4 the transformer sees 64 image tokens).
* Rectified flow: ``x_s = (1 - s) x_data + s eps``; the network predicts ``v = eps - x_data``; the
  transformer gets ``timestep = 1000 * s``.
* Text: prompts are lower-cased and split on whitespace; each word of the closed grammar vocabulary
  is one token (``tokenizers`` ``WordLevel`` model in a ``PreTrainedTokenizerFast``, saved as
  ``flowgym/assets/compose_tokenizer.json``). A BPE ``CLIPTokenizer`` would need merges spelling every
  word out of characters, which brings nothing for a 30-word closed vocabulary (and a badly
  ordered merge list silently splits words); the word-level model maps each word to one id and
  anything else to ``<unk>``. Sequences are ``<bos> words <eos> <pad>...`` of fixed length
  ``MAX_TOKENS``; the ``CLIPTextModel`` pools at the first ``<eos>`` (``eos_token_id`` set in its
  config). The empty prompt ``""`` (the negative prompt) is ``<bos> <eos>``, the unconditional
  input the model was trained on with prompt dropout, so classifier-free guidance works.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from flowgym.backends.compose.canvas import COLOURS, DIGITS
from flowgym.backends.compose.grammar import COUNT_WORDS

__all__ = [
    "MAX_TOKENS",
    "SPECIAL_TOKENS",
    "ComposeTextEncoder",
    "ComposeTransformer",
    "image_to_latent",
    "latent_to_image",
    "load_tokenizer",
    "tokenizer_vocabulary",
    "write_tokenizer",
]

MAX_TOKENS = 12
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3 (eos must not be 2: CLIP's legacy pooling)
_EOS = None


def tokenizer_vocabulary() -> dict[str, int]:
    """``{token: id}``: the special tokens, then the grammar's words (sorted)."""
    words = {"a", "and", "to", "the", "left", "right", "of", "above", "below", *COLOURS, *COUNT_WORDS.values()}
    words |= {str(d) for d in DIGITS} | {f"{d}s" for d in DIGITS}
    ordered = [*SPECIAL_TOKENS, *sorted(words)]
    return {tok: i for i, tok in enumerate(ordered)}


def write_tokenizer(path: str | Path) -> Path:
    """Write the word-level tokenizer as a ``tokenizers`` json file (``PreTrainedTokenizerFast`` loads it)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = tokenizer_vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    path = Path(path)
    tok.save(str(path))
    return path


@lru_cache(maxsize=4)
def load_tokenizer(path: str | Path):
    """The ``PreTrainedTokenizerFast`` of ``path`` (special tokens set; fixed-length padding)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=MAX_TOKENS,
    )


def tokenize(tokenizer, prompts: Sequence[str]) -> Tensor:
    """Token ids ``(B, MAX_TOKENS)`` long: ``<bos> words <eos>`` padded with ``<pad>`` (truncated to fit)."""
    out = tokenizer(
        list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    ids = out["input_ids"]
    eos = tokenizer.eos_token_id
    # a truncated prompt still ends with <eos> (CLIP pools there)
    missing = ~(ids == eos).any(-1)
    ids[missing, -1] = eos
    return ids


class ComposeTextEncoder(nn.Module):
    """Tiny ``CLIPTextModel``: ``forward(ids (B, L)) -> (hidden (B, L, width), pooled (B, width))``."""

    def __init__(
        self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 2, eos_token_id: int = 3,
        pad_token_id: int = 0, bos_token_id: int = 2, max_tokens: int = MAX_TOKENS,
    ) -> None:  # fmt: skip
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.config = {
            "vocab_size": vocab_size, "width": width, "layers": layers, "heads": heads,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": bos_token_id,
            "max_tokens": max_tokens,
        }  # fmt: skip
        clip_config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=2 * width,
            projection_dim=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_tokens,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            pad_token_id=pad_token_id,
        )
        self.clip = CLIPTextModel(clip_config)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        out = self.clip(input_ids=ids)
        return out.last_hidden_state, out.pooler_output


class ComposeTransformer(nn.Module):
    """``SD3Transformer2DModel`` in pixel space: ``forward(x (B, 3, 32, 32), sigma (B,), hidden, pooled) -> v``.

    ``hidden`` is the text encoder's ``(B, L, text_width)`` states (joint attention), ``pooled`` its
    ``(B, text_width)`` pooled output; the timestep given to the transformer is ``1000 * sigma``.
    """

    def __init__(
        self, sample_size: int = 32, patch_size: int = 4, layers: int = 4, heads: int = 4, head_dim: int = 32,
        text_width: int = 64, channels: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.config = {
            "sample_size": sample_size, "patch_size": patch_size, "layers": layers, "heads": heads,
            "head_dim": head_dim, "text_width": text_width, "channels": channels,
        }  # fmt: skip
        self.sd3 = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=channels,
            out_channels=channels,
            num_layers=layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_width,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=text_width,
            pos_embed_max_size=sample_size // patch_size,
        )

    def forward(self, x: Tensor, sigma: Tensor, hidden: Tensor, pooled: Tensor) -> Tensor:
        dtype = self.sd3.pos_embed.proj.weight.dtype
        out = self.sd3(
            hidden_states=x.to(dtype),
            encoder_hidden_states=hidden.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=(1000.0 * sigma.float()).to(dtype),
            return_dict=False,
        )[0]
        return out


def image_to_latent(images: Tensor) -> Tensor:
    """Image in [0, 1] -> latent in [-1, 1]: ``2 * image - 1``."""
    return images * 2.0 - 1.0


def latent_to_image(latents: Tensor) -> Tensor:
    """Latent -> image: ``clamp((latent + 1) / 2, 0, 1)`` as float32."""
    return ((latents.float() + 1.0) * 0.5).clamp(0.0, 1.0)
