"""``python -m algos.run`` as a user meets it: run folders, resume checks, the sweep summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from algos.run import is_bare_hydra_folder, remove_bare_folder
from sample_loss_toys import SMALL

ROOT = Path(__file__).resolve().parents[1]
TINY = [*SMALL, "trainer.iterations=2", "trainer.checkpoint_every=2"]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "algos.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_bare_folder_helpers(tmp_path):
    bare = tmp_path / "bare"
    (bare / ".hydra").mkdir(parents=True)
    (bare / "run.log").write_text("started\n")
    kept = tmp_path / "kept"
    kept.mkdir()
    assert is_bare_hydra_folder(bare)
    remove_bare_folder(bare, keep_log_in=kept)
    assert not bare.exists() and "started" in (kept / "resume.log").read_text()
    real = tmp_path / "real"
    (real / ".hydra").mkdir(parents=True)
    (real / "metrics.jsonl").write_text("{}\n")
    remove_bare_folder(real)
    assert real.exists()  # a folder with results is never removed


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    out = _run(*TINY, "trainer.lr=-1", f"hydra.run.dir={tmp_path / 'failed'}")
    assert out.returncode != 0 and "trainer.lr must be a positive number" in out.stderr
    assert not (tmp_path / "failed").exists()


def test_resume_keeps_one_folder_and_refuses_another_algo(tmp_path):
    runs = tmp_path / "runs"
    first = _run(*TINY, f"hydra.run.dir={runs / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    # resume=true from a new folder continues 'a' (to 3 iterations) and removes the new, empty one
    again = _run(*SMALL, "trainer.iterations=3", "resume=true", f"hydra.run.dir={runs / 'b'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed" in again.stdout and not (runs / "b").exists()
    assert (runs / "a" / "resume.log").is_file()
    # another algo on the same folder is refused, naming both
    other = _run(*SMALL, "algo=grpo", "trainer.iterations=4", f"resume={runs / 'a'}", f"hydra.run.dir={runs / 'c'}")
    assert other.returncode != 0
    assert "algo.name=flow_dppo, this command asks for algo.name=grpo" in other.stderr
    assert not (runs / "c").exists()


def test_multirun_prints_and_writes_a_sweep_summary(tmp_path):
    sweep = tmp_path / "sweep"
    out = _run("--multirun", "algo=flow_dppo,grpo", *TINY, f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sweep summary (2 of 2 runs finished)" in out.stdout
    summary = (sweep / "summary.md").read_text()
    assert "algo=flow_dppo" in summary and "algo=grpo" in summary
    assert (sweep / "curves.png").is_file() and (sweep / "report.md").read_text().count("### ") == 2
