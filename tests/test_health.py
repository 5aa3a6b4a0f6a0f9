"""Numerical health (algos/health.py): a NaN or inf stops the run, naming where, and loses nothing."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from algos.advantages import ADVANTAGES, make_advantage
from algos.checkpoint import latest_checkpoint
from algos.health import NumericalError, check_rollout, check_update
from algos.trainer import Trainer
from flowgym.rewards import Reward, register_reward
from sample_loss_toys import run_config

_CALLS = {"n": 0, "poison_from": 10**9}


@register_reward("test_health_poisoned")
class _Poisoned(Reward):
    """Brightness, turned NaN for two samples from the ``poison_from``-th call on."""

    def __call__(self, images, prompts):
        _CALLS["n"] += 1
        values = images.float().mean(dim=(1, 2, 3))
        if _CALLS["n"] >= _CALLS["poison_from"]:
            values[:2] = float("nan")
        return values


def _trajectory(B: int = 3, K: int = 4) -> TensorDict:
    td = TensorDict(
        {"sample_log_prob": torch.zeros(B, K), "stochastic": torch.tensor([True, True, False, True]).expand(B, K)},
        batch_size=[B, K],
    )
    td.set(("next", "latent"), torch.zeros(B, K, 1, 2, 2))
    return td


def test_rollout_checks_name_the_quantity_the_step_and_the_samples():
    reward, terms = torch.ones(3), {"ink": torch.ones(3)}
    check_rollout(_trajectory(), reward, terms, iteration=5)  # all finite: nothing raised
    td = _trajectory()
    td["sample_log_prob"][1, 2] = float("nan")  # a deterministic step: not trained, not checked
    check_rollout(td, reward, terms, iteration=5)
    td["sample_log_prob"][0, 3] = float("-inf")
    td["sample_log_prob"][2, 3] = float("nan")
    with pytest.raises(NumericalError, match=r"iteration 5: sample_log_prob is NaN and inf at denoising step 3 of 4 for 2 of 3 samples"):
        check_rollout(td, reward, terms, iteration=5)
    with pytest.raises(NumericalError, match=r"iteration 2: reward term 'ink' is NaN for 1 of 3 samples"):
        check_rollout(_trajectory(), reward, {"ink": torch.tensor([1.0, float("nan"), 0.0])}, iteration=2)
    final = _trajectory()
    final[("next", "latent")][:, -1] = float("inf")
    with pytest.raises(NumericalError, match="the final latent is inf for 3 of 3 samples"):
        check_rollout(final, reward, terms, iteration=1)


def test_update_checks():
    check_update(torch.tensor(0.5), torch.tensor(2.0), 0, 0, 1)
    with pytest.raises(NumericalError, match=r"iteration 3: the loss is NaN at inner epoch 1, mini-batch 2 \(the weights were not updated\)"):
        check_update(torch.tensor(float("nan")), torch.tensor(1.0), 1, 2, 3)
    with pytest.raises(NumericalError, match="the gradient norm is inf at inner epoch 0, mini-batch 0"):
        check_update(torch.tensor(0.0), torch.tensor(float("inf")), 0, 0, 1)


@pytest.mark.parametrize("name", sorted(n for n in ADVANTAGES if not n.startswith("test_")))  # not other tests' probes
def test_an_all_equal_reward_group_gives_zero_advantages(name):
    advantage = make_advantage(name)(torch.full((8,), 0.25), {"a": torch.full((8,), 0.25), "b": torch.zeros(8)},
                                     ["p"] * 4 + ["q"] * 4, torch.tensor([0] * 4 + [1] * 4))
    assert torch.equal(advantage, torch.zeros(8))


def test_a_nan_reward_stops_the_run_and_the_newest_checkpoint_is_the_last_good_one(tmp_path):
    cfg = run_config("flow_dppo", "trainer.iterations=4", "trainer.eval_every=0", "trainer.checkpoint_every=1")
    cfg["reward"]["weights"] = {"test_health_poisoned": 1.0}
    _CALLS.update(n=0, poison_from=3)  # the third rollout's reward is NaN
    trainer = Trainer(cfg, tmp_path, progress=False)
    try:
        with pytest.raises(NumericalError, match=r"iteration 3: reward term 'test_health_poisoned' is NaN for 2 of 8 samples"):
            trainer.train()
    finally:
        _CALLS.update(poison_from=10**9)
    assert trainer.iteration == 2
    assert latest_checkpoint(tmp_path / "checkpoints").name.endswith("2")
    resumed = Trainer(cfg, tmp_path, progress=False)
    assert resumed.resume() and resumed.iteration == 2
    resumed.train()  # the reward is healthy again: the run continues to the end
    assert resumed.iteration == 4


def test_a_nan_loss_stops_before_the_weights_move(tmp_path):
    trainer = Trainer(run_config("grpo", "trainer.iterations=2", "trainer.eval_every=0", "trainer.checkpoint_every=0"),
                      tmp_path, progress=False)
    forward = trainer.loss_module.forward

    def poisoned(td):
        out = forward(td)
        out["loss_objective"] = out["loss_objective"] * float("nan")
        return out

    trainer.loss_module.forward = poisoned
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    with pytest.raises(NumericalError, match="iteration 1: the loss is NaN at inner epoch 0, mini-batch 0"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))
