"""Atomic checkpoints: trained weights as safetensors, the rest of the training state beside them.

Layout of a run's checkpoint folder::

    checkpoints/
      iter-000010/            a complete checkpoint (renamed into place only once fully written)
        weights.safetensors   trained parameters (LoRA adapters or the full model)
        state.pt              optimizer, EMA, iteration, RNG states (tensors and plain types only)
        COMPLETE              marker written last
      latest                  text file naming the newest complete checkpoint (replaced atomically)

A checkpoint is written into ``iter-XXXXXX.tmp-<pid>`` and renamed to its final name after every
file is flushed to disk, so a crash (even SIGKILL) mid-write leaves at worst a stray ``.tmp``
folder that loading ignores. ``state.pt`` is loaded with ``weights_only=True``: no pickled code.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]

_WEIGHTS = "weights.safetensors"
_STATE = "state.pt"
_MARKER = "COMPLETE"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | Path, iteration: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``iter-<iteration>`` atomically and point ``latest`` at it.

    Keeps the newest ``keep`` complete checkpoints and removes older ones and stray temporaries.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"iter-{iteration:06d}"
    tmp = directory / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    pause = float(os.environ.get("FLOWGYM_CHECKPOINT_PAUSE", "0"))  # lets tests kill mid-write
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / _WEIGHTS))
    if pause:
        time.sleep(pause)
    torch.save(state, tmp / _STATE)
    (tmp / _MARKER).write_text(str(iteration))
    for name in (_WEIGHTS, _STATE, _MARKER):
        _fsync_file(tmp / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    pointer_tmp = directory / f"latest.tmp-{os.getpid()}"
    pointer_tmp.write_text(final.name)
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, directory / "latest")
    _fsync_dir(directory)
    _prune(directory, keep)
    return final


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / _MARKER).is_file() and (path / _WEIGHTS).is_file() and (path / _STATE).is_file()


def _prune(directory: Path, keep: int) -> None:
    complete = sorted(p for p in directory.glob("iter-*") if "." not in p.name and _complete(p))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stray in directory.glob("iter-*.tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (a run's ``checkpoints/``), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    pointer = directory / "latest"
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if _complete(candidate):
            return candidate
    complete = sorted(p for p in directory.glob("iter-*") if "." not in p.name and _complete(p))
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(weights, state)`` from a complete checkpoint folder."""
    path = Path(path)
    if not _complete(path):
        raise ValueError(f"{path} is not a complete checkpoint (expected {_WEIGHTS}, {_STATE} and {_MARKER})")
    weights = load_file(str(path / _WEIGHTS), device=str(device))
    state = torch.load(path / _STATE, map_location="cpu", weights_only=True)
    return weights, state
