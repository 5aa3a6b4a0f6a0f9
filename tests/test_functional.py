"""Pure maths of the objectives: PPO-clip, Flow-DPPO's mask, divergences, ratio overflow."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from algos.losses.functional import (
    approx_kl,
    flow_dppo_mask,
    flow_dppo_objective,
    importance_ratio,
    ppo_clip_active,
    ppo_clip_objective,
    ratio_from_log_probs,
    step_divergence,
    velocity_divergence,
)

floats = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, width=32)


def _vectors(n_min: int = 1, n_max: int = 24):
    return st.integers(n_min, n_max).flatmap(
        lambda n: st.tuples(st.lists(floats, min_size=n, max_size=n), st.lists(floats, min_size=n, max_size=n))
    )


# --------------------------------------------------------------------------- PPO-clip
@given(data=_vectors(), clip_range=st.sampled_from([0.0, 1e-5, 1e-4, 0.2, 0.5]), log_scale=st.sampled_from([1e-5, 1e-3, 0.3]))
def test_ppo_clip_matches_hand_written(data, clip_range, log_scale):
    log_ratio_values, advantage_values = data
    advantage = torch.tensor(advantage_values)
    leaf = torch.tensor(log_ratio_values) * log_scale

    # hand-written PPO-clip: max(-A r, -A clamp(r, 1 - eps, 1 + eps)), autograd through torch.maximum
    lr_hand = leaf.clone().requires_grad_(True)
    r = torch.exp(lr_hand)
    hand = torch.maximum(-advantage * r, -advantage * torch.clamp(r, 1 - clip_range, 1 + clip_range))
    hand.mean().backward()

    lr = leaf.clone().requires_grad_(True)
    ratio = torch.exp(lr)
    terms = ppo_clip_objective(ratio, advantage, clip_range)
    terms.per_element_loss.mean().backward()

    torch.testing.assert_close(terms.per_element_loss, hand.detach(), rtol=0, atol=0)
    torch.testing.assert_close(lr.grad, lr_hand.grad, rtol=1e-6, atol=1e-9)
    r = r.detach()
    assert torch.equal(terms.clipped_high, r > 1 + clip_range)
    assert torch.equal(terms.clipped_low, r < 1 - clip_range)
    # the gradient is zero exactly where the clipped branch is strictly larger
    active = ppo_clip_active(ratio, advantage, clip_range)
    assert torch.all(lr.grad[active] == 0)
    kept = ~active & (advantage != 0)
    # atol: below float32's smallest normal (1.2e-38), where subnormal results round differently by path
    torch.testing.assert_close(lr.grad[kept], (-advantage * r)[kept] / len(advantage), rtol=1e-6, atol=1e-38)


def test_ppo_clip_at_ratio_one_is_plain_policy_gradient():
    advantage = torch.tensor([1.5, -2.0, 0.0, 0.3])
    lr = torch.zeros(4, requires_grad=True)
    loss = ppo_clip_objective(torch.exp(lr), advantage, 1e-4).per_element_loss.sum()
    loss.backward()
    assert torch.equal(lr.grad, -advantage)
    assert loss.item() == pytest.approx(-float(advantage.sum()))


def test_ppo_clip_overflow_is_finite_with_importance_ratio():
    advantage = torch.tensor([1.0, -1.0, 1.0])
    lr = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)  # inf, 0, 1
    active = ppo_clip_active(torch.exp(lr.detach()), advantage, 1e-4)
    ratio = importance_ratio(lr, ~active & (advantage != 0))
    assert math.isinf(ratio[0].item())
    loss = ppo_clip_objective(ratio, advantage, 1e-4).per_element_loss.mean()
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(lr.grad).all()
    assert lr.grad[0] == 0 and lr.grad[1] == 0 and lr.grad[2] == pytest.approx(-1 / 3)


# --------------------------------------------------------------------------- Flow-DPPO
DELTA = 1e-5


def _truth_table():
    """Every combination of sign(A) x ratio above/below 1 x divergence below/above delta."""
    rows = []
    for a, log_r, d in itertools.product([2.0, -2.0, 0.0], [0.3, -0.3], [DELTA / 10, DELTA, 10 * DELTA]):
        far = d >= DELTA
        masked = far and ((a > 0 and log_r > 0) or (a < 0 and log_r < 0))
        rows.append((a, log_r, d, masked))
    return rows


@pytest.mark.parametrize("normalize", ["all", "kept"])
def test_flow_dppo_truth_table_and_gradient(normalize):
    rows = _truth_table()
    advantage = torch.tensor([r[0] for r in rows])
    lr = torch.tensor([r[1] for r in rows], requires_grad=True)
    divergence = torch.tensor([r[2] for r in rows])
    expected_masked = torch.tensor([r[3] for r in rows])
    ratio = torch.exp(lr)

    keep, masked_pos, masked_neg = flow_dppo_mask(ratio, advantage, divergence, DELTA)
    assert torch.equal(~keep, expected_masked)
    assert torch.equal(masked_pos, expected_masked & (advantage > 0))
    assert torch.equal(masked_neg, expected_masked & (advantage < 0))

    terms = flow_dppo_objective(importance_ratio(lr, keep), advantage, divergence, DELTA, normalize)
    assert torch.equal(terms.keep, keep)
    terms.loss.backward()
    z = len(rows) if normalize == "all" else int(keep.sum())
    r = ratio.detach()
    expected_loss = sum(-a * float(ri) for (a, _, _, m), ri in zip(rows, r) if not m) / z
    assert terms.loss.item() == pytest.approx(expected_loss, rel=1e-6)
    # masked: gradient exactly zero; kept: the importance-weighted policy gradient -A * ratio / Z
    assert torch.all(lr.grad[expected_masked] == 0)
    torch.testing.assert_close(lr.grad[~expected_masked], (-advantage * r / z)[~expected_masked], rtol=1e-6, atol=0)
    assert torch.all(terms.per_element_loss[expected_masked] == 0)


def test_flow_dppo_mask_is_asymmetric_and_corrective_moves_pass():
    # far from the old policy but moving against the advantage's push: always kept
    advantage = torch.tensor([1.0, -1.0])
    ratio = torch.tensor([0.5, 1.5])
    keep, _, _ = flow_dppo_mask(ratio, advantage, torch.tensor([1.0, 1.0]), DELTA)
    assert keep.all()


@given(data=_vectors(), threshold=st.sampled_from([0.0, 1e-6, 1e-5, 1.0]))
def test_flow_dppo_infinite_threshold_is_plain_importance_weighting(data, threshold):
    log_ratio_values, advantage_values = data
    advantage = torch.tensor(advantage_values)
    divergence = torch.rand(len(advantage)) * 2e-5
    lr = (torch.tensor(log_ratio_values) * 0.1).requires_grad_(True)
    terms = flow_dppo_objective(torch.exp(lr), advantage, divergence, math.inf)
    terms.loss.backward()
    lr_plain = lr.detach().clone().requires_grad_(True)
    plain = (-advantage * torch.exp(lr_plain)).mean()
    plain.backward()
    assert terms.keep.all()
    torch.testing.assert_close(terms.loss, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lr.grad, lr_plain.grad, rtol=1e-6, atol=1e-9)
    # a finite threshold only ever removes elements: the kept ones keep the same per-element loss
    finite = flow_dppo_objective(torch.exp(lr.detach()), advantage, divergence, threshold)
    torch.testing.assert_close(finite.per_element_loss[finite.keep], terms.per_element_loss.detach()[finite.keep])


def test_flow_dppo_ratio_overflow_gives_finite_loss_and_gradient():
    advantage = torch.tensor([1.0, -1.0, 0.0, 1.0])
    lr = torch.tensor([1e4, -1e4, 1e4, 0.01], requires_grad=True)  # ratio inf, 0, inf, ~1
    divergence = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ratio = torch.exp(lr.detach())
    assert math.isinf(ratio[0].item())
    keep, _, _ = flow_dppo_mask(ratio, advantage, divergence, DELTA)
    terms = flow_dppo_objective(importance_ratio(lr, keep & (advantage != 0)), advantage, divergence, DELTA)
    terms.loss.backward()
    assert math.isfinite(terms.loss.item())
    assert torch.isfinite(lr.grad).all()
    assert lr.grad[:3].eq(0).all() and lr.grad[3] != 0
    # without importance_ratio the forward is still finite (where, not multiply-by-mask)
    plain = flow_dppo_objective(torch.exp(lr.detach()), advantage, divergence, DELTA)
    assert math.isfinite(plain.loss.item())


def test_objective_validation():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_objective(x, x, -1e-4)
    with pytest.raises(ValueError, match="threshold"):
        flow_dppo_objective(x, x, x, -1e-5)
    with pytest.raises(ValueError, match="threshold"):
        flow_dppo_objective(x, x, x, float("nan"))
    with pytest.raises(ValueError, match="normalize"):
        flow_dppo_objective(x, x, x, 1e-5, normalize="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_objective(x, torch.ones(4), 1e-4)


# --------------------------------------------------------------------------- divergences and ratio diagnostics
@given(seed=st.integers(0, 2**31 - 1), shift=st.sampled_from([1e-4, 0.01, 1.0]))
def test_step_divergence_matches_torch_distributions(seed, shift):
    g = torch.Generator().manual_seed(seed)
    loc_old = torch.randn(5, 2, 3, 3, generator=g)
    loc_new = loc_old + shift * torch.randn(5, 2, 3, 3, generator=g)
    scale = 0.05 + torch.rand(5, 1, 1, 1, generator=g)
    # reference in float64: torch.distributions computes 0.5 * (1 + t - 1 - log 1), which cancels in float32
    p, q, s = loc_old.double(), loc_new.double(), scale.double().expand_as(loc_old)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(p, s), torch.distributions.Normal(q, s))
    expected = expected.mean(dim=(1, 2, 3)).float()
    torch.testing.assert_close(step_divergence(loc_new, loc_old, scale), expected, rtol=1e-5, atol=1e-12)
    # symmetric for a shared std
    torch.testing.assert_close(step_divergence(loc_old, loc_new, scale), expected, rtol=1e-5, atol=1e-12)


def test_velocity_divergence_and_ratio_helpers_by_hand():
    v_old = torch.zeros(2, 1, 2, 2)
    v_new = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    torch.testing.assert_close(velocity_divergence(v_new, v_old), torch.tensor([(1 + 4) / 4, 0.25]))
    log_ratio, ratio = ratio_from_log_probs(torch.tensor([0.1, -0.2]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(ratio, torch.exp(torch.tensor([0.1, -0.2])))
    assert approx_kl(log_ratio).item() == pytest.approx(0.5 * (0.01 + 0.04) / 2)
    with pytest.raises(ValueError, match="std"):
        step_divergence(v_new, v_old, torch.zeros(2, 1, 1, 1))


def test_importance_ratio_cuts_gradient_only_where_not_kept():
    lr = torch.tensor([0.5, 0.5], requires_grad=True)
    ratio = importance_ratio(lr, torch.tensor([True, False]))
    torch.testing.assert_close(ratio.detach(), torch.exp(lr.detach()))
    ratio.sum().backward()
    assert lr.grad[0].item() == pytest.approx(math.exp(0.5)) and lr.grad[1].item() == 0.0
