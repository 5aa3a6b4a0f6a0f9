"""Files written whole or not at all: a temporary file beside the target, then ``os.replace``.

A reader (or a run killed mid-write) sees the old file or the new one, never half of one. The
temporary name carries the process id, so concurrent writers (benchmark workers) do not collide.
Checkpoints, which are folders of several files, have their own protocol (``algos.checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["savefig_atomic", "write_text_atomic"]


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _replace_with(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(temporary)``, then the temporary replaces ``path``; a failed write leaves no temporary."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return _replace_with(path, lambda tmp: tmp.write_text(text))


def savefig_atomic(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    """Save the matplotlib figure ``fig`` as a PNG at ``path`` atomically; returns the path."""
    return _replace_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
