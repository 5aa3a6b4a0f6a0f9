"""trainer.async_rewards: each rollout batch is scored in a background thread while the next is sampled."""

from __future__ import annotations

import threading

import pytest
import torch

from algos.trainer import Trainer
from flowgym.rewards import Reward, make_reward, register_reward
from sample_loss_toys import comparable, run_config

SIZE = ("trainer.iterations=2", "trainer.rollout_batches=3", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "logger.sample_grid=false", "logger.report=false")


def test_async_rewards_give_the_synchronous_run_bit_for_bit(tmp_path):
    sync = Trainer(run_config("flow_dppo", *SIZE), tmp_path / "sync", progress=False).train()
    overlapped = Trainer(run_config("flow_dppo", *SIZE, "trainer.async_rewards=true"), tmp_path / "async", progress=False).train()
    assert comparable(overlapped) == comparable(sync)


#: set when the trainer starts sampling the second rollout batch of an iteration
SECOND_ROLLOUT = threading.Event()


@register_reward("test_async_waits_for_the_next_rollout")
class _WaitsForNextRollout(Reward):
    """Scores the first batch only once the second batch's sampling has begun: a trainer that scores
    before it samples the next batch never gets there (the wait times out and the reward raises)."""

    def __init__(self) -> None:
        self.alignment = make_reward("digit_alignment")
        self.calls = 0

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls == 1 and not SECOND_ROLLOUT.wait(timeout=30):
            raise RuntimeError("the first batch was scored before the second was sampled: no overlap")
        return self.alignment(images, prompts)


@pytest.mark.parametrize("overlap", [True, False])
def test_the_reward_of_a_batch_runs_while_the_next_batch_is_sampled(tmp_path, overlap, monkeypatch):
    SECOND_ROLLOUT.clear()
    overrides = [*SIZE, "trainer.iterations=1", f"trainer.async_rewards={str(overlap).lower()}"]
    cfg = run_config("flow_dppo", *overrides)
    cfg["reward"]["weights"] = {"test_async_waits_for_the_next_rollout": 1.0}
    trainer = Trainer(cfg, tmp_path, progress=False)
    rollouts = []
    real_rollout = trainer.env.rollout

    def counting_rollout(*args, **kwargs):
        rollouts.append(1)
        if len(rollouts) == 2:
            SECOND_ROLLOUT.set()
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(trainer.env, "rollout", counting_rollout)
    if overlap:
        rows = trainer.train()
        assert len(rollouts) == 3 and torch.isfinite(torch.tensor(rows[-1]["reward"]))
    else:
        monkeypatch.setattr(SECOND_ROLLOUT, "wait", lambda timeout: SECOND_ROLLOUT.is_set())  # no 30 s wait
        with pytest.raises(RuntimeError, match="no overlap"):
            trainer.train()


def test_deferred_episodes_carry_nan_rewards_and_their_images(tmp_path):
    trainer = Trainer(run_config("flow_dppo", *SIZE), tmp_path, progress=False)
    with trainer.env.rewards_deferred():
        traj = trainer.env.rollout(trainer.env.num_steps, trainer.policy)
    assert torch.isnan(traj.get(("next", "reward"))[:, -1]).all()
    images = trainer.env.last_images
    assert images is not None and torch.isfinite(images).all()
    # outside the block the env scores again
    traj = trainer.env.rollout(trainer.env.num_steps, trainer.policy)
    assert torch.isfinite(traj.get(("next", "reward"))[:, -1]).all()
