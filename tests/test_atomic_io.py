"""Whole-or-nothing file writes (algos.atomic_io)."""

from __future__ import annotations

import pytest

from algos.atomic_io import savefig_atomic, write_text_atomic


def test_text_is_replaced_whole_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "sub" / "report.md"
    assert write_text_atomic(path, "old") == path
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["report.md"]


def test_a_failed_figure_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")

    class Broken:
        def savefig(self, target, **kwargs):
            with open(target, "wb") as f:
                f.write(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        savefig_atomic(Broken(), path, dpi=80)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]
