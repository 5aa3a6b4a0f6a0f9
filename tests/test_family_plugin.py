"""Adding a model family from a folder outside the package: a backend class and an env yaml, nothing
else edited (the README's "where to add X" example, examples/new_family)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "new_family"


def test_a_family_outside_the_package_trains_through_algos_run(tmp_path):
    folder = tmp_path / "my_family"
    shutil.copytree(EXAMPLE, folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", "env=tiny_family", "reward=jpeg_compressibility", "algo=grpo",
         f"hydra.searchpath=[file://{folder / 'configs'}]", "trainer.iterations=2", "trainer.eval_every=2",
         "trainer.checkpoint_every=2", "logger.backends=[csv]", "device=cpu", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[-1]["reward/jpeg_compressibility"] is not None and rows[-1]["num_updates"] == 2
    # the family's own hook reaches the evaluation, its gym id registers with flowgym's
    assert "eval/heldout/mean_brightness" in rows[-1] and "eval/train/drift_kl" in rows[-1]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import tiny_family, flowgym, gymnasium as gym\n"
        "flowgym.register_envs()\n"
        "env = gym.make('FlowDenoise-TinyFamily-v0', rewards={'jpeg_compressibility': 1.0}, hidden=8)\n"
        "print(env.reset(seed=0)[0]['latent'].shape)\n"
    )
    probe = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert "(3, 8, 8)" in probe.stdout


def test_unknown_family_option_names_the_accepted_ones():
    import pytest

    from flowgym.registration import make_backend

    with pytest.raises(ValueError, match=r"backend 'digits' does not accept \['wieghts'\]; accepted options: \['device', 'dtype', 'weights'\]"):
        make_backend("digits", wieghts="x")
