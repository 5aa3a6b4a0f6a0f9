"""GRPO-Guard (RatioNorm + gradient re-weighting) and the per-step weighting option of every ratio loss."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from algos.losses import LOSSES, FlowPolicyLoss, GRPOGuardLoss, make_loss
from algos.losses.functional import (
    STEP_WEIGHTINGS,
    flow_dppo_objective,
    per_step_mean,
    ppo_clip_objective,
    rationorm_log_ratio,
    rationorm_scale,
    sqrt_neg_dt,
    step_std_factor,
    step_weights,
)
from algos.trainer import Trainer
from flowgym.backends.toy import ToyBackend
from flowgym.env import FlowDenoiseEnv
from flowgym.kernels import gaussian_log_prob
from flowgym.policy import FlowPolicy
from flowgym.rewards import Reward, register_reward

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
NUM_STEPS = 4
NOISE_LEVEL = 0.7
RATIO_LOSSES = ["ppo_clip", "grpo", "cps", "flow_dppo", "grpo_guard"]


@register_reward("test_grpo_guard_brightness")
class _Brightness(Reward):
    """Mean brightness of the decoded image."""

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


def _setup(kernel: str = "flow_sde", seed: int = 0, perturb: float = 0.05):
    """A policy, one rollout's stochastic (sample, step) pairs [N] (3 steps of 4 mixed), and the
    policy moved by ``perturb`` since the rollout (so ratios differ from 1)."""
    backend = ToyBackend(latent_shape=(1, 4, 4), seed=seed)
    env = FlowDenoiseEnv(backend, num_prompts=2, group_size=4, num_steps=NUM_STEPS,
                         rewards={"test_grpo_guard_brightness": 1.0}, seed=seed)
    policy = FlowPolicy(backend, kernel=kernel, noise_level=0.8 if kernel == "cps" else NOISE_LEVEL, seed=seed)
    with torch.no_grad():
        rollout = env.rollout(NUM_STEPS, policy)
    flat = rollout.reshape(-1)
    flat = flat[flat["stochastic"]]
    g = torch.Generator().manual_seed(seed + 1)
    # advantages of both signs and several sizes
    flat["advantage"] = torch.randn(flat.shape[0], generator=g)
    if perturb:
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return policy, flat


def _kernel_for(name: str) -> str:
    return LOSSES[name].required_kernel or "flow_sde"


def _flow_sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, a: float = NOISE_LEVEL) -> torch.Tensor:
    """The Flow-SDE step std ``a * sqrt(s / (1 - s_den)) * sqrt(s - s_next)`` in float64, from docs/maths.md#flow-sde
    (``s_den = s_next`` at ``s = 1``, the reference code's substitution)."""
    s, s_next = sigma.double(), sigma_next.double()
    s_den = torch.where(s >= 1.0, s_next, s)
    return a * torch.sqrt(s / (1.0 - s_den)) * torch.sqrt(s - s_next)


def _grads(value: torch.Tensor, policy: FlowPolicy) -> list[torch.Tensor]:
    params = list(policy.trainable_parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _steps(flat) -> list[torch.Tensor]:
    """Boolean masks of the rows of each denoising step."""
    return [flat["sigma"] == s for s in torch.unique(flat["sigma"])]


# --------------------------------------------------------------------------- RatioNorm: pure functions
def test_rationorm_hand_computed_against_the_gaussian_log_ratio():
    torch.manual_seed(0)
    n, dims = 6, (2, 3, 3)
    std = torch.tensor([0.7, 0.7, 0.3, 0.3, 0.05, 0.05]).reshape(n, 1, 1, 1)
    loc_old = torch.randn(n, *dims)
    eps = torch.randn(n, *dims)
    d = 1e-2 * torch.randn(n, *dims)
    action, loc_new = loc_old + std * eps, loc_old + d
    log_ratio = gaussian_log_prob(action, loc_new, std) - gaussian_log_prob(action, loc_old, std)
    # S = the step's std: log r = mean_dims(eps * d) exactly (to float32 rounding)
    expected = (eps.double() * d.double()).mean(dim=(1, 2, 3))
    got = rationorm_log_ratio(log_ratio, loc_new, loc_old, std.reshape(n))
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=2e-6)
    # any other S: S * (mean(eps d) / s - mean(d^2) / (2 s^2)) + mean(d^2) / (2 S), the formula by hand
    S = torch.full((n,), 0.2)
    s64, msq = std.reshape(n).double(), (d.double() ** 2).mean(dim=(1, 2, 3))
    by_hand = 0.2 * (expected / s64 - msq / (2 * s64**2) + msq / (2 * 0.2**2))
    torch.testing.assert_close(rationorm_log_ratio(log_ratio, loc_new, loc_old, S).double(), by_hand, rtol=1e-3, atol=1e-5)
    # unchanged means: exactly 0
    assert torch.equal(rationorm_log_ratio(torch.zeros(n), loc_old, loc_old.clone(), std.reshape(n)), torch.zeros(n))
    # the sum reduction uses the same reduction for the mean shift: log r = sum_dims(eps * d)
    log_ratio_sum = gaussian_log_prob(action, loc_new, std, "sum") - gaussian_log_prob(action, loc_old, std, "sum")
    got_sum = rationorm_log_ratio(log_ratio_sum, loc_new, loc_old, std.reshape(n), reduce="sum")
    torch.testing.assert_close(got_sum.double(), expected * 18, rtol=1e-3, atol=1e-4)


def test_std_factor_sqrt_dt_and_rationorm_scale_on_the_flow_sde_schedule():
    _, flat = _setup(perturb=0.0)
    sigma, sigma_next, scale = flat["sigma"], flat["sigma_next"], flat["scale"]
    root = sqrt_neg_dt(sigma, sigma_next)
    torch.testing.assert_close(root.double(), torch.sqrt(sigma.double() - sigma_next.double()))
    # the std factor is Flow-GRPO's std_dev_t = a * sqrt(s / (1 - s)) (s_next in the denominator at s = 1)
    s_den = torch.where(sigma >= 1, sigma_next, sigma).double()
    std_dev_t = NOISE_LEVEL * torch.sqrt(sigma.double() / (1 - s_den))
    torch.testing.assert_close(step_std_factor(scale, sigma, sigma_next).double(), std_dev_t, rtol=1e-6, atol=0)
    # S = mean(std factor) * mean(sqrt(-dt)) over a step's rows = the step's std, the rollout's scale
    S = rationorm_scale(scale, sigma, sigma_next)
    torch.testing.assert_close(S, scale.reshape(-1), rtol=2e-7, atol=0)
    torch.testing.assert_close(S.double(), _flow_sde_std(sigma, sigma_next), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sqrt_neg_dt(sigma_next, sigma)


def test_per_step_mean_is_the_mean_over_each_steps_rows():
    sigma = torch.tensor([1.0, 0.5, 1.0, 0.5, 0.5, 0.25])
    sigma_next = torch.tensor([0.5, 0.25, 0.5, 0.25, 0.25, 0.0])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 7.0])
    assert per_step_mean(values, sigma, sigma_next).tolist() == [2.0, 4.0, 2.0, 4.0, 4.0, 7.0]
    # a step's shared value comes back bit for bit (float64 accumulation)
    shared = torch.full((6,), 0.1234567)
    assert torch.equal(per_step_mean(shared, sigma, sigma_next), shared)
    # one step in the batch (the reference code's loss calls): the plain batch mean
    assert per_step_mean(values[[0, 2]], sigma[[0, 2]], sigma_next[[0, 2]]).tolist() == [2.0, 2.0]


# --------------------------------------------------------------------------- RatioNorm on real rollouts
def test_grpo_guard_log_ratio_is_mean_eps_times_mean_shift():
    policy, flat = _setup()
    loss = GRPOGuardLoss(policy)
    batch = loss.evaluate(flat)
    log_r = loss.normalised_log_ratio(batch)
    eps = (flat["action"].double() - flat["loc"].double()) / flat["scale"].double()
    d = batch.loc_new.detach().double() - flat["loc"].double()
    expected = (eps * d).mean(dim=(1, 2, 3))
    assert expected.abs().max() > 1e-4  # the policy moved
    torch.testing.assert_close(log_r.detach().double(), expected, rtol=1e-3, atol=1e-6)
    # the plain log-ratio is not this: it carries the 1 / s_t factor and the -mean(d^2) / (2 s_t^2) bias
    assert not torch.allclose(batch.log_ratio.double(), expected, rtol=1e-2, atol=1e-6)


def test_normalised_log_ratio_is_centred_with_a_step_independent_spread():
    """Monte Carlo over the rollout noise with one mean shift d at three step stds: the plain
    log-ratio's mean (-mean(d^2) / (2 s^2)) and spread (sqrt(mean(d^2) / D) / s) grow as s shrinks;
    RatioNorm's are 0 and sqrt(mean(d^2) / D) at every step."""
    torch.manual_seed(0)
    draws, dims = 4000, (1, 8, 8)
    D = 64
    loc_old = torch.randn(1, *dims).expand(draws, *dims)
    d = 2e-2 * torch.randn(1, *dims).expand(draws, *dims)
    spread = math.sqrt((d[0] ** 2).mean().item() / D)
    plain_means = []
    for s in (0.7, 0.3, 0.05):
        std = torch.full((draws, 1, 1, 1), s)
        action = loc_old + std * torch.randn(draws, *dims)
        log_ratio = gaussian_log_prob(action, loc_old + d, std) - gaussian_log_prob(action, loc_old, std)
        log_r = rationorm_log_ratio(log_ratio, loc_old + d, loc_old, std.reshape(-1))
        assert abs(log_r.mean().item()) < 4 * spread / math.sqrt(draws)
        assert log_r.std().item() == pytest.approx(spread, rel=0.06)
        plain_means.append(log_ratio.mean().item())
        assert log_ratio.std().item() == pytest.approx(spread / s, rel=0.06)
        assert log_ratio.mean().item() == pytest.approx(-(d[0] ** 2).mean().item() / (2 * s * s), rel=0.1, abs=4 * spread / s / math.sqrt(draws))
    assert plain_means[0] > plain_means[1] > plain_means[2]  # the plain ratio sinks below 1 at small steps


def test_fresh_rollout_normalised_ratio_is_exactly_one():
    policy, flat = _setup(perturb=0.0)
    out = GRPOGuardLoss(policy)(flat)
    for key in ("ratio", "norm_ratio"):
        assert out[f"{key}_min"].item() == 1.0 and out[f"{key}_max"].item() == 1.0 and out[f"{key}_mean"].item() == 1.0
    assert out["clip_frac_high"].item() == 0.0 and out["clip_frac_low"].item() == 0.0


def test_clip_fractions_and_gradient_by_hand():
    policy, flat = _setup()
    probe = GRPOGuardLoss(policy)
    with torch.no_grad():
        log_r = probe.normalised_log_ratio(probe.evaluate(flat))
    # a clip range strictly between two observed |r - 1| (no element on the edge), both sides clipped
    gaps = torch.sort((torch.exp(log_r) - 1).abs()).values
    eps = 0.5 * (gaps[len(gaps) // 2] + gaps[len(gaps) // 2 + 1]).item()
    loss = GRPOGuardLoss(policy, clip_range=eps)
    out = loss(flat)
    r = torch.exp(log_r)
    high, low = r > 1 + eps, r < 1 - eps
    assert high.any() and low.any()
    assert out["clip_frac_high"].item() == pytest.approx(high.float().mean().item())
    assert out["clip_frac_low"].item() == pytest.approx(low.float().mean().item())
    assert out["norm_ratio_max"].item() == pytest.approx(r.max().item(), rel=1e-6)
    # the gradient: w * (-A * grad r) on the unclipped branch, w = 1 / (sigma - sigma_next), r from the closed form
    A = flat["advantage"]
    active = ((A > 0) & high) | ((A < 0) & low)
    w = 1.0 / (flat["sigma"] - flat["sigma_next"])
    _, loc_new, _ = policy.distribution(flat)
    eps_noise = (flat["action"] - flat["loc"]) / flat["scale"]
    r_closed = torch.exp((eps_noise * (loc_new - flat["loc"])).mean(dim=(1, 2, 3)))
    by_hand = torch.where(active, torch.zeros_like(r_closed), -w * A * r_closed).mean()
    for g, e in zip(_grads(out["loss_objective"], policy), _grads(by_hand, policy)):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)


def test_grpo_guard_defaults_and_errors():
    policy, flat = _setup(perturb=0.0)
    loss = GRPOGuardLoss(policy)
    assert loss.clip_range == 2e-6 and loss.beta == 0.0 and loss.step_weighting == "guard"
    assert GRPOGuardLoss.default_advantage == "group_std" and GRPOGuardLoss.required_kernel is None
    assert {"norm_ratio_mean", "norm_ratio_min", "norm_ratio_max"} <= set(loss.out_keys)
    assert make_loss("grpo_guard", policy, clip_range=4e-6).clip_range == 4e-6  # the PickScore setting
    assert GRPOGuardLoss(policy, step_weighting="none").step_weighting == "none"
    with pytest.raises(ValueError, match="exact Gaussian log-probability"):
        GRPOGuardLoss(FlowPolicy(policy.backend, kernel="cps", log_prob_convention="cps_legacy"))
    with pytest.raises(ValueError, match="clip_range"):
        GRPOGuardLoss(policy, clip_range=-1.0)
    # the overflow of a stale sample stays finite (clipped, no 0 * inf)
    moved, stale = _setup()
    stale["sample_log_prob"] = stale["sample_log_prob"] - 1e4 * (torch.arange(stale.shape[0]) % 3 == 0)
    stale["advantage"] = torch.ones(stale.shape[0])
    out = GRPOGuardLoss(moved)(stale)
    assert math.isinf(out["norm_ratio_max"].item()) and torch.isfinite(out["loss_objective"])
    assert all(torch.isfinite(g).all() for g in _grads(out["loss_objective"], moved))


# --------------------------------------------------------------------------- the step_weighting option
@pytest.mark.parametrize("name", RATIO_LOSSES)
def test_step_weighting_none_is_the_unweighted_loss_bit_for_bit(name):
    policy, flat = _setup(_kernel_for(name))
    kwargs = {"clip_range": 1e-3} if name != "flow_dppo" else {}
    loss = make_loss(name, policy, step_weighting="none", **kwargs)
    out = loss(flat)
    batch = loss.evaluate(flat)
    assert batch.step_weight is None
    # today's objective, from the functional maths alone
    if name == "flow_dppo":
        expected = flow_dppo_objective(batch.ratio, batch.advantage, batch.kl_old_new, loss.delta).loss
    else:
        log_ratio = loss.normalised_log_ratio(batch) if name == "grpo_guard" else batch.log_ratio
        expected = ppo_clip_objective(torch.exp(log_ratio), batch.advantage, loss.clip_range).per_element_loss.mean()
    assert torch.equal(out["loss_objective"], expected)
    if name != "grpo_guard":  # the default is "none" for every method but GRPO-Guard
        default = make_loss(name, policy, **kwargs)(flat)
        assert torch.equal(default["loss_objective"], out["loss_objective"])
        assert all(torch.equal(a, b) for a, b in zip(_grads(default["loss_objective"], policy), _grads(out["loss_objective"], policy)))


@pytest.mark.parametrize("weighting", ["tempflow", "guard"])
@pytest.mark.parametrize("name", RATIO_LOSSES)
def test_step_weighting_scales_each_steps_policy_term(name, weighting):
    """Per step k of weight w_k: L_w(step k) = w_k * L_none(step k), gradients alike, and on a batch
    mixing steps L_w = sum_k (n_k / N) w_k L_none(step k); the KL term is never weighted."""
    policy, flat = _setup(_kernel_for(name))
    kwargs = {"clip_range": 1e-3} if name != "flow_dppo" else {}
    plain = make_loss(name, policy, step_weighting="none", beta=0.1, **kwargs)
    weighted = make_loss(name, policy, step_weighting=weighting, beta=0.1, **kwargs)
    # the weights in closed form (float64): TempFlow 2.25 * s_t, GRPO-Guard 1 / (sigma - sigma_next)
    if weighting == "tempflow":
        if name == "cps":  # the CPS std sigma_next * sin(eta pi / 2), eta = 0.8
            std = flat["sigma_next"].double() * math.sin(0.8 * math.pi / 2)
        else:
            std = _flow_sde_std(flat["sigma"], flat["sigma_next"])
        closed = 2.25 * std
    else:
        closed = 1.0 / (flat["sigma"].double() - flat["sigma_next"].double())
    w = weighted.evaluate(flat).step_weight
    torch.testing.assert_close(w.double(), closed, rtol=1e-5, atol=0)
    mixed = torch.zeros(())
    for rows in _steps(flat):
        sub = flat[rows]
        w_k = closed[rows][0].item()
        out_w, out_plain = weighted(sub), plain(sub)
        assert out_w["loss_objective"].item() == pytest.approx(w_k * out_plain["loss_objective"].item(), rel=1e-5, abs=1e-9)
        for g, e in zip(_grads(out_w["loss_objective"], policy), _grads(out_plain["loss_objective"], policy)):
            torch.testing.assert_close(g, w_k * e, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(out_w["loss_kl"], out_plain["loss_kl"], rtol=0, atol=0)
        mixed = mixed + rows.float().mean() * w_k * out_plain["loss_objective"].detach()
    assert weighted(flat)["loss_objective"].item() == pytest.approx(mixed.item(), rel=1e-5, abs=1e-9)


def test_tempflow_weight_is_two_and_a_quarter_times_the_step_std():
    sigma = torch.tensor([1.0, 0.8577, 0.6022])
    sigma_next = torch.tensor([0.8577, 0.6022, 0.0089])
    scale = torch.tensor([0.7, 0.8687, 0.6633]).reshape(3, 1, 1, 1)
    assert torch.equal(step_weights("tempflow", scale, sigma, sigma_next), 2.25 * scale.reshape(3))
    torch.testing.assert_close(step_weights("guard", scale, sigma, sigma_next), 1 / (sigma - sigma_next), rtol=1e-6, atol=0)
    assert step_weights("none", scale, sigma, sigma_next) is None


@pytest.mark.parametrize("name", RATIO_LOSSES)
def test_bad_step_weighting_is_a_clear_error(name):
    policy, _ = _setup(_kernel_for(name), perturb=0.0)
    with pytest.raises(ValueError, match=r"step_weighting must be one of \['none', 'tempflow', 'guard'\]; got 'tempo'"):
        make_loss(name, policy, step_weighting="tempo")
    assert list(STEP_WEIGHTINGS) == ["none", "tempflow", "guard"]


def test_a_loss_that_ignores_weights_rejects_them():
    class Unweighted(FlowPolicyLoss):
        def objective(self, batch):
            return {"loss_objective": -(batch.ratio * batch.advantage).mean()}

    policy, flat = _setup(perturb=0.0)
    Unweighted(policy, step_weighting="none")(flat)
    with pytest.raises(ValueError, match="does not apply per-step weights.*must be 'none'"):
        Unweighted(policy, step_weighting="tempflow")


# --------------------------------------------------------------------------- configs and short runs
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


def _config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMALL, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", RATIO_LOSSES)
def test_every_ratio_method_config_lists_step_weighting(name):
    loss = _config(f"algo={name}")["algo"]["loss"]
    assert loss["step_weighting"] == ("guard" if name == "grpo_guard" else "none")
    if name == "grpo_guard":
        assert loss["clip_range"] == 2e-6 and loss["beta"] == 0.0
    assert _config(f"algo={name}", "algo.loss.step_weighting=tempflow")["algo"]["loss"]["step_weighting"] == "tempflow"


def test_bad_step_weighting_in_the_config_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"algo.loss.step_weighting must be one of \['none', 'tempflow', 'guard'\]"):
        Trainer(_config("algo=grpo", "algo.loss.step_weighting=noise"), tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_grpo_guard_trains_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "algos.run", "algo=grpo_guard", *SMALL, "trainer.iterations=2", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        for key in ("loss_objective", "ratio_mean", "norm_ratio_mean", "clip_frac_high", "clip_frac_low", "approx_kl", "drift_kl"):
            assert row.get(key) is not None and math.isfinite(row[key]), (key, row)
        assert row["mask_frac_pos"] is None  # a clipping loss: the mask diagnostics are NaN (null)
    assert rows[2]["drift_kl"] > 0.0  # the policy moved
    assert "eval/train/reward" in rows[2]


def test_tempflow_weighting_trains_another_method(tmp_path):
    trainer = Trainer(_config("algo=flow_dppo", "algo.loss.step_weighting=tempflow", "trainer.iterations=2"), tmp_path, progress=False)
    assert trainer.loss_module.step_weighting == "tempflow"
    rows = trainer.train()
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss_objective"]) for r in rows[1:]) and rows[2]["drift_kl"] > 0.0
