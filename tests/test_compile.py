"""``trainer.compile``: the compiled velocity model gives the eager model's trajectories and losses."""

from __future__ import annotations

import math

import pytest
import torch

from algos.trainer import Trainer


def small(compile: bool) -> dict:
    return {
        "seed": 3,
        "env": {"name": "digits", "num_prompts": 2, "group_size": 4, "num_steps": 4, "stochastic_steps": "all_but_last"},
        "algo": {"name": "flow_dppo"},
        "trainer": {"iterations": 1, "num_minibatches": 1, "eval_every": 0, "checkpoint_every": 0, "compile": compile},
        "logger": {"backends": [], "sample_grid": False, "report": False},
    }


def one_iteration(compile: bool, tmp_path) -> tuple[dict, dict]:
    trainer = Trainer(small(compile), tmp_path / f"run-{compile}", progress=False)
    rollout = trainer.collect()
    stats = trainer.update(trainer.training_batch(rollout), rollout["conditioning"])
    return rollout, stats


def test_the_compiled_model_gives_the_eager_trajectories_and_losses_to_1e_5(tmp_path):
    eager, eager_stats = one_iteration(False, tmp_path)
    compiled, compiled_stats = one_iteration(True, tmp_path)
    for key in ("latent", "action", "sample_log_prob", "velocity"):
        torch.testing.assert_close(compiled["trajectory"].get(key), eager["trajectory"].get(key), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled["reward"], eager["reward"], atol=1e-5, rtol=1e-5)
    for key in ("loss_objective", "kl_old_new_mean", "ratio_mean", "grad_norm"):
        a, b = compiled_stats[key], eager_stats[key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-5), key


def test_a_bad_compile_mode_names_the_accepted_ones():
    from algos.config import load_config

    with pytest.raises(ValueError, match="trainer.compile_mode must be null, 'default', 'reduce-overhead'"):
        load_config({**small(True), "trainer": {"compile": True, "compile_mode": "fastest"}})
