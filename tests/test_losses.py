"""The loss modules on real rollouts of FlowDenoiseEnv over the ToyBackend."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from algos.losses import (
    DIAGNOSTIC_KEYS,
    LOSSES,
    CPSLoss,
    FlowDPPOLoss,
    FlowPolicyLoss,
    GRPOLoss,
    PPOClipLoss,
    make_loss,
    register_loss,
)
from algos.losses.sample_base import TRANSITIONS, batch_kind
from algos.losses.functional import flow_dppo_mask
from flowgym.backends.toy import ToyBackend
from flowgym.env import FlowDenoiseEnv
from flowgym.policy import FlowPolicy
from flowgym.rewards import Reward, register_reward

NUM_STEPS = 4
#: the losses on per-step log-probs (batch_kind "transitions"); those on clean samples (DiffusionNFT,
#: AWM: batch_kind "samples") have their own input contract and tests (tests/test_loss_*.py)
PER_STEP_LOSSES = sorted(name for name in LOSSES if batch_kind(LOSSES[name]) == TRANSITIONS)
STANDARD_KEYS = {"loss_objective", "loss_kl", *DIAGNOSTIC_KEYS}


@register_reward("test_losses_brightness")
class _Brightness(Reward):
    """Mean brightness of the decoded image."""

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


def _setup(kernel: str = "flow_sde", guidance_scale: float = 1.0, seed: int = 0, num_prompts: int = 2, group_size: int = 4):
    """A fresh policy and one rollout; returns (policy, env, rollout [B, K], flat stochastic td [N])."""
    backend = ToyBackend(latent_shape=(1, 4, 4), seed=seed)
    env = FlowDenoiseEnv(
        backend,
        num_prompts=num_prompts,
        group_size=group_size,
        num_steps=NUM_STEPS,
        rewards={"test_losses_brightness": 1.0},
        seed=seed,
    )
    policy = FlowPolicy(backend, kernel=kernel, noise_level=0.8 if kernel == "cps" else 0.7, guidance_scale=guidance_scale, seed=seed)
    with torch.no_grad():
        rollout = env.rollout(NUM_STEPS, policy)
    reward = rollout["next", "reward"][:, -1, 0]
    advantage = (reward - reward.mean()) / (reward.std() + 1e-4)
    rollout["advantage"] = advantage[:, None].expand(-1, NUM_STEPS).clone()
    rollout["reward"] = reward[:, None].expand(-1, NUM_STEPS).clone()
    flat = rollout.reshape(-1)
    flat = flat[flat["stochastic"]]
    return policy, env, rollout, flat


def _perturb(policy: FlowPolicy, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _kernel_for(name: str) -> str:
    return LOSSES[name].required_kernel or "flow_sde"


def _new_logp(policy: FlowPolicy, td: TensorDict) -> torch.Tensor:
    _, loc, scale = policy.distribution(td)
    return policy.log_prob(td["action"], loc, scale, td["stochastic"])


# --------------------------------------------------------------------------- ratio == 1 on a fresh rollout
@pytest.mark.parametrize("name", PER_STEP_LOSSES)
def test_fresh_rollout_ratio_is_exactly_one(name):
    policy, _, rollout, flat = _setup(_kernel_for(name))
    loss = make_loss(name, policy)
    # the recomputation path is bitwise the sampling path: per step (the very batches sampled) ...
    for k in range(NUM_STEPS - 1):
        step_td = rollout[:, k]
        with torch.no_grad():
            assert torch.equal(_new_logp(policy, step_td), step_td["sample_log_prob"])
    # ... and on the whole flattened rollout (CPU BLAS gives the same rows here, see the report)
    with torch.no_grad():
        assert torch.equal(_new_logp(policy, flat), flat["sample_log_prob"])
    out = loss(flat)
    assert STANDARD_KEYS <= set(out.keys()) == set(loss.out_keys)
    assert out["ratio_min"].item() == 1.0 and out["ratio_max"].item() == 1.0 and out["ratio_mean"].item() == 1.0
    assert out["approx_kl"].item() == 0.0 and out["kl_old_new_max"].item() == 0.0
    assert out["frac_over_threshold"].item() == 0.0
    for key in ("clip_frac_high", "clip_frac_low", "mask_frac_pos", "mask_frac_neg"):
        value = out[key].item()
        assert value == 0.0 or (math.isnan(value) and key.startswith("clip" if name == "flow_dppo" else "mask"))
    # at ratio 1 every objective is the plain policy-gradient surrogate -mean(w * A), w = 1 unless the
    # loss weights its steps by default (GRPO-Guard: w = 1 / (sigma - sigma_next))
    weight = loss.evaluate(flat).step_weight
    weight = torch.ones(flat.shape[0]) if weight is None else weight
    assert out["loss_objective"].item() == pytest.approx(-(weight * flat["advantage"]).mean().item(), abs=1e-6)


@pytest.mark.parametrize("kernel", ["flow_sde", "cps"])
def test_fresh_rollout_ratio_is_exactly_one_with_cfg(kernel):
    policy, _, _, flat = _setup(kernel, guidance_scale=4.5)
    out = FlowDPPOLoss(policy)(flat)
    assert out["ratio_min"].item() == 1.0 and out["ratio_max"].item() == 1.0


# --------------------------------------------------------------------------- every loss trains the same way
@pytest.mark.parametrize("name", PER_STEP_LOSSES)
def test_every_loss_updates_the_policy(name):
    torch.manual_seed(0)
    policy, _, _, flat = _setup(_kernel_for(name))
    loss = make_loss(name, policy)
    params = list(loss.trainable_parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for minibatch in (flat[0::2], flat[1::2], flat[0::2]):
        out = loss(minibatch)
        assert STANDARD_KEYS <= set(out.keys()) == set(loss.out_keys)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, params))
    assert out["ratio_max"].item() != 1.0 or out["ratio_min"].item() != 1.0  # the policy moved
    assert all(out[k].dim() == 0 and not out[k].requires_grad for k in DIAGNOSTIC_KEYS)


# --------------------------------------------------------------------------- Flow-DPPO gradient on the real policy
def test_flow_dppo_gradient_is_masked_importance_weighted_policy_gradient():
    policy, _, _, flat = _setup()
    _perturb(policy)
    with torch.no_grad():
        logp = _new_logp(policy, flat)
        ratio = torch.exp(logp - flat["sample_log_prob"])
    # advantages chosen so that both masked and kept elements occur in each direction
    advantage = torch.where(torch.arange(flat.shape[0]) % 2 == 0, 1.0, -1.0) * (1 + torch.rand(flat.shape[0]))
    flat["advantage"] = advantage
    loss = FlowDPPOLoss(policy, delta=1e-5)
    out = loss(flat)
    kl = loss.evaluate(flat).kl_old_new
    keep, masked_pos, masked_neg = flow_dppo_mask(ratio, advantage, kl, 1e-5)
    assert masked_pos.any() and masked_neg.any() and keep.any()
    params = list(policy.trainable_parameters())
    grads = torch.autograd.grad(out["loss_objective"], params)
    weights = torch.where(keep, -advantage * ratio / flat.shape[0], torch.zeros_like(ratio))
    expected = torch.autograd.grad((weights * _new_logp(policy, flat)).sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    # masked elements alone give exactly zero gradient
    masked_only = loss(flat[~keep])
    grads = torch.autograd.grad(masked_only["loss_objective"], params, allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in grads)
    assert masked_only["mask_frac_pos"].item() == 1.0 and masked_only["mask_frac_neg"].item() == 1.0
    assert out["mask_frac_pos"].item() == pytest.approx(masked_pos.sum().item() / (advantage > 0).sum().item())


def test_flow_dppo_infinite_threshold_and_normalize_kept():
    policy, _, _, flat = _setup()
    _perturb(policy)
    with torch.no_grad():
        ratio = torch.exp(_new_logp(policy, flat) - flat["sample_log_prob"])
    plain = FlowDPPOLoss(policy, delta=math.inf)(flat)
    assert plain["loss_objective"].item() == pytest.approx((-flat["advantage"] * ratio).mean().item(), rel=1e-5)
    assert plain["mask_frac_pos"].item() == 0.0 and plain["frac_over_threshold"].item() == 0.0
    kept = FlowDPPOLoss(policy, normalize="kept")(flat)
    all_ = FlowDPPOLoss(policy, normalize="all")(flat)
    n = flat.shape[0]
    masked = kept["mask_frac_pos"] * (flat["advantage"] > 0).sum() + kept["mask_frac_neg"] * (flat["advantage"] < 0).sum()
    assert kept["loss_objective"].item() == pytest.approx(all_["loss_objective"].item() * n / (n - masked.item()), rel=1e-5)


def test_flow_dppo_velocity_divergence():
    policy, _, _, flat = _setup()
    _perturb(policy, scale=0.001)
    loss = FlowDPPOLoss(policy, divergence="velocity", delta=1e-6)
    out = loss(flat)
    with torch.no_grad():
        v_new, _, _ = policy.distribution(flat)
        d = ((v_new - flat["velocity"]) ** 2).mean(dim=(1, 2, 3))
    assert out["frac_over_threshold"].item() == pytest.approx((d >= 1e-6).float().mean().item())
    with pytest.raises(KeyError, match="velocity"):
        loss(flat.exclude("velocity"))


# --------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("name", PER_STEP_LOSSES)
def test_ratio_overflow_gives_finite_loss_and_gradients(name):
    policy, _, _, flat = _setup(_kernel_for(name))
    _perturb(policy, scale=0.05)
    # a stale old log-prob 1e4 nats below the new one: ratio = exp(1e4) = inf on those rows
    flat["sample_log_prob"] = flat["sample_log_prob"] - 1e4 * (torch.arange(flat.shape[0]) % 3 == 0)
    flat["advantage"] = torch.ones(flat.shape[0])  # pushing ratios up: overflowing rows are masked / clipped
    loss = make_loss(name, policy)
    out = loss(flat)
    assert math.isinf(out["ratio_max"].item())
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in policy.trainable_parameters())


# --------------------------------------------------------------------------- diagnostics and the KL term
def test_kl_diagnostics_match_torch_distributions():
    policy, _, _, flat = _setup()
    _perturb(policy)
    loss = GRPOLoss(policy, beta=0.04)
    out = loss(flat)
    with torch.no_grad():
        _, loc_new, _ = policy.distribution(flat)
        with policy.reference():
            _, loc_ref, _ = policy.distribution(flat)
    std = flat["scale"].double().expand_as(loc_new)
    normal = torch.distributions.Normal

    def exact(p, q):
        return torch.distributions.kl_divergence(normal(p.double(), std), normal(q.double(), std)).mean(dim=(1, 2, 3))

    kl_old_new = exact(flat["loc"], loc_new)
    kl_ref = exact(loc_new, loc_ref)
    assert out["kl_old_new_mean"].item() == pytest.approx(kl_old_new.mean().item(), rel=1e-4)
    assert out["kl_old_new_max"].item() == pytest.approx(kl_old_new.max().item(), rel=1e-4)
    assert out["kl_ref"].item() == pytest.approx(kl_ref.mean().item(), rel=1e-4)
    assert out["loss_kl"].item() == pytest.approx(0.04 * kl_ref.mean().item(), rel=1e-4)
    # Flow-GRPO's convention: exact KL times |dt|
    dt = (flat["sigma"] - flat["sigma_next"]).double()
    flow_grpo = GRPOLoss(policy, beta=0.04, kl_convention="flow_grpo")(flat)
    assert flow_grpo["loss_kl"].item() == pytest.approx(0.04 * (kl_ref * dt).mean().item(), rel=1e-4)
    assert flow_grpo["kl_ref"].item() == pytest.approx(out["kl_ref"].item(), rel=1e-6)
    # the KL term pulls toward the reference: its gradient is non-zero
    grads = torch.autograd.grad(out["loss_kl"], list(policy.trainable_parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # no beta: kl_ref is NaN unless asked for, loss_kl is 0
    plain = GRPOLoss(policy)(flat)
    assert math.isnan(plain["kl_ref"].item()) and plain["loss_kl"].item() == 0.0
    logged = GRPOLoss(policy, log_kl_ref=True)(flat)
    assert logged["kl_ref"].item() == pytest.approx(out["kl_ref"].item()) and logged["loss_kl"].item() == 0.0


def test_clip_fractions_and_approx_kl():
    policy, _, _, flat = _setup()
    _perturb(policy)
    with torch.no_grad():
        log_ratio = _new_logp(policy, flat) - flat["sample_log_prob"]
    ratio = torch.exp(log_ratio)
    out = PPOClipLoss(policy, clip_range=0.01, delta=1e-3)(flat)
    assert out["clip_frac_high"].item() == pytest.approx((ratio > 1.01).float().mean().item())
    assert out["clip_frac_low"].item() == pytest.approx((ratio < 0.99).float().mean().item())
    assert out["approx_kl"].item() == pytest.approx(0.5 * (log_ratio**2).mean().item(), rel=1e-5)
    assert out["ratio_min"].item() == pytest.approx(ratio.min().item(), rel=1e-6)
    loss = PPOClipLoss(policy, delta=1e-3)
    kl = loss.evaluate(flat).kl_old_new
    assert loss(flat)["frac_over_threshold"].item() == pytest.approx((kl >= 1e-3).float().mean().item())


# --------------------------------------------------------------------------- configuration and contract
def test_defaults_and_kernels():
    assert PPOClipLoss.default_advantage == "per_prompt"
    assert GRPOLoss.default_advantage == "group" and FlowDPPOLoss.default_advantage == "group"
    assert CPSLoss.required_kernel == "cps" and FlowDPPOLoss.required_kernel is None
    policy, _, _, _ = _setup()
    assert PPOClipLoss(policy).clip_range == 1e-4 and GRPOLoss(policy).clip_range == 1e-4
    assert FlowDPPOLoss(policy).delta == 1e-5
    with pytest.raises(ValueError, match="cps"):
        CPSLoss(policy)
    assert CPSLoss(policy, allow_kernel_mismatch=True).clip_range == 1e-5
    cps_policy, _, _, flat = _setup("cps")
    assert CPSLoss(cps_policy).clip_range == 1e-5
    FlowDPPOLoss(cps_policy)(flat)  # Flow-DPPO + CPS


def test_hyperparameter_validation():
    policy, _, _, _ = _setup()
    with pytest.raises(ValueError, match="clip_range"):
        GRPOLoss(policy, clip_range=-1e-4)
    with pytest.raises(ValueError, match="delta"):
        FlowDPPOLoss(policy, delta=-1e-5)
    with pytest.raises(ValueError, match="beta"):
        FlowDPPOLoss(policy, beta=-0.1)
    with pytest.raises(ValueError, match="kl_convention"):
        GRPOLoss(policy, kl_convention="approx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divergence"):
        FlowDPPOLoss(policy, divergence="tv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalize"):
        FlowDPPOLoss(policy, normalize="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown loss 'dppo'.*accepted") as error:
        make_loss("dppo", policy)
    for name in ("cps", "flow_dppo", "grpo", "ppo_clip"):  # other registered methods may be listed too
        assert f"'{name}'" in str(error.value)


def test_input_contract_errors_and_set_keys():
    policy, _, rollout, flat = _setup()
    loss = FlowDPPOLoss(policy)
    with pytest.raises(ValueError, match="deterministic"):
        loss(rollout.reshape(-1))  # the last step is an ODE step
    with pytest.raises(KeyError, match="advantage"):
        loss(flat.exclude("advantage"))
    # renamed keys through TorchRL's set_keys
    renamed = flat.clone().rename_key_("advantage", "adv").rename_key_("sample_log_prob", "old_logp")
    loss.set_keys(advantage="adv", sample_log_prob="old_logp")
    assert "adv" in loss.in_keys
    torch.testing.assert_close(loss(renamed)["loss_objective"], FlowDPPOLoss(policy)(flat)["loss_objective"])
    # the prompt instead of the conditioning; a [B, K] batch is flattened
    out = FlowDPPOLoss(policy)(flat.exclude("conditioning"))
    assert out["ratio_max"].item() == 1.0
    stochastic = rollout[:, : NUM_STEPS - 1]
    assert FlowDPPOLoss(policy)(stochastic)["ratio_max"].item() == 1.0


def test_ppo_value_baseline():
    policy, _, _, flat = _setup()
    loss = PPOClipLoss(policy, value_baseline=True)
    assert loss.requires_reward and "reward" in loss.in_keys and "loss_value" in loss.loss_keys
    value_params = list(loss.value.parameters())
    assert {id(p) for p in value_params} <= {id(p) for p in loss.trainable_parameters()}
    before = [p.detach().clone() for p in value_params]
    optimizer = torch.optim.Adam(list(loss.trainable_parameters()), lr=1e-2)
    first = None
    for _ in range(20):
        out = loss(flat)
        assert set(out.keys()) == STANDARD_KEYS | {"loss_value"}
        first = first if first is not None else out["loss_value"].item()
        optimizer.zero_grad()
        sum(v for k, v in out.items() if k.startswith("loss_")).backward()
        optimizer.step()
    assert out["loss_value"].item() < first  # the baseline learns the rewards
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, value_params))
    with pytest.raises(KeyError, match="reward"):
        loss(flat.exclude("reward"))


def test_a_new_loss_is_one_class_and_a_decorator():
    from algos.losses.functional import importance_ratio

    @register_loss("test_drpo")
    class DRPOLoss(FlowPolicyLoss):
        """DRPO's smooth penalty: L = -mean(ratio * A - |A| (ratio - 1)^2 / (2 delta))."""

        def objective(self, batch):
            ratio = importance_ratio(batch.log_ratio)
            a = batch.advantage
            return {"loss_objective": -(ratio * a - a.abs() * (ratio - 1) ** 2 / (2 * self.delta)).mean()}

    try:
        policy, _, _, flat = _setup()
        loss = make_loss("test_drpo", policy, delta=0.15)
        out = loss(flat)
        assert set(out.keys()) == STANDARD_KEYS
        assert out["loss_objective"].item() == pytest.approx(-flat["advantage"].mean().item(), abs=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            register_loss("grpo")(DRPOLoss)
    finally:
        LOSSES.pop("test_drpo", None)


def test_refresh_old_policy_makes_any_minibatch_exact():
    policy, _, _, flat = _setup(num_prompts=3, group_size=5)
    loss = FlowDPPOLoss(policy)
    for size in (1, 3, 7, flat.shape[0]):
        index = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(size))[:size]
        minibatch = flat[index].clone()
        loss.refresh_old_policy(minibatch)
        out = loss(minibatch)
        assert out["ratio_min"].item() == 1.0 and out["ratio_max"].item() == 1.0
        # the refreshed values are the rollout's up to rounding
        torch.testing.assert_close(minibatch["loc"], flat["loc"][index], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(minibatch["sample_log_prob"], flat["sample_log_prob"][index], rtol=1e-5, atol=1e-5)
