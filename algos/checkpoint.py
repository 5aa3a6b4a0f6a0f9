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

A checkpoint that looks complete but cannot be read (a truncated or garbage file, a state without
an entry the trainer needs: a disk filled up, a file copied by hand) raises ``CheckpointError``
naming the file and what is wrong; ``complete_checkpoints`` lists the candidates newest first so a
resume can fall back to the newest intact one, and ``mark_broken`` renames a broken one to
``iter-XXXXXX.broken`` (kept for inspection, never loaded or pruned again).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "complete_checkpoints", "latest_checkpoint", "load_checkpoint", "mark_broken", "save_checkpoint"]

_WEIGHTS = "weights.safetensors"
_STATE = "state.pt"
_MARKER = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and what is wrong."""


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


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Every complete checkpoint under ``directory``, newest first (the one ``latest`` names leads)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = sorted((p for p in directory.glob("iter-*") if "." not in p.name and _complete(p)), reverse=True)
    newest = latest_checkpoint(directory)
    return [newest, *(p for p in found if p != newest)] if newest is not None else found


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", required: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(weights, state)`` from a complete checkpoint folder.

    ``required``: entries the state must hold. A file that cannot be read, a state that is not a
    dict, lacks a required entry or disagrees with the ``COMPLETE`` marker raise ``CheckpointError``
    naming the file.
    """
    path = Path(path)
    if not _complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (expected {_WEIGHTS}, {_STATE} and {_MARKER})")
    try:
        weights = load_file(str(path / _WEIGHTS), device=str(device))
    except Exception as error:  # safetensors' errors name no file
        raise CheckpointError(f"{path / _WEIGHTS} cannot be read ({_reason(error)}): truncated or not a safetensors file") from None
    try:
        state = torch.load(path / _STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's unpickling / zip errors name no file
        raise CheckpointError(f"{path / _STATE} cannot be read ({_reason(error)}): truncated or not a checkpoint state file") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / _STATE} holds a {type(state).__name__}, not the training state (a dict)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path / _STATE} has no {', '.join(map(repr, missing))} entry; a training state holds {list(required)}")
    marker = (path / _MARKER).read_text().strip()
    if "iteration" in state and marker.isdigit() and int(marker) != state["iteration"]:
        raise CheckpointError(f"{path / _STATE} is the state of iteration {state['iteration']!r}, its {_MARKER} marker says {marker}")
    return weights, state


def mark_broken(path: str | Path) -> Path:
    """Rename a checkpoint that cannot be loaded to ``<name>.broken`` (never loaded or pruned again)."""
    path = Path(path)
    target, n = path.with_name(f"{path.name}.broken"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.broken-{n}"), n + 1
    os.replace(path, target)
    return target
