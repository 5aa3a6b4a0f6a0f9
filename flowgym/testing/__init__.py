"""Offline test fixtures: tiny random-weight models saved in the layout of the real ones.

* ``save_tiny_sd3(path, with_t5=True, seed=0)``: a diffusers SD3 pipeline folder.
* ``save_tiny_clip(path, seed=0)``: a transformers CLIP model + tokenizer + preprocessor folder
  (usable as a CLIP-score or PickScore model).
* ``save_tiny_aesthetic_head(path, embed_dim=16, seed=0)``: an aesthetic MLP head (.safetensors).

Imports are lazy so that ``import flowgym.testing`` stays cheap.
"""

from __future__ import annotations

__all__ = ["save_tiny_sd3", "save_tiny_clip", "save_tiny_aesthetic_head"]


def __getattr__(name: str):
    if name == "save_tiny_sd3":
        from flowgym.testing.tiny_sd3 import save_tiny_sd3

        return save_tiny_sd3
    if name in ("save_tiny_clip", "save_tiny_aesthetic_head"):
        from flowgym.testing import tiny_rewards

        return getattr(tiny_rewards, name)
    raise AttributeError(f"module 'flowgym.testing' has no attribute {name!r}")
