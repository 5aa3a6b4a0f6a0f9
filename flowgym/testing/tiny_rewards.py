"""Tiny random-weight reward models saved like the real ones, built fully offline.

* ``save_tiny_clip(path)``: a ``CLIPModel`` with its tokenizer and ``preprocessor_config.json``
  in one folder, the layout of ``openai/clip-vit-large-patch14`` or ``yuvalkirstain/PickScore_v1``;
  usable as ``model=`` (and ``processor=``) of the ``clip_score``, ``pickscore`` and
  ``aesthetic`` rewards.
* ``save_tiny_aesthetic_head(path)``: an MLP head with the public aesthetic predictor's layout
  (``layers.{0,2,4,6,7}``) but tiny widths, as a ``.safetensors`` file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowgym.testing.tiny_sd3 import tiny_clip_tokenizer

__all__ = ["save_tiny_clip", "save_tiny_aesthetic_head", "TINY_CLIP_PROJECTION"]

#: projection (embedding) width of ``save_tiny_clip`` models
TINY_CLIP_PROJECTION = 16


def save_tiny_clip(path: str | Path, *, seed: int = 0, image_size: int = 32, logit_scale: float = 4.6052) -> Path:
    """Save a random tiny CLIP (text + vision, projection 16, image ``image_size``) to ``path``.

    ``logit_scale`` is stored as CLIP stores it (log of the temperature; 4.6052 = log 100).
    Weights are deterministic given ``seed``; the global RNG state is left untouched.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8, num_channels=3,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_CLIP_PROJECTION,
                        logit_scale_init_value=logit_scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return path


def save_tiny_aesthetic_head(
    path: str | Path, *, embed_dim: int = TINY_CLIP_PROJECTION, widths: tuple[int, int, int, int] = (32, 16, 8, 4),
    seed: int = 0,
) -> Path:
    """Save an aesthetic MLP ``embed_dim -> widths... -> 1`` at positions 0, 2, 4, 6, 7 as safetensors.

    ``path`` is the file to write (a folder gets ``aesthetic_head.safetensors`` inside).
    """
    from safetensors.torch import save_file

    from flowgym.rewards.hf import AestheticHead

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "aesthetic_head.safetensors"
    sizes = [embed_dim, *widths, 1]
    positions = (0, 2, 4, 6, 7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead([(i, a, b) for i, a, b in zip(positions, sizes, sizes[1:])], 8)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    return path
