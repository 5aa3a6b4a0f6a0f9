"""Prompt-independent image rewards: JPEG (in)compressibility, as in DDPO.

The file size of the image saved as JPEG (PIL, quality 95) in kB, ``kB = bytes / 1000``:

* ``jpeg_compressibility = -kB * scale`` (smaller files score higher),
* ``jpeg_incompressibility = +kB * scale``,

with ``scale = 1 / 500`` by default (Flow-GRPO's ``-kB / 500``; DDPO's original used
``scale = 1``). Works for any size and channel count: 1 channel is saved as a grey image,
3 as RGB, any other count channel by channel as grey images whose sizes are summed.
Note that for tiny images (8x8) most of the file is the fixed JPEG header; only differences
between images carry signal.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flowgym.rewards.base import Reward, check_reward_batch, register_reward

__all__ = ["JpegCompressibilityReward", "JpegIncompressibilityReward", "jpeg_size_kb"]


def _jpeg_bytes(array: np.ndarray, quality: int) -> int:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG file size in kB (1 kB = 1000 bytes) of each image, float32 ``(B,)``.

    ``images``: ``(B, C, H, W)`` in [0, 1], quantised as ``round(255 * clamp(x, 0, 1))``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be an integer in 1..100; got {quality}")
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    sizes = []
    for array in arrays:  # (C, H, W)
        if array.shape[0] == 1:
            sizes.append(_jpeg_bytes(array[0], quality))
        elif array.shape[0] == 3:
            sizes.append(_jpeg_bytes(np.ascontiguousarray(array.transpose(1, 2, 0)), quality))
        else:
            sizes.append(sum(_jpeg_bytes(channel, quality) for channel in array))
    return torch.tensor(sizes, dtype=torch.float32) / 1000.0


class _JpegReward(Reward):
    sign = 1.0

    def __init__(self, scale: float = 1.0 / 500.0, quality: int = 95) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive; got {scale}")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be an integer in 1..100; got {quality}")
        self.scale = float(scale)
        self.quality = int(quality)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_batch(images, prompts)
        return (self.sign * self.scale * jpeg_size_kb(images, self.quality)).to(images.device)


@register_reward("jpeg_compressibility")
class JpegCompressibilityReward(_JpegReward):
    """``-kB * scale`` of the image saved as JPEG (default ``scale = 1/500``): smaller files score higher."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibilityReward(_JpegReward):
    """``+kB * scale`` of the image saved as JPEG (default ``scale = 1/500``): larger files score higher."""

    sign = 1.0
