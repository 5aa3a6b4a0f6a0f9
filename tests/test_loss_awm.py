"""AWM (algos/losses/awm.py): the surrogate log-prob by hand, PPO-clip on its ratio, the sequence
ratio reducing to the per-step one, the EMA copy, the timestep bins, option errors, and a short
``algos.run algo=awm`` with a resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algos.losses import LOSSES, SAMPLES, AWMLoss, batch_kind, make_loss
from algos.losses.sample_functional import awm_log_prob, clip_scale_advantage, stratified_step_indices
from algos.trainer import Trainer
from sample_loss_toys import SMALL, AdapterToy, comparable, perturb, rollout_samples, run_config, sample_rows

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the formulas by hand
def test_log_prob_weightings_hand_computed():
    # one row, two dimensions: x0 = (1, -1), eps = (0, 1) -> target eps - x0 = (-1, 2); v = (0, 0)
    # e = mean((v - target)^2) = (1 + 4) / 2 = 2.5, t = 0.4
    v = torch.zeros(1, 2)
    x0 = torch.tensor([[1.0, -1.0]])
    eps = torch.tensor([[0.0, 1.0]])
    t = torch.tensor([0.4])
    e, tiny = 2.5, 1e-10
    expected = {
        "uniform": -e,
        "t": -e * 0.4,
        "t2": -e * 0.16,
        "huber": -(math.sqrt(e + tiny) - math.sqrt(tiny)) * 0.4,
        "ghuber": -((e + tiny) ** 0.25 - tiny**0.25) * 0.4 / 0.25,
    }
    for weighting, value in expected.items():
        out = awm_log_prob(v, x0, eps, t, weighting)
        assert out.dtype == torch.float64 and out.item() == pytest.approx(value, rel=1e-7), weighting
    # generalised Huber at p = 0.5 is twice the Huber form
    assert awm_log_prob(v, x0, eps, t, "ghuber", 0.5).item() == pytest.approx(2 * expected["huber"], rel=1e-7)
    # zero error gives l = 0 for every weighting
    for weighting in expected:
        assert abs(awm_log_prob(eps - x0, x0, eps, t, weighting).item()) < 1e-12
    with pytest.raises(ValueError, match="weighting must be one of"):
        awm_log_prob(v, x0, eps, t, "elbo")


def test_advantage_rescaling():
    a = torch.tensor([-9.0, -2.5, 0.0, 1.0, 7.0])
    torch.testing.assert_close(clip_scale_advantage(a, 5.0), torch.tensor([-1.0, -0.5, 0.0, 0.2, 1.0]))
    torch.testing.assert_close(clip_scale_advantage(a, 5.0, 2.0), torch.tensor([-2.0, -1.0, 0.0, 0.4, 2.0]))


def test_timestep_bins():
    g = torch.Generator().manual_seed(0)
    # K = 10, fraction 0.9, skip the pure-noise step: indices in [1, 9), 6 bins of linspace(1, 9, 7)
    index = stratified_step_indices(500, 10, 6, 0.9, True, g)
    assert index.shape == (500, 6) and index.min() >= 1 and index.max() <= 8
    bounds = torch.linspace(1, 9, 7).long()
    for j in range(6):
        column = index[:, j]
        lower, upper = bounds[j].item(), bounds[j + 1].item()
        assert column.min() >= lower and (column.max() < upper if upper > lower else column.max() == lower)
    # every index of [1, 9) is drawn somewhere, and step 0 never
    assert set(index.flatten().tolist()) == set(range(1, 9))
    assert stratified_step_indices(50, 10, 6, 0.9, False, g).min() == 0
    with pytest.raises(ValueError, match="leaves no step index"):
        stratified_step_indices(4, 2, 1, 0.5, True, g)


# --------------------------------------------------------------------------- the loss module
def test_registered_with_the_official_defaults():
    assert LOSSES["awm"] is AWMLoss and batch_kind(AWMLoss) == SAMPLES
    policy, _ = rollout_samples()
    loss = make_loss("awm", policy)
    assert (loss.clip_range, loss.ratio_type, loss.weighting, loss.ghuber_power) == (1.0, "exp_first", "ghuber", 0.25)
    assert (loss.beta, loss.ema_beta, loss.num_timesteps, loss.timestep_fraction) == (1e-3, 1.0, 6, 0.9)
    assert loss.frozen_velocities() == ("ema", "ref")


def _prepared(num_timesteps: int = 2, **kwargs):
    policy, samples = rollout_samples()
    loss = AWMLoss(policy, num_timesteps=num_timesteps, timestep_fraction=1.0, skip_first_step=False, **kwargs)
    samples = loss.prepare(samples, generator=torch.Generator().manual_seed(0))
    return policy, loss, samples


def test_prepare_stores_the_pre_update_log_prob():
    policy, loss, samples = _prepared(beta=0.0, ema_beta=0.0)
    assert samples["sigma"].shape == (8, 2) and samples["noise"].shape == (8, 2, 1, 4, 4)
    assert samples["log_prob_old"].shape == (8, 2) and samples["log_prob_old"].dtype == torch.float64
    x0, eps, t, x_t, cond = sample_rows(samples)
    with torch.no_grad():
        expected = awm_log_prob(policy.velocity(x_t, t, cond), x0, eps, t).reshape(8, 2)
    torch.testing.assert_close(samples["log_prob_old"], expected)


def test_on_policy_ratio_is_one_and_the_gradient_is_advantage_weighted_matching():
    policy, loss, samples = _prepared(beta=0.0, ema_beta=0.0)
    out = loss(samples)
    assert out["ratio_min"].item() == 1.0 and out["ratio_max"].item() == 1.0
    assert out["clip_frac_high"].item() == 0.0 and out["clip_frac_low"].item() == 0.0
    assert math.isnan(out["ref_velocity_mse"].item()) and "loss_ema" not in out.keys()
    # the loss is -mean(A' * ratio) and its gradient is -mean(A' * grad l), written out here
    x0, eps, t, x_t, cond = sample_rows(samples)
    advantage = (samples["advantage"].clamp(-5, 5) / 5).repeat_interleave(2).double()
    logp = awm_log_prob(policy.velocity(x_t, t, cond), x0, eps, t)
    assert out["loss_objective"].item() == pytest.approx(-advantage.mean().item(), abs=1e-7)
    params = list(policy.trainable_parameters())
    got = torch.autograd.grad(out["loss_objective"], params)
    want = torch.autograd.grad((-(advantage * logp).mean()).float(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)


def test_ppo_clip_cuts_the_gradient_outside_the_band():
    policy, loss, samples = _prepared(clip_range=0.01, beta=0.0, ema_beta=0.0)
    perturb(policy, scale=0.05)
    out = loss(samples)
    x0, eps, t, x_t, cond = sample_rows(samples)
    logp = awm_log_prob(policy.velocity(x_t, t, cond), x0, eps, t)
    ratio = torch.exp(logp - samples["log_prob_old"].reshape(-1))
    advantage = (samples["advantage"].clamp(-5, 5) / 5).repeat_interleave(2).double()
    reference = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(0.99, 1.01)).mean()
    assert out["loss_objective"].item() == pytest.approx(reference.item(), rel=1e-6)
    assert out["ratio_max"].item() > 1.01 or out["ratio_min"].item() < 0.99  # the band binds somewhere
    params = list(policy.trainable_parameters())
    for g, w in zip(torch.autograd.grad(out["loss_objective"], params), torch.autograd.grad(reference.float(), params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)


def test_sequence_ratio_equals_the_per_step_ratio_with_one_trained_timestep():
    policy, step_loss, samples = _prepared(num_timesteps=1, clip_range=0.01, beta=0.0, ema_beta=0.0)
    sequence_loss = AWMLoss(policy, num_timesteps=1, ratio_type="sum_first", clip_range=0.01, beta=0.0, ema_beta=0.0)
    perturb(policy, scale=0.05)
    a, b = step_loss(samples), sequence_loss(samples)
    assert a["loss_objective"].item() == b["loss_objective"].item()
    params = list(policy.trainable_parameters())
    for g, h in zip(torch.autograd.grad(a["loss_objective"], params), torch.autograd.grad(b["loss_objective"], params)):
        torch.testing.assert_close(g, h)
    # with two timesteps they differ: one ratio of the mean log-prob per sample
    _, step2, samples2 = _prepared(num_timesteps=2, clip_range=0.01, beta=0.0, ema_beta=0.0)
    seq2 = AWMLoss(step2.policy, num_timesteps=2, ratio_type="sum_first", clip_range=0.01, beta=0.0, ema_beta=0.0)
    perturb(step2.policy, scale=0.05)
    x0, eps, t, x_t, cond = sample_rows(samples2)
    logp = awm_log_prob(step2.policy.velocity(x_t, t, cond), x0, eps, t).reshape(8, 2)
    ratio = torch.exp(logp.mean(1) - samples2["log_prob_old"].mean(1))
    advantage = (samples2["advantage"].clamp(-5, 5) / 5).double()
    reference = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(0.99, 1.01)).mean()
    assert seq2(samples2)["loss_objective"].item() == pytest.approx(reference.item(), rel=1e-6)


def test_ema_and_reference_penalties():
    backend = AdapterToy(latent_shape=(1, 4, 4), seed=0)
    policy, samples = rollout_samples(backend)
    loss = AWMLoss(policy, num_timesteps=2, timestep_fraction=1.0, skip_first_step=False, beta=0.5, ema_beta=2.0,
                   ema_decay_rate=0.1, ema_decay_max=0.25)
    samples = loss.prepare(samples, generator=torch.Generator().manual_seed(0))
    params = list(policy.trainable_parameters())
    start = [p.detach().clone() for p in params]
    perturb(policy, scale=0.05)
    live = [p.detach().clone() for p in params]
    out = loss(samples)
    x0, eps, t, x_t, cond = sample_rows(samples)
    with torch.no_grad():
        v = policy.velocity(x_t, t, cond)
        with policy.reference():
            v_ref = policy.velocity(x_t, t, cond)
    # the EMA starts at the pre-update adapters, which here is the reference (adapter B = 0)
    ref_mse = ((v - v_ref) ** 2).mean().item()
    assert out["ref_velocity_mse"].item() == pytest.approx(ref_mse, rel=1e-5)
    assert out["ema_velocity_mse"].item() == pytest.approx(ref_mse, rel=1e-5)
    assert out["loss_kl"].item() == pytest.approx(0.5 * ref_mse, rel=1e-5)
    assert out["loss_ema"].item() == pytest.approx(2.0 * ref_mse, rel=1e-5)
    # the EMA moves after each rollout: d = min(0.1 * steps, 0.25)
    assert loss.after_update(2) == {"ema_decay": pytest.approx(0.2)}
    for ema, s, l in zip(loss.copy("ema").shadow, start, live):
        torch.testing.assert_close(ema, 0.2 * s + 0.8 * l)
    assert all(torch.equal(p, l) for p, l in zip(params, live))  # evaluating the EMA left the live weights


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_range": -0.1}, "clip_range must be"),
        ({"ratio_type": "gspo"}, "ratio_type must be one of"),
        ({"weighting": "elbo"}, "weighting must be one of"),
        ({"ghuber_power": 0.0}, "ghuber_power must be a finite number > 0"),
        ({"num_timesteps": 0}, "num_timesteps must be an integer >= 1"),
        ({"timestep_fraction": 0.0}, r"timestep_fraction must lie in \(0, 1\]"),
        ({"advantage_clip": 0.0}, "advantage_clip must be a finite number > 0"),
        ({"ema_beta": -1.0}, "ema_beta must be"),
        ({"ema_decay_max": 2.0}, r"ema_decay_max must lie in \[0, 1\]"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    policy, _ = rollout_samples()
    with pytest.raises(ValueError, match=message):
        AWMLoss(policy, **kwargs)


def test_forward_without_prepare_names_the_missing_step():
    policy, samples = rollout_samples()
    with pytest.raises(KeyError, match="loss.prepare"):
        AWMLoss(policy)(samples)


# --------------------------------------------------------------------------- the trainer and algos.run
def test_algos_run_two_iterations(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "algos.run", "algo=awm", *SMALL, "algo.loss.timestep_fraction=1.0",
         "algo.loss.num_timesteps=2", "trainer.iterations=2", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        for key in ("loss_objective", "loss_kl", "loss_ema", "ratio_mean", "ema_velocity_mse", "ema_decay", "drift_kl"):
            assert row.get(key) is not None, (key, row)
        assert row["num_updates"] == 1 and row["num_samples"] == 8 and row["num_pairs"] == 16
    assert [r["ema_decay"] for r in rows[1:]] == pytest.approx([0.001, 0.002])
    assert rows[2]["drift_kl"] > 0.0


def test_multi_step_rollout_clips_and_resumes_exactly(tmp_path):
    overrides = ("algo.loss.timestep_fraction=1.0", "algo.loss.num_timesteps=2", "trainer.num_minibatches=2",
                 "trainer.lr=0.05")
    full = Trainer(run_config("awm", "trainer.iterations=4", *overrides), tmp_path / "full", progress=False)
    assert full.policy.kernel_name == "ode" and full.env.stochastic_spec == "none"
    rows = full.train()
    # two optimiser steps per rollout: the second one sees a ratio away from 1
    assert all(r["num_updates"] == 2 for r in rows[1:]) and any(r["ratio_max"] > 1.0 or r["ratio_min"] < 1.0 for r in rows[1:])
    first = Trainer(run_config("awm", "trainer.iterations=2", *overrides), tmp_path / "split", progress=False)
    first.train()
    second = Trainer(run_config("awm", "trainer.iterations=4", *overrides), tmp_path / "split", progress=False)
    assert second.resume() and second.loss_module.num_updates == 4
    assert comparable(second.train()) == comparable(rows)
    for a, b in zip(full.loss_module.copy("ema").shadow, second.loss_module.copy("ema").shadow):
        assert torch.equal(a, b)
