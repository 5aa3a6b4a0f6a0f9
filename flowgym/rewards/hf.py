"""Reward models through transformers: CLIP score, PickScore and the LAION aesthetic predictor.

Each reward takes ``model=`` (a hub id or a local folder), ``device`` (``None``: CUDA if
available) and ``dtype`` (``None``: float32), and scores ``images (B, C, H, W)`` in [0, 1]
(grey images are repeated to 3 channels) with their prompts. Images are preprocessed in torch
the way the CLIP image processor does it (``preprocessor_config.json``): bicubic resize of the
shortest side (antialiased), centre crop, ``(x - mean) / std``. Scores are float32 ``(B,)`` on
the images' device.

* ``clip_score``: ``scale * cos(image_embed, text_embed)`` with CLIP's projected embeddings
  (default ``openai/clip-vit-large-patch14``, ``scale=1``; ``scale=100`` gives torchmetrics'
  CLIPScore without its clamp at 0, ``2.5`` the CLIP-S of Hessel et al.).
* ``pickscore``: ``exp(logit_scale) * cos / 26`` (Flow-GRPO's normalisation; exp(logit_scale) is
  CLIP's learnt temperature, about 100) with ``yuvalkirstain/PickScore_v1`` and the processor
  of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
* ``aesthetic``: the LAION "improved aesthetic predictor": the L2-normalised CLIP ViT-L/14 image
  embedding (768) into an MLP head. The public head is
  ``Linear(768, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2) -> Linear(128, 64)
  -> Dropout(0.1) -> Linear(64, 16) -> Linear(16, 1)`` (no activations, as published), stored as
  ``layers.{0,2,4,6,7}.{weight,bias}``. ``AestheticHead.from_state_dict`` rebuilds this layout
  from any state dict of that form (Linear layers at the numbered positions, Dropout (identity
  at inference) in the gaps), so smaller heads load too. The head weights come from
  ``head=``: a ``.safetensors`` file, a ``.pth``/``.pt`` state dict (read with
  ``torch.load(weights_only=True)``, e.g. ``sac+logos+ava1-l14-linearMSE.pth`` from
  github.com/christophschuhmann/improved-aesthetic-predictor), a folder holding one
  ``.safetensors`` file, or a hub id with ``head_filename``.

A model that is not available locally (offline, gated, wrong path) raises
``flowgym.hub.ModelNotAvailableError`` with a short message saying how to get it.
Remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowgym.hub import (
    ModelNotAvailableError,
    download_hint,
    fetch_file,
    load_pretrained,
    looks_like_path,
    resolve_device,
    resolve_dtype,
)
from flowgym.rewards.base import Reward, check_reward_batch, register_reward

__all__ = [
    "AestheticHead",
    "AestheticReward",
    "CLIPImageTransform",
    "CLIPScoreReward",
    "PickScoreReward",
    "cosine_scores",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------- loading
# ---------------------------------------------------------------------------------- image path
def _as_size(value, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for k in (key, "shortest_edge", "height"):
            if value.get(k) is not None:
                return int(value[k])
    raise ValueError(f"cannot read an image size from {value!r}")


class CLIPImageTransform:
    """Torch version of the CLIP image processor for batches in [0, 1].

    ``resize`` the shortest side to ``size`` (bicubic, antialiased), centre ``crop`` to
    ``crop x crop``, then ``(x - mean) / std`` per channel. Grey images are repeated to RGB.
    """

    def __init__(self, size: int = 224, crop: int = 224, mean=_OPENAI_MEAN, std=_OPENAI_STD) -> None:
        self.size, self.crop = int(size), int(crop)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, config: dict) -> "CLIPImageTransform":
        """From a ``preprocessor_config.json`` dict (old integer or new dict ``size`` forms)."""
        size = _as_size(config.get("size"), "shortest_edge") or 224
        crop = _as_size(config.get("crop_size"), "height") or size
        if config.get("do_center_crop") is False:
            crop = size
        return cls(size, crop, config.get("image_mean") or _OPENAI_MEAN, config.get("image_std") or _OPENAI_STD)

    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 1 or 3, H, W); got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new_h, new_w = max(self.crop, round(h * scale)), max(self.crop, round(w * scale))
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _load_transform(spec: str | os.PathLike, what: str, local_files_only: bool | None) -> CLIPImageTransform:
    config_path = fetch_file(spec, "preprocessor_config.json", what, local_files_only)
    return CLIPImageTransform.from_config(json.loads(Path(config_path).read_text()))


def cosine_scores(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Row-wise cosine similarity ``<a_i, b_i> / (|a_i| |b_i|)``, float32 ``(B,)``."""
    a = F.normalize(image_embeds.float(), dim=-1)
    b = F.normalize(text_embeds.float(), dim=-1)
    return (a * b).sum(-1)


# ---------------------------------------------------------------------------------- CLIP rewards
class _CLIPReward(Reward):
    """A CLIP model + tokenizer + image transform on one device."""

    def __init__(
        self,
        model: str | os.PathLike,
        processor: str | os.PathLike | None,
        *,
        device: torch.device | str | None,
        dtype: torch.dtype | str | None,
        local_files_only: bool | None,
        what: str,
        need_text: bool = True,
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        processor = model if processor is None else processor
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, half_on_cuda=False, allow_half_on_cpu=True)
        self.transform = _load_transform(processor, f"{what} processor", local_files_only)
        self.tokenizer = load_pretrained(AutoTokenizer, processor, f"{what} tokenizer", local_files_only) if need_text else None
        self.model = load_pretrained(CLIPModel, model, what, local_files_only, dtype=self.dtype)
        self.model.requires_grad_(False).eval().to(self.device)

    def to(self, device: torch.device | str) -> "_CLIPReward":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """Projected CLIP image embeddings (not normalised), float32 ``(B, D)``."""
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        out = self.model.get_image_features(pixel_values=pixels)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return out.float()

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """Projected CLIP text embeddings (not normalised), float32 ``(B, D)``."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return out.float()

    def _check(self, images: Tensor, prompts: Sequence[str]) -> None:
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"need one prompt per image: {images.shape[0]} images, prompts={prompts!r:.80}")
        check_reward_batch(images, prompts)


@register_reward("clip_score")
class CLIPScoreReward(_CLIPReward):
    """``scale * cos(CLIP image embedding, CLIP text embedding)``; see the module docstring."""

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_CLIP_MODEL,
        *,
        processor: str | os.PathLike | None = None,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__(model, processor, device=device, dtype=dtype, local_files_only=local_files_only,
                         what="CLIP-score model")
        self.scale = float(scale)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        self._check(images, prompts)
        scores = self.scale * cosine_scores(self.image_embeds(images), self.text_embeds(prompts))
        return scores.to(images.device)


@register_reward("pickscore")
class PickScoreReward(_CLIPReward):
    """PickScore: ``exp(logit_scale) * cos(image, text) / 26`` (Flow-GRPO's scale; ~0.8-0.9 for SD3.5)."""

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_PICKSCORE_MODEL,
        *,
        processor: str | os.PathLike | None = DEFAULT_PICKSCORE_PROCESSOR,
        normalizer: float = 26.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__(model, processor, device=device, dtype=dtype, local_files_only=local_files_only,
                         what="PickScore model")
        self.normalizer = float(normalizer)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        self._check(images, prompts)
        cos = cosine_scores(self.image_embeds(images), self.text_embeds(prompts))
        scores = self.model.logit_scale.detach().float().exp() * cos / self.normalizer
        return scores.to(images.device)


# ---------------------------------------------------------------------------------- aesthetic
class AestheticHead(nn.Module):
    """The LAION aesthetic MLP: ``nn.Sequential`` named ``layers`` with Linear layers at the
    state dict's numbered positions and Dropout (identity at inference) elsewhere."""

    def __init__(self, sizes: Sequence[tuple[int, int, int]], length: int) -> None:
        super().__init__()
        linear_at = {index: (fan_in, fan_out) for index, fan_in, fan_out in sizes}
        self.layers = nn.Sequential(
            *(nn.Linear(*linear_at[i]) if i in linear_at else nn.Dropout(0.0) for i in range(length))
        )

    @classmethod
    def public(cls, embed_dim: int = 768) -> "AestheticHead":
        """The published architecture ``embed_dim -> 1024 -> 128 -> 64 -> 16 -> 1``."""
        return cls([(0, embed_dim, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)], 8)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "AestheticHead":
        """Rebuild the head from ``[prefix.]<i>.weight / <i>.bias`` keys and load the weights."""
        pattern = re.compile(r"(?:^|\.)(\d+)\.(weight|bias)$")
        clean: dict[str, Tensor] = {}
        for key, value in state.items():
            match = pattern.search(key)
            if match is None:
                raise ValueError(f"unexpected key {key!r} in the aesthetic head; expected 'layers.<i>.weight/bias'")
            clean[f"layers.{match.group(1)}.{match.group(2)}"] = value
        indices = sorted({int(k.split(".")[1]) for k in clean})
        sizes = []
        for i in indices:
            weight = clean.get(f"layers.{i}.weight")
            if weight is None or weight.ndim != 2:
                raise ValueError(f"aesthetic head layer {i} needs a 2-D weight")
            sizes.append((i, weight.shape[1], weight.shape[0]))
        for (_, _, fan_out), (_, fan_in, _) in zip(sizes, sizes[1:]):
            if fan_out != fan_in:
                raise ValueError(f"aesthetic head layers do not chain: sizes {[(a, b) for _, a, b in sizes]}")
        if sizes[-1][2] != 1:
            raise ValueError(f"aesthetic head must end with one output; got {sizes[-1][2]}")
        head = cls(sizes, indices[-1] + 1)
        head.load_state_dict(clean)
        return head

    @property
    def in_features(self) -> int:
        return next(m for m in self.layers if isinstance(m, nn.Linear)).in_features

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


def load_aesthetic_head(
    head: str | os.PathLike, *, head_filename: str | None = None, local_files_only: bool | None = None
) -> AestheticHead:
    """Load the head from a .safetensors / .pth file, a folder with one .safetensors, or a hub id."""
    from safetensors.torch import load_file

    what = "aesthetic head"
    spec = os.fspath(head)
    path = Path(spec).expanduser()
    if path.is_dir():
        if head_filename is not None:
            path = path / head_filename
        else:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise ModelNotAvailableError(
                    f"{what}: folder {spec!r} holds {len(files)} .safetensors files; expected exactly one "
                    "(or pass head_filename=)"
                )
            path = files[0]
    elif not path.exists():
        if looks_like_path(spec) or spec.endswith((".safetensors", ".pth", ".pt")):
            raise ModelNotAvailableError(
                f"{what}: {spec!r} does not exist. Give the MLP weights as a .safetensors or .pth file "
                "(sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor)"
            )
        if head_filename is None:
            raise ValueError(f"{what}: {spec!r} looks like a hub id; also pass head_filename= (the file in it)")
        path = fetch_file(spec, head_filename, what, local_files_only)
    if not path.is_file():
        raise ModelNotAvailableError(f"{what}: {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{what}: {str(path)!r} does not hold a state dict")
    else:
        raise ValueError(f"{what}: unsupported file {str(path)!r}; accepted: .safetensors, .pth, .pt")
    return AestheticHead.from_state_dict({k: v.float() for k, v in state.items()})


@register_reward("aesthetic")
class AestheticReward(_CLIPReward):
    """LAION aesthetic score: ``head(normalise(CLIP ViT-L/14 image embedding))``; prompts unused."""

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_CLIP_MODEL,
        *,
        head: str | os.PathLike | None = None,
        head_filename: str | None = None,
        processor: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        if head is None:
            raise ValueError(
                "the aesthetic reward needs head=: the MLP weights as a .safetensors / .pth file, a folder "
                "with one .safetensors, or a hub id with head_filename= (the public head is "
                "sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor)"
            )
        self.head = load_aesthetic_head(head, head_filename=head_filename, local_files_only=local_files_only)
        super().__init__(model, processor, device=device, dtype=dtype, local_files_only=local_files_only,
                         what="aesthetic CLIP model", need_text=False)
        embed_dim = int(self.model.config.projection_dim)
        if self.head.in_features != embed_dim:
            raise ValueError(
                f"aesthetic head expects {self.head.in_features}-d embeddings; the CLIP model gives {embed_dim}"
            )
        self.head.requires_grad_(False).eval().to(self.device)

    def to(self, device: torch.device | str) -> "AestheticReward":
        super().to(device)
        self.head.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        check_reward_batch(images, None)  # the prompts are not used
        embeds = F.normalize(self.image_embeds(images), dim=-1)
        return self.head(embeds).float().to(images.device)
