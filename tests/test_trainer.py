"""The trainer and the Hydra entry point: configs, metrics, resume, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from algos.checkpoint import latest_checkpoint
from algos.trainer import Trainer

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
ROOT = Path(__file__).resolve().parents[1]

# a small but complete run: 2 prompts x 4 samples, 4 steps, evaluation and checkpoints every 2
SMALL = [
    "env.num_prompts=2",
    "env.group_size=4",
    "env.num_steps=4",
    "env.stochastic_steps=[0,1]",
    "env.eval_samples_per_prompt=1",
    "trainer.eval_every=2",
    "trainer.checkpoint_every=2",
    "logger.backends=[csv]",
    "device=cpu",
]


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMALL, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.mark.parametrize("algo", ["flow_dppo", "grpo", "cps", "ppo_clip"])
def test_every_algorithm_trains_and_logs(algo, tmp_path):
    rows = Trainer(config(f"algo={algo}", "trainer.iterations=2"), tmp_path, progress=False).train()
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert comparable(logged) == comparable(rows)
    for row in rows[1:]:
        # reward terms, the algorithm's loss diagnostics and the drift KL, every iteration
        for key in ("reward", "reward/digit_alignment", "loss_objective", "ratio_mean", "approx_kl",
                    "kl_old_new_mean", "frac_over_threshold", "drift_kl"):
            assert row.get(key) is not None, (key, row)
    # the first rollout is collected by the pretrained policy: zero up to the rounding of a reference
    # forward over all steps' states at once (another batch than the rollout's per-step forwards)
    assert abs(rows[1]["drift_kl"]) < 1e-10
    assert rows[2]["drift_kl"] > 0.0
    assert "eval/heldout/digit_accuracy" in rows[2] and "eval/train/drift_kl" in rows[2]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "iter-000002"
    assert list((tmp_path / "logs").rglob("*.csv")), "torchrl's CSV logger wrote nothing"


def test_resume_matches_uninterrupted_run(tmp_path):
    full = Trainer(config("trainer.iterations=4"), tmp_path / "full", progress=False).train()
    first = Trainer(config("trainer.iterations=2"), tmp_path / "split", progress=False)
    first.train()
    second = Trainer(config("trainer.iterations=4"), tmp_path / "split", progress=False)
    assert second.resume()
    assert second.iteration == 2
    resumed = second.train()
    assert comparable(resumed) == comparable(full)
    final_a = Trainer(config(), tmp_path / "full", progress=False)
    final_b = Trainer(config(), tmp_path / "split", progress=False)
    final_a.resume(), final_b.resume()
    for (name, a), (_, b) in zip(final_a.backend.trainable_state_dict().items(), final_b.backend.trainable_state_dict().items()):
        assert torch.equal(a, b), name


def test_sigkill_during_checkpoint_write_resumes_from_last_complete(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "algos.run", *SMALL, "trainer.iterations=3", "trainer.checkpoint_every=1",
            "trainer.eval_every=0", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "FLOWGYM_CHECKPOINT_PAUSE": "5", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        # the first checkpoint is written (pausing 5 s mid-write); wait for it to complete, then for
        # the second one to start, and kill the process inside that write
        while time.time() < deadline and not list((run_dir / "checkpoints").glob("iter-000002.tmp-*")):
            assert proc.poll() is None, "the run ended before its second checkpoint"
            time.sleep(0.2)
        assert list((run_dir / "checkpoints").glob("iter-000002.tmp-*")), "timed out waiting for the write"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert latest_checkpoint(run_dir / "checkpoints").name == "iter-000001"
    resumed = subprocess.run(
        [sys.executable, "-m", "algos.run", *SMALL, "trainer.iterations=3", "trainer.checkpoint_every=1",
         "trainer.eval_every=0", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'second'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout and "at iteration 1" in resumed.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert latest_checkpoint(run_dir / "checkpoints").name == "iter-000003"


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.lr=-1e-3", "trainer.lr must be a positive number"),
        ("algo.loss.delta=-1e-5", "algo.loss.delta must be a number >= 0"),
        ("env.group_size=1", "group-relative and needs env.group_size >= 2"),
        ("trainer.num_minibatches=5", "do not split into trainer.num_minibatches=5"),
        ("trainer.iterations=0", "trainer.iterations must be a positive integer"),
    ],
)
def test_invalid_values_fail_before_any_work(override, message, tmp_path):
    cfg = config(override)
    if override.startswith("env.group_size"):
        cfg["algo"]["advantage"] = "group"
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_algo_lists_choices():
    with pytest.raises(MissingConfigException) as error:
        config("algo=trpo")
    text = str(error.value)
    for choice in ("flow_dppo", "grpo", "cps", "ppo_clip"):
        assert choice in text


def test_refresh_old_policy_gives_exact_first_ratios(tmp_path):
    cfg = config("trainer.iterations=1", "trainer.num_minibatches=1", "trainer.refresh_old_policy=true", "trainer.eval_every=0")
    row = Trainer(cfg, tmp_path, progress=False).train()[-1]
    # one optimizer step per rollout: the loss sees the policy that collected it
    assert row["ratio_min"] == 1.0 and row["ratio_max"] == 1.0
    assert row["kl_old_new_max"] == 0.0


def test_micro_batches_accumulate_to_the_same_update(tmp_path):
    # GRPO's loss is a mean over pairs, so accumulating micro-batch means weighted by their share
    # reproduces the whole mini-batch's gradient (up to float rounding)
    def first_gradients(*extra):
        trainer = Trainer(config("algo=grpo", "trainer.iterations=1", "trainer.eval_every=0", *extra), tmp_path / str(extra), progress=False)
        captured = []
        trainer.optimizer.step = lambda: captured.append([p.grad.clone() for p in trainer._all_params()])
        trainer.train()
        return captured

    whole, split = first_gradients(), first_gradients("trainer.micro_batch_size=5")
    assert len(whole) == len(split) == 2
    for grads_a, grads_b in zip(whole, split):
        for a, b in zip(grads_a, grads_b):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
        assert any(a.abs().sum() > 0 for a in grads_a)


def test_several_rollout_batches_per_iteration(tmp_path):
    trainer = Trainer(config("trainer.rollout_batches=3", "trainer.iterations=1", "trainer.eval_every=0"), tmp_path, progress=False)
    rollout = trainer.collect()
    assert rollout["trajectory"].batch_size[0] == 3 * 8 and len(rollout["prompts"]) == 24
    assert sorted(set(rollout["group_id"].tolist())) == list(range(6))  # 2 groups per episode, offset
    row = trainer.train()[-1]
    assert row["num_pairs"] <= 24 * 2 and row["num_updates"] == 2


def test_chunked_evaluation_matches_whole(tmp_path):
    whole = Trainer(config("env.eval_samples_per_prompt=2"), tmp_path / "a", progress=False).evaluate()
    chunked = Trainer(config("env.eval_samples_per_prompt=2", "trainer.eval_batch_size=3"), tmp_path / "b", progress=False)
    chunked_metrics = chunked.evaluate()
    assert whole.keys() == chunked_metrics.keys()
    # same prompts, same pretrained model; the initial noise differs per chunk, so compare loosely
    assert abs(whole["eval/train/digit_accuracy"] - chunked_metrics["eval/train/digit_accuracy"]) <= 0.5
    assert abs(chunked_metrics["eval/train/drift_kl"]) < 1e-10  # the pretrained model, up to rounding


def test_unknown_or_missing_logger_backend_is_a_clear_error(tmp_path):
    import importlib.util

    with pytest.raises(ValueError, match="unknown logger backend 'mlflow'; accepted: csv, tensorboard, wandb"):
        Trainer(config("logger.backends=[mlflow]"), tmp_path, progress=False)
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="pip install wandb"):
            Trainer(config("logger.backends=[wandb]"), tmp_path, progress=False)


def test_sliding_stochastic_window_follows_the_training_iteration(tmp_path):
    # MixGRPO's sampler: the one SDE step moves by one step per iteration (window 1, slide_every 1)
    from sample_loss_toys import run_config

    cfg = run_config("grpo", "trainer.iterations=3", "trainer.eval_every=0", "trainer.checkpoint_every=0")
    cfg["env"]["stochastic_steps"] = {"window": 1, "range": [0, 3], "slide_every": 1}
    trainer = Trainer(cfg, tmp_path, progress=False)
    seen = []
    collect = trainer.collect

    def recording_collect():
        rollout = collect()
        seen.append(rollout["trajectory"].get("stochastic")[0].nonzero().flatten().tolist())
        return rollout

    trainer.collect = recording_collect
    trainer.train()
    assert seen == [[0], [1], [2]]
