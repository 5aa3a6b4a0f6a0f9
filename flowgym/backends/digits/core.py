"""The digits family's data, prompts and networks: a tiny class-conditional rectified-flow model of 8x8
handwritten digits and the independent classifier behind its reward and metrics.

Everything here runs on a laptop CPU in milliseconds and needs no download: the data are
scikit-learn's bundled ``load_digits`` (1797 grey 8x8 images, values 0..16, ink = high) and the
weights ship with the package in ``flowgym/assets`` (trained by
``python -m flowgym.backends.digits.pretrain``).

Conventions
-----------
* Image space: float32 in [0, 1], shape ``(B, 1, 8, 8)``, 1 = full ink (``pixel / 16``).
* Latent space = the image rescaled to [-1, 1]: ``latent = 2 * image - 1`` (no autoencoder).
* Rectified flow as in SD3: ``x_s = (1 - s) x_data + s eps`` and the network predicts
  ``v = eps - x_data`` from ``(x_s, s, label)``; ``s`` (the sigma in [0, 1]) is the time input.
* Prompts are text naming one digit, e.g. ``"a handwritten 7"`` or ``"the digit seven"``; the
  encoder maps them to a class label 0..9. The empty prompt ``""`` (the negative prompt) maps to
  ``NULL_LABEL = 10``, the unconditional class the model was trained on with label dropout, so
  classifier-free guidance works.

Also here: ``DigitClassifier`` (the independent classifier behind the ``digit_alignment`` reward
and the forgetting metrics) and the fixed data split. ``DigitsBackend`` and ``sample_ode`` are in
``flowgym.backends.digits.backend``.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowgym.backends.weights import ASSETS_DIR, load_module, resolve_weights, save_module


__all__ = [
    "ASSETS_DIR",
    "CLASSIFIER_FILE",
    "DEFAULT_GUIDANCE",
    "DEFAULT_SHIFT",
    "DigitClassifier",
    "DigitVelocityNet",
    "FLOW_FILE",
    "METADATA_FILE",
    "NULL_LABEL",
    "NUM_DIGITS",
    "PROMPT_TEMPLATE",
    "SPLIT_FRACTIONS",
    "SPLIT_SEED",
    "digit_prompt",
    "digit_split",
    "digit_split_indices",
    "image_to_latent",
    "latent_to_image",
    "load_classifier",
    "load_digit_images",
    "load_module",
    "parse_digit",
    "prompt_digits",
    "resolve_weights",
    "save_module",
    "sigma_embedding",
    "to_digit_grid",
]

FLOW_FILE = "digits_flow.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
METADATA_FILE = "digits_pretrain.json"

NUM_DIGITS = 10
NULL_LABEL = 10  # the unconditional class (empty / negative prompt)
PROMPT_TEMPLATE = "a handwritten {digit}"
#: schedule shift and CFG scale the shipped model is evaluated with (see digits_pretrain.json)
DEFAULT_SHIFT = 1.0
DEFAULT_GUIDANCE = 1.0

#: fixed, seed-independent split of the 1797 digits (stratified per class)
SPLIT_SEED = 20240601
SPLIT_FRACTIONS = {"flow": 0.5, "classifier": 0.3, "eval": 0.2}

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
}  # fmt: skip


# =========================================================================== prompts
def digit_prompt(digit: int) -> str:
    """The canonical prompt for ``digit`` (0..9): ``"a handwritten {digit}"``."""
    if not (isinstance(digit, (int, np.integer)) and 0 <= int(digit) <= 9):
        raise ValueError(f"digit must be an integer in 0..9; got {digit!r}")
    return PROMPT_TEMPLATE.format(digit=int(digit))


def parse_digit(prompt: str) -> int:
    """The digit a prompt names, from a single digit character or a number word.

    ``"a handwritten 7"``, ``"the digit seven"`` and ``"7"`` all give 7. Raises ``ValueError``
    when the prompt names no digit, several different digits, or a multi-digit number.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    tokens = re.findall(r"\d+|[a-z]+", prompt.lower())
    numbers = [t for t in tokens if t.isdigit()]
    if any(len(t) > 1 for t in numbers):
        raise ValueError(
            f"prompt {prompt!r} names a multi-digit number; the digits backend accepts prompts "
            f"naming one digit 0-9, e.g. {digit_prompt(7)!r} or 'the digit seven'"
        )
    found = {int(t) for t in numbers} | {_NUMBER_WORDS[t] for t in tokens if t in _NUMBER_WORDS}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(
            f"prompt {prompt!r} names {what}; the digits backend accepts prompts naming exactly one "
            f"digit 0-9 as a character or an English word, e.g. {digit_prompt(7)!r} or "
            "'the digit seven' (the empty prompt '' is the unconditional class)"
        )
    return found.pop()


def prompt_digits(prompts: Sequence[str], allow_empty: bool = False) -> Tensor:
    """Labels of ``prompts`` as a long tensor ``(B,)``; ``""`` gives ``NULL_LABEL`` if allowed."""
    labels = []
    for prompt in prompts:
        if allow_empty and isinstance(prompt, str) and prompt.strip() == "":
            labels.append(NULL_LABEL)
        else:
            labels.append(parse_digit(prompt))
    return torch.tensor(labels, dtype=torch.long)


# =========================================================================== data
@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    data = load_digits()
    return np.asarray(data.images, dtype=np.float32) / 16.0, np.asarray(data.target, dtype=np.int64)


def load_digit_images() -> tuple[Tensor, Tensor]:
    """All 1797 scikit-learn digits: images float32 ``(N, 1, 8, 8)`` in [0, 1] and labels ``(N,)``."""
    images, labels = _digits_arrays()
    return torch.tensor(images).unsqueeze(1), torch.tensor(labels)


@lru_cache(maxsize=1)
def digit_split_indices() -> dict[str, np.ndarray]:
    """Fixed stratified split of the dataset indices into ``flow`` / ``classifier`` / ``eval``.

    Per class, a permutation drawn with ``SPLIT_SEED`` is cut by ``SPLIT_FRACTIONS`` (50 / 30 /
    20 %). The flow model trains on ``flow``, the classifier on the disjoint ``classifier`` part;
    ``eval`` is seen by neither and holds the reference statistics of the metrics.
    """
    _, labels = load_digit_images()
    labels = labels.numpy()
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_FRACTIONS}
    for digit in range(NUM_DIGITS):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_flow = int(round(SPLIT_FRACTIONS["flow"] * len(idx)))
        n_cls = int(round(SPLIT_FRACTIONS["classifier"] * len(idx)))
        parts["flow"].append(idx[:n_flow])
        parts["classifier"].append(idx[n_flow : n_flow + n_cls])
        parts["eval"].append(idx[n_flow + n_cls :])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def digit_split(name: str) -> tuple[Tensor, Tensor]:
    """Images ``(n, 1, 8, 8)`` in [0, 1] and labels ``(n,)`` of split ``flow``, ``classifier`` or ``eval``."""
    splits = digit_split_indices()
    if name not in splits:
        raise ValueError(f"unknown digit split {name!r}; accepted: {sorted(splits)}")
    images, labels = load_digit_images()
    idx = torch.from_numpy(splits[name])
    return images[idx], labels[idx]


def image_to_latent(images: Tensor) -> Tensor:
    """Image in [0, 1] -> latent in [-1, 1]: ``2 * image - 1``."""
    return images * 2.0 - 1.0


def latent_to_image(latents: Tensor) -> Tensor:
    """Latent -> image: ``clamp((latent + 1) / 2, 0, 1)`` as float32."""
    return ((latents.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def to_digit_grid(images: Tensor) -> Tensor:
    """Any ``(B, C, H, W)`` image batch in [0, 1] -> grey ``(B, 1, 8, 8)`` float32.

    Channels are averaged; other sizes are area-resampled to 8x8.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="area")
    return x


# =========================================================================== networks
def sigma_embedding(sigma: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of the noise level: ``[cos(1000 s w_i), sin(1000 s w_i)]``.

    ``w_i = max_period ** (-i / (dim / 2))`` for ``i < dim / 2``; ``sigma`` has shape ``(B,)``
    and lies in [0, 1] (scaled by 1000 like diffusers' timesteps). Returns ``(B, dim)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    angles = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _ResidualBlock(nn.Module):
    """Pre-norm MLP block with adaptive LayerNorm from the conditioning embedding."""

    def __init__(self, width: int, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(cond_dim, 3 * width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        y = self.norm(h) * (1.0 + scale) + shift
        y = self.fc2(F.silu(self.fc1(y)))
        return h + (1.0 + gate) * y


class DigitVelocityNet(nn.Module):
    """Class-conditional velocity MLP over flattened 8x8 latents.

    ``forward(x (B, 1, 8, 8), sigma (B,), label (B,) long in 0..10) -> v (B, 1, 8, 8)``; label 10
    is the unconditional class. Conditioning: ``MLP(sigma_embedding(sigma)) + Embedding(label)``
    modulates every block (adaptive LayerNorm).
    """

    def __init__(self, width: int = 256, hidden: int = 512, depth: int = 3, cond_dim: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "hidden": hidden, "depth": depth, "cond_dim": cond_dim}
        self.cond_dim = cond_dim
        self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.label_embedding = nn.Embedding(NUM_DIGITS + 1, cond_dim)
        self.input = nn.Linear(64, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width, hidden, cond_dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, 64)

    def forward(self, x: Tensor, sigma: Tensor, label: Tensor) -> Tensor:
        dtype = self.input.weight.dtype
        cond = self.time_mlp(sigma_embedding(sigma, self.cond_dim).to(dtype)) + self.label_embedding(label)
        cond = F.silu(cond)
        h = self.input(x.reshape(x.shape[0], 64).to(dtype))
        for block in self.blocks:
            h = block(h, cond)
        return self.output(F.silu(self.out_norm(h))).reshape(x.shape[0], 1, 8, 8)


class DigitClassifier(nn.Module):
    """Small CNN classifying 8x8 digits; input images in [0, 1], shape ``(B, 1, 8, 8)``.

    ``features(images)`` returns the penultimate ``(B, feature_dim)`` activations (used for the
    Frechet distance), ``forward(images)`` the ``(B, 10)`` logits.
    """

    def __init__(self, channels: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim}
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 2x2
        )  # fmt: skip
        self.fc = nn.Linear(2 * c * 4, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, NUM_DIGITS)

    def features(self, images: Tensor) -> Tensor:
        x = images.to(self.fc.weight.dtype) * 2.0 - 1.0
        return F.silu(self.fc(self.conv(x).flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(images)))


# =========================================================================== weights
def load_classifier(
    weights: str | Path | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> DigitClassifier:
    """The frozen digit classifier (shipped one by default; a folder or a ``.safetensors`` file otherwise)."""
    model = load_module(resolve_weights(weights, CLASSIFIER_FILE), DigitClassifier)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


