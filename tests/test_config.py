"""The config schema (algos/config.py): unknown keys name the accepted ones, wrong types name the key,
a method's policy_defaults are honoured, GDPO weighs the terms like the environment."""

from __future__ import annotations

import pytest

from algos.config import RunConfig, load_config
from algos.trainer import Trainer
from tests.test_trainer import config


def test_unknown_key_fails_with_the_accepted_keys():
    cfg = config()
    cfg["trainer"]["itrations"] = 3
    with pytest.raises(ValueError, match=r"unknown config key trainer\.'itrations'.*accepted keys of trainer: \[.*'iterations'"):
        load_config(cfg)
    cfg = config()
    cfg["envv"] = {}
    with pytest.raises(ValueError, match=r"unknown config key 'envv'; accepted keys of the config: \['algo', 'device', 'env'"):
        load_config(cfg)


def test_wrong_type_names_the_key():
    cfg = config()
    cfg["trainer"]["iterations"] = "many"
    with pytest.raises(ValueError, match="trainer.iterations"):
        load_config(cfg)


def test_every_default_comes_from_the_schema():
    run = load_config(config())
    assert isinstance(run, RunConfig)
    assert run.trainer.lr == RunConfig().trainer.lr and run.algo.kernel is None


def test_policy_defaults_of_the_method_are_honoured(tmp_path):
    trainer = Trainer(config("algo=cps", "trainer.iterations=1"), tmp_path / "a", progress=False)
    assert trainer.policy.kernel_name == "cps" and trainer.policy.noise_level == 0.8  # CPSLoss.policy_defaults
    override = Trainer(config("algo=cps", "algo.noise_level=0.5", "trainer.iterations=1"), tmp_path / "b", progress=False)
    assert override.policy.noise_level == 0.5
    assert Trainer(config("algo=grpo"), tmp_path / "c", progress=False).policy.kernel_name == "flow_sde"


def test_gdpo_takes_the_reward_weights(tmp_path):
    trainer = Trainer(config("algo.advantage=gdpo", "reward=digits_bold", "reward.weights.ink=0.5"), tmp_path, progress=False)
    assert trainer.advantage.weights == {"digit_alignment": 1.0, "ink": 0.5}


def test_the_evaluation_guidance_never_changes_the_training_policy(tmp_path):
    trainer = Trainer(config("trainer.eval_guidance_scale=2.0"), tmp_path, progress=False)
    trainer.evaluate()
    assert trainer.policy.guidance_scale == 1.0 and trainer.evaluator.policy.guidance_scale == 2.0


def test_command_line_typo_fails_with_the_accepted_keys():
    import subprocess
    import sys
    from pathlib import Path

    from algos.config import check_overrides

    with pytest.raises(ValueError, match=r"unknown config key 'trainer.ema.decy'; accepted keys of trainer.ema: \['decay', 'enabled', 'every'\]"):
        check_overrides(["trainer.ema.decy=0.5"])
    check_overrides(["algo=grpo", "algo.loss.delta=1e-4", "env.backend.weights=x", "+extra=1", "hydra.run.dir=x", "--multirun"])
    out = subprocess.run([sys.executable, "-m", "algos.run", "trainer.itrations=3"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "accepted keys of trainer" in out.stderr and "'iterations'" in out.stderr


def test_num_threads_is_validated_and_applied(tmp_path):
    import torch

    from algos.config import load_config
    from algos.trainer import Trainer
    from sample_loss_toys import run_config

    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        load_config(run_config("grpo", "num_threads=0"))
    before = torch.get_num_threads()
    try:
        Trainer(run_config("grpo", "num_threads=1"), tmp_path, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
