"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("loss, extra", [("flow_dppo", []), ("cps", ["--kernel", "cps", "--noise-level", "0.8"])])
def test_custom_loop(loss, extra):
    out = subprocess.run(
        [sys.executable, "examples/custom_loop.py", "--loss", loss, "--iterations", "2", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("iter")]
    assert len(lines) == 2 and "reward" in lines[-1] and "nan" not in lines[-1]


def test_sample_grid_draws_pretrained_beside_trained(tmp_path):
    run = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "algos.run", "algo=grpo", "trainer.iterations=1", "trainer.eval_every=0",
         "trainer.checkpoint_every=1", "logger.backends=[csv]", "device=cpu", f"hydra.run.dir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = subprocess.run(
        [sys.executable, "examples/sample_grid.py", str(run), "--per-set", "1", "--seeds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    png = run / "sample_grid.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
