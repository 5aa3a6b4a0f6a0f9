"""kill -9 at random moments, including inside a checkpoint write, then ``resume=true``: the run ends
with the same metrics and weights as an uninterrupted one (issue 19, "what must keep holding").

One run is killed three times at seeded random moments (one of them always inside a checkpoint
write, widened by ``FLOWGYM_CHECKPOINT_PAUSE``); each kill is followed by ``resume=true`` from a new
folder, the last resume runs to the end. An uninterrupted run of the same config runs beside it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from algos.checkpoint import latest_checkpoint
from sample_loss_toys import SMALL, comparable

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 8
ARGS = [*SMALL, "logger.report=false", "logger.sample_grid=false", "num_threads=1",
        f"trainer.iterations={ITERATIONS}", "trainer.checkpoint_every=1", "trainer.eval_every=4"]
KILLS = 3
DEADLINE_S = 150


def _start(run_dir: Path, *extra: str, pause: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLOWGYM_CHECKPOINT_PAUSE": str(pause)}
    return subprocess.Popen([sys.executable, "-m", "algos.run", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _newest(checkpoints: Path) -> int:
    newest = latest_checkpoint(checkpoints)
    return int(newest.name.split("-")[1]) if newest is not None else 0


def _wait(proc: subprocess.Popen, ready, what: str) -> bool:
    """Poll ``ready()`` until true (True) or the process ends first (False)."""
    deadline = time.time() + DEADLINE_S
    while time.time() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("seed", [19])
def test_random_sigkills_then_resume_end_where_an_uninterrupted_run_ends(seed, tmp_path):
    rng = random.Random(seed)
    reference = _start(tmp_path / "reference" / "run")  # outside runs/: resume=true never picks it
    runs = tmp_path / "runs"
    checkpoints = runs / "first" / "checkpoints"
    kills = []
    try:
        for index in range(KILLS):
            extra = ("resume=true",) if index else ()
            proc = _start(runs / ("first" if index == 0 else f"resume{index}"), *extra, pause=0.25)
            start = _newest(checkpoints)
            in_write = index == 1 or rng.random() < 0.5
            if in_write:  # inside a checkpoint write of this process, at a random point of it
                reached = _wait(proc, lambda: any(checkpoints.glob(f"iter-*.tmp-{proc.pid}")), "a checkpoint write")
                delay = rng.uniform(0.0, 0.2)
            else:  # any moment after this process made progress (a new checkpoint)
                reached = _wait(proc, lambda: _newest(checkpoints) > start, "a new checkpoint")
                delay = rng.uniform(0.0, 0.6)
            if not reached:
                output = proc.stdout.read()
                pytest.fail(f"run {index} ended before its kill (rc={proc.returncode}):\n{output[-3000:]}")
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
            kills.append((index, "in a checkpoint write" if in_write else "anywhere", round(delay, 3), _newest(checkpoints)))
            assert latest_checkpoint(checkpoints) is not None  # the newest complete one is intact
        final = _start(runs / "last", "resume=true")
        output, _ = final.communicate(timeout=300)
        assert final.returncode == 0, output[-3000:]
        assert "resumed" in output
        ref_output, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, ref_output[-3000:]
    finally:
        for proc in (reference,):
            if proc.poll() is None:
                proc.kill()
    print("kills (run, where, delay s, newest checkpoint after):", kills)
    assert any(kind == "in a checkpoint write" for _, kind, _, _ in kills), kills
    expected = _rows(tmp_path / "reference" / "run")
    got = _rows(runs / "first")
    assert [r["iteration"] for r in got] == list(range(ITERATIONS + 1)), kills
    assert comparable(got) == comparable(expected), kills
    ours = load_file(str(latest_checkpoint(checkpoints) / "weights.safetensors"))
    theirs = load_file(str(latest_checkpoint(tmp_path / "reference" / "run" / "checkpoints") / "weights.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), kills
