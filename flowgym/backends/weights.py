"""Safetensors I/O of the embedded families' networks (digits, compose): weights plus the architecture
as json metadata, and where the shipped files live.

Every saved module has a ``config`` dict (its constructor's keyword arguments); ``save_module``
writes ``{"class": name, "config": json}`` (and an optional ``extra`` json) as the file's metadata
and ``load_module`` rebuilds the class from it. No pickles anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["ASSETS_DIR", "read_metadata", "resolve_weights", "load_module", "save_module"]

#: the shipped weights of the embedded families
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def save_module(module: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """Save ``module``'s state dict (float32, contiguous) with its class and ``config`` as metadata."""
    metadata = {"class": type(module).__name__, "config": json.dumps(module.config)}
    if extra:
        metadata["extra"] = json.dumps(extra)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def read_metadata(path: str | Path) -> dict:
    """The metadata of a file written by ``save_module`` (``config`` and ``extra`` json-decoded)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    for key in ("config", "extra"):
        if key in metadata:
            metadata[key] = json.loads(metadata[key])
    return metadata


def load_module(path: str | Path, expected: type[nn.Module]) -> nn.Module:
    """Rebuild a module of class ``expected`` saved by ``save_module`` (architecture from the metadata)."""
    metadata = read_metadata(path)
    if metadata.get("class") != expected.__name__:
        raise ValueError(
            f"{str(path)!r} holds a {metadata.get('class', 'module of unknown class')}; expected {expected.__name__}"
        )
    module = expected(**metadata["config"])
    module.load_state_dict(load_file(str(path)))
    return module


def resolve_weights(weights: str | Path | None, filename: str) -> Path:
    """``None``: the shipped file in ``flowgym/assets``; a folder: ``folder/filename``; else the path."""
    if weights is None:
        return ASSETS_DIR / filename
    path = Path(weights)
    return path / filename if path.is_dir() else path
