"""The reward server's wire format: images as safetensors bytes, scores as JSON. Never pickles.

Request (``POST /score``): the body is a safetensors file holding one tensor ``images`` of shape
``(B, C, H, W)`` (C = 1 or 3), dtype ``uint8`` (0-255) or ``float32`` (0-1; bit-exact, so a served
reward gives the local reward's numbers), and the metadata entry ``prompts``: a JSON list of B
strings. Optional header ``Authorization: Bearer <token>``.

Response: ``200 {"reward": name, "scores": [B floats]}``; an error is ``4xx`` / ``5xx`` with
``{"error": "<what was wrong and what is accepted>"}``. Scores are float32 values written as JSON
numbers: a float32 widened to float64 prints and parses back exactly.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

__all__ = ["ACCEPTED_DTYPES", "PayloadError", "PayloadTooLarge", "images_as_float", "decode_images", "decode_scores", "encode_images", "encode_scores"]

#: image dtypes a request may carry
ACCEPTED_DTYPES = (torch.uint8, torch.float32)


class PayloadError(ValueError):
    """A request or response that does not follow the wire format (the message says how)."""


class PayloadTooLarge(PayloadError):
    """A request over the server's limits (batch size or bytes): answered 413."""


def encode_images(images: Tensor, prompts: Sequence[str]) -> bytes:
    """The request body for ``images`` (B, C, H, W) uint8 / float32 and their B prompts."""
    if images.dtype not in ACCEPTED_DTYPES:
        raise PayloadError(f"images must be uint8 or float32 to be sent; got {images.dtype}")
    if images.dim() != 4 or images.shape[0] != len(prompts):
        raise PayloadError(f"need images (B, C, H, W) and B prompts; got {tuple(images.shape)} and {len(prompts)} prompts")
    return save_safetensors({"images": images.detach().cpu().contiguous()}, metadata={"prompts": json.dumps(list(prompts))})


def decode_images(body: bytes, max_batch: int) -> tuple[Tensor, list[str]]:
    """``(images, prompts)`` of a request body, validated; ``PayloadError`` says what is wrong."""
    try:
        tensors = load_safetensors(body)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise PayloadError(f"the body is not a safetensors file ({error}); send safetensors bytes holding 'images'") from None
    if set(tensors) != {"images"}:
        raise PayloadError(f"the payload must hold exactly one tensor 'images'; got {sorted(tensors)}")
    images = tensors["images"]
    if images.dtype not in ACCEPTED_DTYPES:
        raise PayloadError(f"images dtype {images.dtype} is not accepted; send uint8 (0-255) or float32 (0-1)")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise PayloadError(f"images must have shape (B, C, H, W) with B >= 1 and C = 1 or 3; got {tuple(images.shape)}")
    if images.shape[0] > max_batch:
        raise PayloadTooLarge(f"batch of {images.shape[0]} images is over this server's limit of {max_batch}; split it")
    # the header's metadata is read separately: safetensors.torch.load drops it
    prompts = _metadata_prompts(body)
    if len(prompts) != images.shape[0]:
        raise PayloadError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts


def _metadata_prompts(body: bytes) -> list[str]:
    size = int.from_bytes(body[:8], "little")
    try:
        header = json.loads(body[8 : 8 + size])
        prompts = json.loads(header.get("__metadata__", {})["prompts"])
    except (KeyError, ValueError, TypeError):
        raise PayloadError("the payload's metadata must hold 'prompts': a JSON list of strings") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PayloadError("the payload's 'prompts' must be a JSON list of strings")
    return prompts


def images_as_float(images: Tensor) -> Tensor:
    """Float32 images in [0, 1]: uint8 divided by 255, float32 unchanged (bit for bit)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def encode_scores(name: str, scores: Tensor) -> bytes:
    return json.dumps({"reward": name, "scores": [float(v) for v in scores.detach().float().cpu().reshape(-1)]}).encode()


def decode_scores(body: bytes, expected: int) -> Tensor:
    """The float32 scores of a response body (``PayloadError`` if malformed or of the wrong length)."""
    try:
        scores = json.loads(body)["scores"]
    except (KeyError, ValueError, TypeError):
        raise PayloadError(f"the server's answer is not {{'scores': [...]}}: {body[:200]!r}") from None
    if not isinstance(scores, list) or len(scores) != expected:
        raise PayloadError(f"the server returned {len(scores) if isinstance(scores, list) else 'no'} scores for {expected} images")
    return torch.tensor(scores, dtype=torch.float32)
