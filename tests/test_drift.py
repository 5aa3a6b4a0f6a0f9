"""The drift KL to the pretrained model: batched over steps, subsampled, every n-th iteration."""

from __future__ import annotations

import math

import pytest
import torch

from algos.evaluation import drift_kl, drift_sample_indices, trajectory_drift
from algos.trainer import Trainer
from test_trainer import config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer after 2 iterations (its policy has moved off the reference) and a fresh rollout."""
    trainer = Trainer(config("trainer.iterations=2", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                             "logger.sample_grid=false", "logger.report=false"), tmp_path_factory.mktemp("drift"), progress=False)
    trainer.train()
    with torch.no_grad():
        traj = trainer.env.rollout(trainer.env.num_steps, trainer.policy)
    return trainer, traj


def per_step_drift(trainer, traj) -> torch.Tensor:
    """The former estimate: one reference forward per step, the mean of the per-step means."""
    steps = [drift_kl(trainer.backend, trainer.policy, traj[:, k], trainer.strategy.autocast) for k in range(traj.batch_size[1] - 1)]
    return torch.stack(steps).mean()


@pytest.mark.parametrize("rows_per_forward", [None, 1, 5, 7])
def test_batched_drift_equals_the_per_step_estimate(trained, rows_per_forward):
    trainer, traj = trained
    expected = per_step_drift(trainer, traj)
    assert expected > 0
    got = trajectory_drift(trainer.backend, trainer.policy, traj, trainer.strategy.autocast, rows_per_forward=rows_per_forward)
    # float32 tolerance: the reference forwards run at other batch shapes than the per-step ones, and
    # the KL of two nearly equal velocities amplifies their rounding (1.2e-6 relative seen with 1 row)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-12)


def test_subsampled_drift_is_the_estimate_on_those_samples(trained):
    trainer, traj = trained
    samples = drift_sample_indices(traj.batch_size[0], 2)
    assert samples.tolist() == [0, 4]  # 2 groups of 4: one sample of each
    got = trajectory_drift(trainer.backend, trainer.policy, traj, trainer.strategy.autocast, samples=samples)
    assert torch.allclose(got, per_step_drift(trainer, traj[samples]), rtol=1e-6, atol=1e-12)


def test_sample_indices():
    assert drift_sample_indices(8, None) is None and drift_sample_indices(8, 8) is None and drift_sample_indices(8, 20) is None
    assert drift_sample_indices(64, 8).tolist() == list(range(0, 64, 8))
    assert drift_sample_indices(10, 3).tolist() == [0, 3, 6]
    with pytest.raises(ValueError, match="trainer.drift_samples"):
        drift_sample_indices(8, 0)


def test_drift_every_n_iterations_and_on_a_subset(tmp_path):
    rows = Trainer(config("trainer.iterations=4", "trainer.drift_every=2", "trainer.drift_samples=2", "trainer.eval_every=0",
                          "logger.sample_grid=false", "logger.report=false"), tmp_path, progress=False).train()
    drift = {r["iteration"]: r["drift_kl"] for r in rows}
    skipped = [drift[1], drift[3]]  # logged as NaN (null in metrics.jsonl)
    assert all(v is None or math.isnan(v) for v in skipped) and drift[2] > 0 and drift[4] > 0


@pytest.mark.parametrize("override", ["trainer.drift_every=0", "trainer.drift_samples=0", "trainer.drift_rows_per_forward=-1"])
def test_bad_drift_settings_are_refused_naming_the_key(tmp_path, override):
    with pytest.raises(ValueError, match=override.split("=")[0]):
        Trainer(config(override), tmp_path, progress=False)
