"""DiffusionNFT (algos/losses/diffusion_nft.py): hand-computed values, the reduced form, the old
policy copy, option errors, and short runs of ``algos.run algo=diffusion_nft`` with a resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from algos.losses import DIAGNOSTIC_KEYS, LOSSES, SAMPLES, TRANSITIONS, DiffusionNFTLoss, batch_kind, make_loss
from algos.losses.sample_functional import nft_objective, nft_optimality, soft_update_decay
from algos.trainer import Trainer
from sample_loss_toys import NUM_STEPS, SMALL, AdapterToy, comparable, perturb, rollout_samples, run_config, sample_rows

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the formulas by hand
def test_objective_hand_computed():
    # one row of two dimensions: x0 = (1, -1), eps = (0.5, 0.5), t = 0.5 -> x_t = (0.75, -0.25)
    x0 = torch.tensor([[1.0, -1.0]])
    x_t = torch.tensor([[0.75, -0.25]])
    v = torch.tensor([[0.2, 0.4]], requires_grad=True)
    v_old = torch.tensor([[0.0, 0.2]])
    r = nft_optimality(torch.tensor([2.0]))  # 2 / 10 + 0.5
    assert r.item() == pytest.approx(0.7)
    terms = nft_objective(v, v_old, x_t, x0, torch.tensor([0.5]), r, strength=0.5)
    # v_pos = 0.5 v + 0.5 v_old = (0.1, 0.3): x0_pos = (0.7, -0.4), error (-0.3, 0.6): mse 0.225, mae 0.45
    assert terms.positive.item() == pytest.approx(0.225 / 0.45, rel=1e-6)
    # v_neg = 1.5 v_old - 0.5 v = (-0.1, 0.1): x0_neg = (0.8, -0.3), error (-0.2, 0.7): mse 0.265, mae 0.45
    assert terms.negative.item() == pytest.approx(0.265 / 0.45, rel=1e-6)
    assert terms.per_row.item() == pytest.approx((0.7 * 0.5 + 0.3 * 0.265 / 0.45) / 0.5, rel=1e-6)
    # the adaptive weight carries no gradient: d L_pos / d v = -t * b * 2 (x0_pos - x0) / (D * mae)
    (grad,) = torch.autograd.grad(terms.positive.sum(), v)
    torch.testing.assert_close(grad, -0.5 * 0.5 * 2 * torch.tensor([[-0.3, 0.6]]) / (2 * 0.45))
    # r clamps: A >= 5 -> 1, A <= -5 -> 0, A = 0 -> 0.5
    torch.testing.assert_close(nft_optimality(torch.tensor([7.0, -9.0, 0.0, -2.5])), torch.tensor([1.0, 0.0, 0.5, 0.25]))


def test_decay_schedule():
    assert [soft_update_decay(s, 0.001, 0.5) for s in (0, 1, 10, 499, 500, 10_000)] == pytest.approx([0, 0.001, 0.01, 0.499, 0.5, 0.5])
    # the OCR recipe: 0 for 75 steps, then 0.0075 per step up to 0.999
    assert soft_update_decay(74, 0.0075, 0.999, flat=75) == 0.0
    assert soft_update_decay(175, 0.0075, 0.999, flat=75) == pytest.approx(0.75)
    assert soft_update_decay(10_000, 0.0075, 0.999, flat=75) == pytest.approx(0.999)


# --------------------------------------------------------------------------- the loss module
def test_registered_as_a_per_sample_loss():
    assert LOSSES["diffusion_nft"] is DiffusionNFTLoss
    assert batch_kind(DiffusionNFTLoss) == SAMPLES and batch_kind(LOSSES["grpo"]) == TRANSITIONS
    assert DiffusionNFTLoss.default_advantage == "group" and DiffusionNFTLoss.policy_defaults["kernel"] == "ode"
    policy, _ = rollout_samples()
    loss = make_loss("diffusion_nft", policy)
    assert (loss.strength, loss.beta, loss.advantage_clip, loss.timestep_fraction) == (1.0, 1e-4, 5.0, 0.99)
    with pytest.raises(TypeError, match="no per-step old policy"):
        loss.refresh_old_policy(TensorDict({}, batch_size=[0]))


def test_prepare_draws_distinct_sampling_timesteps_and_fresh_noise():
    policy, samples = rollout_samples()
    loss = DiffusionNFTLoss(policy)
    out = loss.prepare(samples.clone(), generator=torch.Generator().manual_seed(3))
    T = int(NUM_STEPS * 0.99)
    assert out["sigma"].shape == (8, T) and out["noise"].shape == (8, T, 1, 4, 4)
    for row, schedule in zip(out["sigma"], samples["sigmas"]):
        assert len(set(row.tolist())) == T and set(row.tolist()) <= set(schedule.tolist())
    again = loss.prepare(samples.clone(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["sigma"], out["sigma"]) and torch.equal(again["noise"], out["noise"])
    assert not torch.equal(loss.prepare(samples.clone(), generator=torch.Generator().manual_seed(4))["noise"], out["noise"])


def test_b1_r1_is_adaptively_weighted_flow_matching_toward_own_samples():
    policy, samples = rollout_samples()
    perturb(policy)  # the old policy (a copy taken at construction) differs: v_old must not matter
    loss = DiffusionNFTLoss(policy, strength=1.0, beta=0.0)
    perturb(policy, seed=2)
    samples = loss.prepare(samples, generator=torch.Generator().manual_seed(0))
    samples["advantage"] = torch.full((8,), 6.0)  # r = 1: the positive branch only
    out = loss(samples)
    assert set(out.keys()) == set(loss.out_keys) and set(DIAGNOSTIC_KEYS) <= set(out.keys())
    assert out["optimality_mean"].item() == 1.0 and out["old_velocity_mse"].item() > 0
    # the reduced form, written independently: the velocity's flow-matching error u = v - (eps - x0),
    # loss = 5 * meansample_rows(t * mean(u^2) / sg(mean|u|))
    x0, eps, t, x_t, cond = sample_rows(samples)
    u = policy.velocity(x_t, t, cond) - (eps - x0)
    reduced = 5.0 * (t * (u**2).mean(dim=(1, 2, 3)) / u.abs().mean(dim=(1, 2, 3)).detach()).mean()
    assert out["loss_objective"].item() == pytest.approx(reduced.item(), rel=1e-5)
    params = list(policy.trainable_parameters())
    for g, e in zip(torch.autograd.grad(out["loss_objective"], params), torch.autograd.grad(reduced, params)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_zero_advantage_has_no_gradient_at_the_old_policy():
    # r = 0.5 and v = v_old: the positive and the negative branch pull in opposite directions equally
    policy, samples = rollout_samples()
    loss = DiffusionNFTLoss(policy, beta=0.0)
    samples = loss.prepare(samples, generator=torch.Generator().manual_seed(0))
    samples["advantage"] = torch.zeros(8)
    out = loss(samples)
    assert out["old_velocity_mse"].item() == 0.0 and out["optimality_mean"].item() == 0.5
    grads = torch.autograd.grad(out["loss_objective"], list(policy.trainable_parameters()))
    assert max(g.abs().max().item() for g in grads) < 1e-6
    assert out["positive_loss"].item() == pytest.approx(out["negative_loss"].item(), rel=1e-6)


def test_old_copy_moves_by_its_schedule_and_is_used_for_sampling():
    policy, samples = rollout_samples()
    loss = DiffusionNFTLoss(policy, old_decay_rate=0.1, old_decay_max=0.25)
    params = list(policy.trainable_parameters())
    start = [p.detach().clone() for p in params]
    perturb(policy)
    live = [p.detach().clone() for p in params]
    assert loss.after_update(2) == {"old_decay": pytest.approx(0.2)}  # d = min(0.1 * 2, 0.25)
    for old, s, l in zip(loss.copy("old").shadow, start, live):
        torch.testing.assert_close(old, 0.2 * s + 0.8 * l)
    assert loss.after_update(3)["old_decay"] == pytest.approx(0.25) and loss.num_updates == 5
    expected = [o.clone() for o in loss.copy("old").shadow]
    with loss.sampling():  # the rollout policy is the old one
        assert all(torch.equal(p, o) for p, o in zip(params, expected))
    assert all(torch.equal(p, l) for p, l in zip(params, live))  # and the live weights come back
    with DiffusionNFTLoss(policy, sample_with_old=False).sampling():
        assert all(torch.equal(p, l) for p, l in zip(params, live))
    # the training state round-trips
    other = DiffusionNFTLoss(policy)
    other.load_training_state(loss.training_state())
    assert other.num_updates == 5 and all(torch.equal(a, b) for a, b in zip(other.copy("old").shadow, expected))


def test_lora_like_backend_copies_only_the_adapters_and_refers_to_adapters_off():
    backend = AdapterToy(latent_shape=(1, 4, 4), seed=0)
    policy, samples = rollout_samples(backend)
    loss = DiffusionNFTLoss(policy, beta=1e-2)
    assert len(loss.copy("old").shadow) == 2
    optimizer = torch.optim.Adam(list(loss.trainable_parameters()), lr=1e-2)
    samples = loss.prepare(samples, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        out = loss(samples)
        optimizer.zero_grad()
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        optimizer.step()
    assert backend.adapter_b.abs().sum() > 0
    out = loss(samples)
    x0, eps, t, x_t, cond = sample_rows(samples)
    with torch.no_grad():
        v = policy.velocity(x_t, t, cond)
        backend.adapter_off = True
        v_base = policy.velocity(x_t, t, cond)
        backend.adapter_off = False
    assert out["ref_velocity_mse"].item() == pytest.approx(((v - v_base) ** 2).mean().item(), rel=1e-5)
    assert out["loss_kl"].item() == pytest.approx(1e-2 * out["ref_velocity_mse"].item(), rel=1e-5)
    # the old copy is still the start (adapter B = 0): v_old is the base model's velocity
    assert out["old_velocity_mse"].item() == pytest.approx(out["ref_velocity_mse"].item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 0.0}, "strength must be a finite number > 0"),
        ({"strength": -1.0}, "strength must be a finite number > 0"),
        ({"strength": float("inf")}, "strength must be a finite number > 0"),
        ({"beta": -1e-4}, "beta must be"),
        ({"advantage_clip": 0.0}, "advantage_clip must be a finite number > 0"),
        ({"timestep_fraction": 0.0}, r"timestep_fraction must lie in \(0, 1\]"),
        ({"timestep_fraction": 1.5}, r"timestep_fraction must lie in \(0, 1\]"),
        ({"old_decay_rate": -0.001}, "old_decay_rate must be"),
        ({"old_decay_max": 1.5}, r"old_decay_max must lie in \[0, 1\]"),
        ({"old_decay_flat": -1}, "old_decay_flat must be an integer >= 0"),
        ({"weight_floor": 0.0}, "weight_floor must be a number > 0"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    policy, _ = rollout_samples()
    with pytest.raises(ValueError, match=message):
        DiffusionNFTLoss(policy, **kwargs)


# --------------------------------------------------------------------------- the trainer and algos.run
def config(*overrides: str) -> dict:
    return run_config("diffusion_nft", *overrides)


def test_recipe_config(tmp_path):
    cfg = config()
    assert cfg["algo"]["name"] == "diffusion_nft" and cfg["algo"]["loss"]["strength"] == 1.0
    assert cfg["trainer"]["num_minibatches"] == 1 and cfg["trainer"]["drop_zero_advantage"] is False
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.batch_kind == SAMPLES and trainer.policy.kernel_name == "ode"
    assert trainer.env.stochastic_spec == "none"  # ODE sampling: no rollout step draws noise
    with pytest.raises(ValueError, match="refresh_old_policy"):
        Trainer(config("trainer.refresh_old_policy=true"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="8 samples do not split into trainer.num_minibatches=3"):
        Trainer(config("trainer.num_minibatches=3"), tmp_path, progress=False)


def test_algos_run_two_iterations(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", "algo=diffusion_nft", *SMALL, "trainer.iterations=2", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        for key in ("loss_objective", "loss_kl", "old_velocity_mse", "ref_velocity_mse", "old_decay", "grad_norm", "drift_kl"):
            assert row.get(key) is not None, (key, row)
        assert row["num_updates"] == 1 and row["num_samples"] == 8 and row["num_pairs"] == 8 * int(NUM_STEPS * 0.99)
    assert [r["old_decay"] for r in rows[1:]] == pytest.approx([0.001, 0.002])
    assert rows[2]["drift_kl"] > 0.0 and "eval/heldout/digit_accuracy" in rows[2]


def test_resume_restores_the_old_policy(tmp_path):
    full = Trainer(config("trainer.iterations=4"), tmp_path / "full", progress=False)
    full_rows = full.train()
    first = Trainer(config("trainer.iterations=2"), tmp_path / "split", progress=False)
    first.train()
    second = Trainer(config("trainer.iterations=4"), tmp_path / "split", progress=False)
    assert second.resume() and second.iteration == 2
    assert second.loss_module.num_updates == 2
    # the old copy is the checkpoint's, not the fresh trainer's (which equals the pretrained weights)
    for a, b in zip(second.loss_module.copy("old").shadow, first.loss_module.copy("old").shadow):
        assert torch.equal(a, b)
    assert comparable(second.train()) == comparable(full_rows)
    state_a, state_b = full.loss_module.training_state(), second.loss_module.training_state()
    assert state_a["num_updates"] == state_b["num_updates"] == 4
    for a, b in zip(state_a["copies"]["old"]["shadow"], state_b["copies"]["old"]["shadow"]):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(full.backend.trainable_state_dict().items(), second.backend.trainable_state_dict().items()):
        assert torch.equal(a, b), name
