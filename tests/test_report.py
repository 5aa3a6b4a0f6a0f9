"""Sample grids (algos/sample_grid.py), the run report (algos/report.py) and what a run leaves behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from algos.config import load_config
from algos.report import panels, read_run, write_report
from algos.sample_grid import grid_cells, tile
from algos.trainer import Trainer
from sample_loss_toys import run_config

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- grids
def test_grid_takes_the_first_prompts_in_order_and_caps_the_samples():
    prompts = ["a", "a", "a", "b", "b", "c", "c", "d"]
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 2, 3) / 10
    rows, names = grid_cells(images, prompts, max_prompts=3, max_samples=2)
    assert names == ["a", "b", "c"]
    assert [[round(float(c[0, 0, 0]), 4) for c in row] for row in rows] == [[0.0, 0.1], [0.3, 0.4], [0.5, 0.6]]
    assert rows[0][0].shape == (2, 3, 3)  # grey to RGB
    grid = tile(rows)
    assert grid.shape == (3 * 3 - 1, 2 * 4 - 1, 3)
    assert np.allclose(grid[2], 1.0) and np.allclose(grid[:, 3], 1.0)  # white gutters


def test_grid_input_errors_and_non_finite_pixels():
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        grid_cells(torch.zeros(2, 3, 4, 4), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        grid_cells(torch.zeros(2, 2, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match="max_prompts >= 1"):
        grid_cells(torch.zeros(1, 3, 4, 4), ["a"], max_prompts=0)
    rows, _ = grid_cells(torch.full((1, 3, 2, 2), float("nan")), ["a"])
    assert np.all(rows[0][0] == 0.0)


def test_grid_settings_are_validated_by_name():
    with pytest.raises(ValueError, match="logger.grid_samples must be a positive integer"):
        load_config(run_config("grpo", "logger.grid_samples=0"))


# --------------------------------------------------------------------------- a run's images and report
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report_run")
    cfg = run_config("flow_dppo", "trainer.iterations=2", "logger.backends=[csv,tensorboard]", "logger.grid_prompts=2",
                     "env.eval_samples_per_prompt=3")
    trainer = Trainer(cfg, run_dir, progress=False)
    trainer.train()
    return trainer, run_dir


def test_a_run_writes_grids_curves_and_report(finished_run):
    trainer, run_dir = finished_run
    for name in ("iter_0000.png", "iter_0002.png", "first_vs_last.png"):
        assert (run_dir / "samples" / name).stat().st_size > 1000, name
    assert (run_dir / "curves.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "![curves](curves.png)" in report and "samples/first_vs_last.png" in report
    assert "| eval/train/digit_accuracy |" in report and "iteration 2" in report
    # the tensorboard log holds the grid as an image at both evaluations
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_file = next((run_dir / "logs").rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(event_file.parent), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/train")] == [0, 2]


def test_grid_cells_keep_their_prompt_and_noise_across_evaluations(finished_run):
    # two evaluations of unchanged weights give the same pictures: the grid's noise is fixed
    trainer, _ = finished_run
    trainer.evaluate()
    first = trainer.evaluator.samples["train"][0].clone()
    trainer.evaluate()
    assert torch.equal(trainer.evaluator.samples["train"][0], first)
    prompts = trainer.evaluator.samples["train"][1]
    assert prompts[:3] == [prompts[0]] * 3  # each prompt's samples side by side in one row


def test_report_of_several_runs_and_a_torn_metrics_line(finished_run, tmp_path):
    _, run_dir = finished_run
    torn = tmp_path / "torn"
    torn.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (torn / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 3, "rew')  # a kill during a write
    record = read_run(torn)
    assert [r["iteration"] for r in record.rows] == [0, 1, 2]
    assert record.problems and "torn" in record.problems[0]
    titles = [title for title, _ in panels([record])]
    assert titles[:4] == ["rollout reward and its terms", "evaluation reward (ODE)", "drift KL to the pretrained model",
                          "trust region: clip / mask fractions"]
    assert any("digit_fd" in t for t in titles)
    path = write_report([run_dir, torn], tmp_path / "both")
    text = path.read_text()
    assert text.count("### ") == 2 and "torn by an interrupted write" in text
    assert (tmp_path / "both" / "curves.png").is_file()


def test_report_command_line(finished_run, tmp_path):
    _, run_dir = finished_run
    out = subprocess.run([sys.executable, "-m", "algos.report", str(run_dir), "--out", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "report.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "algos.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "has no metrics.jsonl" in bad.stderr
    json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])  # the run's own file is intact
