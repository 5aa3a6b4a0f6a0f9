"""Tests for flowgym.kernels: step kernels, Gaussian log-probabilities and the exact KL.

Conventions under test (docs/maths.md#conventions): ``x_s = (1 - s) x0 + s eps``, ``v = eps - x0``, denoising
goes from ``sigma`` to ``sigma_next < sigma``; every kernel returns ``(mean, std)`` in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from flowgym.kernels import (
    KERNELS,
    all_finite,
    apply_step_coefficients,
    cps_step,
    dance_sde_step,
    flow_grpo_reference_kl,
    flow_sde_step,
    gaussian_kl,
    gaussian_log_prob,
    get_kernel,
    get_kernel_coefficients,
    ode_step,
)
from flowgym.schedules import static_shift_sigmas

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEFAULT_NOISE = {"flow_sde": 0.7, "cps": 0.8, "dance_sde": 0.3, "ode": 0.0}


# --------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: intra-op threads only add contention on a shared machine
    (the 20k-sample chains ran ~100x slower with 2 threads on a loaded 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=dtype)


def _non_batch_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


shapes = st.tuples(
    st.integers(1, 4), st.lists(st.integers(1, 5), min_size=1, max_size=3)
).map(lambda bt: (bt[0], *bt[1]))

# Pairs (sigma, sigma_next) with 0 <= sigma_next < sigma <= 1.
sigma_pairs = st.tuples(st.floats(0.02, 1.0), st.floats(0.0, 0.98)).map(
    lambda p: (p[0], p[0] * p[1])
)


def _std_like(kind: str, shape: tuple[int, ...], scale: float, seed: int):
    """A positive std as a float, a per-sample (B, 1, ..., 1) tensor or a full-shape tensor."""
    if kind == "float":
        return scale
    if kind == "per_sample":
        return scale * torch.exp(0.5 * _randn((shape[0],) + (1,) * (len(shape) - 1), seed))
    return scale * torch.exp(0.5 * _randn(shape, seed))


# --------------------------------------------------------------------------- log-prob and KL vs torch.distributions
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.05, 5.0),
    std_kind=st.sampled_from(["float", "per_sample", "full"]),
    offset=st.floats(-3.0, 3.0),
)
def test_log_prob_matches_torch_normal(shape, seed, scale, std_kind, offset):
    mean = _randn(shape, seed) * 2.0 + offset
    std = _std_like(std_kind, shape, scale, seed + 1)
    std_t = torch.as_tensor(std, dtype=torch.float64).expand(shape)
    x_next = mean + std_t.float() * _randn(shape, seed + 2) * 1.5
    ref = Normal(mean.double(), std_t).log_prob(x_next.double())
    dims = _non_batch_dims(ref)

    out_sum = gaussian_log_prob(x_next, mean, std, reduce="sum")
    out_mean = gaussian_log_prob(x_next, mean, std, reduce="mean")
    out_none = gaussian_log_prob(x_next, mean, std, reduce="none")
    assert out_sum.shape == out_mean.shape == (shape[0],)
    assert out_sum.dtype == out_mean.dtype == torch.float32
    torch.testing.assert_close(out_sum.double(), ref.sum(dims), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out_mean.double(), ref.mean(dims), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_none.double(), ref, rtol=1e-5, atol=1e-5)
    # the default reduction is the per-dimension mean (the published hyper-parameters' scale)
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), out_mean, rtol=0, atol=0)


@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.05, 5.0),
    std_kind=st.sampled_from(["float", "per_sample", "full"]),
)
def test_kl_matches_torch_kl_divergence(shape, seed, scale, std_kind):
    mean_p = _randn(shape, seed)
    mean_q = mean_p + scale * _randn(shape, seed + 1)
    std = _std_like(std_kind, shape, scale, seed + 2)
    std_t = torch.as_tensor(std, dtype=torch.float64).expand(shape)
    ref = kl_divergence(Normal(mean_p.double(), std_t), Normal(mean_q.double(), std_t))
    dims = _non_batch_dims(ref)
    out_sum = gaussian_kl(mean_p, mean_q, std, reduce="sum")
    out_mean = gaussian_kl(mean_p, mean_q, std, reduce="mean")
    assert out_sum.dtype == out_mean.dtype == torch.float32
    torch.testing.assert_close(out_sum.double(), ref.sum(dims), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_mean.double(), ref.mean(dims), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std), out_mean, rtol=0, atol=0)


# --------------------------------------------------------------------------- KL properties
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    std=st.floats(0.01, 10.0),
    k=st.floats(0.1, 10.0),
    t=st.floats(0.1, 10.0),
)
def test_kl_symmetry_zero_and_scaling(shape, seed, std, k, t):
    mean_p = _randn(shape, seed)
    mean_q = _randn(shape, seed + 1)
    kl = gaussian_kl(mean_p, mean_q, std, reduce="mean")
    # symmetric for a shared std (bitwise: (a - b)^2 == (b - a)^2)
    assert torch.equal(kl, gaussian_kl(mean_q, mean_p, std, reduce="mean"))
    # zero exactly when the means are equal
    assert torch.equal(gaussian_kl(mean_p, mean_p.clone(), std), torch.zeros(shape[0]))
    assert bool((kl > 0).all())
    # 1 / std^2 scaling
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std * k), kl / k**2, rtol=1e-5, atol=0)
    # quadratic in the mean difference
    moved = mean_q + t * (mean_p - mean_q)
    torch.testing.assert_close(gaussian_kl(moved, mean_q, std), kl * t**2, rtol=1e-4, atol=0)
    # sum = mean * number of elements per sample
    numel = math.prod(shape[1:])
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std, reduce="sum"), kl * numel, rtol=1e-5, atol=0)
    # the formula itself: ||mu_p - mu_q||^2 / (2 std^2) for the full latent
    expected = ((mean_p.double() - mean_q.double()) ** 2).sum(_non_batch_dims(mean_p)) / (2 * std**2)
    torch.testing.assert_close(gaussian_kl(mean_p, mean_q, std, reduce="sum").double(), expected, rtol=1e-5, atol=0)


def test_log_ratio_matches_flow_dppo_decomposition():
    """With x = mu_old + std * eps and d = mu_new - mu_old:
    log r = eps.d / std - ||d||^2 / (2 std^2) (summed over the latent)."""
    shape, std = (3, 4, 5), 0.3
    mu_old = _randn(shape, 0)
    d = 0.05 * _randn(shape, 1)
    eps = _randn(shape, 2)
    x = mu_old + std * eps
    log_r = gaussian_log_prob(x, mu_old + d, std, "sum") - gaussian_log_prob(x, mu_old, std, "sum")
    expected = (eps * d).sum((1, 2)) / std - (d**2).sum((1, 2)) / (2 * std**2)
    torch.testing.assert_close(log_r, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- kernel formulas (float64 oracle)
def _formula(name: str, x, v, s: float, sn: float, a: float):
    """The formulas of docs/maths.md#sde-kernels written out independently, in float64."""
    x, v = x.double(), v.double()
    dt = sn - s
    if name == "ode":
        return x + v * dt, 0.0
    if name == "flow_sde":
        s_den = sn if s >= 1.0 else s
        sig_t = a * math.sqrt(s / (1.0 - s_den))
        mean = x * (1 + sig_t**2 * dt / (2 * s)) + v * (1 + sig_t**2 * (1 - s) / (2 * s)) * dt
        return mean, sig_t * math.sqrt(-dt)
    if name == "cps":
        std = sn * math.sin(a * math.pi / 2)
        return (1 - sn) * (x - s * v) + math.sqrt(max(sn**2 - std**2, 0.0)) * (x + (1 - s) * v), std
    if name == "dance_sde":
        score = -(x - (1 - s) * (x - s * v)) / s**2
        return x + (v - a**2 / 2 * score) * dt, a * math.sqrt(-dt)
    raise AssertionError(name)


@given(
    name=st.sampled_from(sorted(KERNELS)),
    pair=sigma_pairs,
    a=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernels_match_reference_formulas(name, pair, a, seed):
    # the kernel computes with float32 sigmas: give the oracle the same (rounded) values, since
    # near sigma = 1 the factor 1 / (1 - sigma) amplifies the rounding of sigma itself
    s, sn = (float(torch.tensor(p, dtype=torch.float32)) for p in pair)
    x, v = _randn((2, 3, 4), seed), _randn((2, 3, 4), seed + 1)
    mean, std = get_kernel(name)(x, v, s, sn, a)
    want_mean, want_std = _formula(name, x, v, s, sn, a)
    assert mean.dtype == std.dtype == torch.float32
    assert mean.shape == x.shape and std.dim() == 0
    scale = max(1.0, want_mean.abs().max().item())
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=2e-5 * scale)
    assert std.item() == pytest.approx(want_std, rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------- CPS keeps the coefficients
@given(pair=sigma_pairs, eta=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_cps_preserves_data_coefficient_and_noise_level(pair, eta, seed):
    s, sn = pair
    x0, e = _randn((3, 2, 5), seed), _randn((3, 2, 5), seed + 1)
    x = (1 - s) * x0 + s * e
    v = e - x0  # the exact velocity for this (x0, e) pair
    mean, std = cps_step(x, v, s, sn, eta)
    assert std.item() == pytest.approx(sn * math.sin(eta * math.pi / 2), rel=1e-6, abs=1e-7)
    coef = sn * math.cos(eta * math.pi / 2)  # = sqrt(sn^2 - std^2), exact in float64
    torch.testing.assert_close(mean, (1 - sn) * x0 + coef * e, rtol=1e-5, atol=1e-5)

    # Read the two coefficients off the kernel (it is linear in (x0, e)).
    ones = torch.ones(1, 4)
    data_coef, _ = cps_step((1 - s) * ones, -ones, s, sn, eta)  # x0 = 1, e = 0
    noise_coef, _ = cps_step(s * ones, ones, s, sn, eta)  # x0 = 0, e = 1
    torch.testing.assert_close(data_coef, torch.full_like(ones, 1 - sn), rtol=0, atol=1e-6)
    # total noise level: deterministic part and fresh noise together give exactly sigma_next
    total = noise_coef**2 + std**2
    torch.testing.assert_close(total, torch.full_like(ones, sn**2), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- degenerate cases and per-sample sigmas
@given(pair=sigma_pairs, seed=st.integers(0, 2**31 - 1))
def test_zero_noise_kernels_equal_the_ode_step(pair, seed):
    s, sn = pair
    x, v = _randn((2, 3, 4), seed), _randn((2, 3, 4), seed + 1)
    ode_mean, ode_std = ode_step(x, v, s, sn)
    assert torch.equal(ode_std, torch.zeros(()))
    sde_mean, sde_std = flow_sde_step(x, v, s, sn, 0.0)
    assert torch.equal(sde_mean, ode_mean)
    assert sde_std.item() == 0.0
    cps_mean, cps_std = cps_step(x, v, s, sn, 0.0)
    torch.testing.assert_close(cps_mean, ode_mean, rtol=1e-5, atol=1e-5)
    assert cps_std.item() == 0.0
    dance_mean, dance_std = dance_sde_step(x, v, s, sn, 0.0)
    torch.testing.assert_close(dance_mean, ode_mean, rtol=1e-6, atol=1e-6)
    assert dance_std.item() == 0.0


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("next_as_tensor", [True, False])
def test_per_sample_sigmas_equal_per_float_results(name, next_as_tensor):
    sig = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.05, 1.0])
    sig_next = torch.tensor([0.95, 0.6, 0.45, 0.0, 0.0, 0.0]) if next_as_tensor else 0.0
    x, v = _randn((6, 2, 3, 3), 0), _randn((6, 2, 3, 3), 1)
    kernel, a = get_kernel(name), DEFAULT_NOISE[name]
    mean, std = kernel(x, v, sig, sig_next, a)
    assert mean.shape == x.shape and std.shape == (6, 1, 1, 1)
    for i in range(6):
        sn_i = float(sig_next[i]) if next_as_tensor else sig_next
        m_i, s_i = kernel(x[i : i + 1], v[i : i + 1], float(sig[i]), sn_i, a)
        assert torch.isfinite(mean[i]).all() and torch.isfinite(std[i]).all()
        torch.testing.assert_close(mean[i : i + 1], m_i, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(std[i].reshape(()), s_i, rtol=1e-6, atol=0)


def test_per_sample_sigmas_with_sigma_cap():
    sig = torch.tensor([1.0, 0.995, 0.5])
    sig_next = torch.tensor([0.96, 0.9, 0.4])
    x, v = _randn((3, 4), 0), _randn((3, 4), 1)
    mean, std = flow_sde_step(x, v, sig, sig_next, 0.7, sigma_cap=0.99)
    for i in range(3):
        m_i, s_i = flow_sde_step(x[i : i + 1], v[i : i + 1], float(sig[i]), float(sig_next[i]), 0.7, sigma_cap=0.99)
        torch.testing.assert_close(mean[i : i + 1], m_i, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(std[i].reshape(()), s_i, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- sigma = 1 in Flow-SDE
def test_flow_sde_at_sigma_one_substitutes_sigma_next():
    """Convention: at sigma = 1 the denominator's sigma becomes sigma_next (Flow-GRPO substitutes the
    schedule's second sigma, which is the first step's sigma_next)."""
    x, v = _randn((2, 8), 0), _randn((2, 8), 1)
    a, sn = 0.7, 0.9601
    mean, std = flow_sde_step(x, v, 1.0, sn, a)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    sig_t = a * math.sqrt(1.0 / (1.0 - sn))
    assert std.item() == pytest.approx(sig_t * math.sqrt(1.0 - sn), rel=1e-5)
    dt = sn - 1.0
    want = x * (1 + sig_t**2 * dt / 2) + v * dt  # (1 - sigma) = 0 kills the v correction
    torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-5)
    # a one-step schedule 1 -> 0 stays finite too (denominator 1 - 0)
    m1, s1 = flow_sde_step(x, v, 1.0, 0.0, a)
    assert torch.isfinite(m1).all() and s1.item() == pytest.approx(a)


def test_flow_sde_sigma_cap():
    x, v = _randn((2, 8), 0), _randn((2, 8), 1)
    a = 0.7
    _, std = flow_sde_step(x, v, 1.0, 0.96, a, sigma_cap=0.99)
    # sigma_t = a * sqrt(1 / (1 - 0.99)) = 10 a; std = 10 a * sqrt(0.04) = 2 a
    assert std.item() == pytest.approx(2 * a, rel=1e-4)
    _, std_995 = flow_sde_step(x, v, 0.995, 0.9, a, sigma_cap=0.99)
    assert std_995.item() == pytest.approx(a * math.sqrt(0.995 / 0.01) * math.sqrt(0.095), rel=1e-4)
    # below the cap the cap changes nothing
    m_cap, s_cap = flow_sde_step(x, v, 0.5, 0.4, a, sigma_cap=0.99)
    m_def, s_def = flow_sde_step(x, v, 0.5, 0.4, a)
    assert torch.equal(m_cap, m_def) and torch.equal(s_cap, s_def)


# --------------------------------------------------------------------------- low-precision inputs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_log_prob_and_kl_are_float32_on_upcast_values(dtype):
    x_next = (_randn((3, 4, 5), 0) * 3).to(dtype)
    mean = (_randn((3, 4, 5), 1) * 3).to(dtype)
    std = (torch.rand(3, 1, 1, generator=_gen(2)) + 0.1).to(dtype)
    for reduce in ("mean", "sum", "none"):
        lp = gaussian_log_prob(x_next, mean, std, reduce)
        assert lp.dtype == torch.float32
        assert torch.equal(lp, gaussian_log_prob(x_next.float(), mean.float(), std.float(), reduce))
        kl = gaussian_kl(x_next, mean, std, reduce)
        assert kl.dtype == torch.float32
        assert torch.equal(kl, gaussian_kl(x_next.float(), mean.float(), std.float(), reduce))
    # differences whose square overflows float16 (300^2 > 65504) stay finite
    far = mean + torch.full_like(mean, 300)
    assert torch.isfinite(gaussian_log_prob(far, mean, std)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_half_precision_kernels_return_float32(dtype, name):
    x, v = _randn((2, 3, 4), 0).to(dtype), _randn((2, 3, 4), 1).to(dtype)
    sig = torch.tensor([1.0, 0.5], dtype=dtype)
    sig_next = torch.tensor([0.75, 0.25], dtype=dtype)
    kernel, a = get_kernel(name), DEFAULT_NOISE[name]
    mean, std = kernel(x, v, sig, sig_next, a)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    mean32, std32 = kernel(x.float(), v.float(), sig.float(), sig_next.float(), a)
    assert torch.equal(mean, mean32) and torch.equal(std, std32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_and_densities_stay_on_device(device, name):
    x = _randn((2, 3), 0).to(device)
    v = _randn((2, 3), 1).to(device)
    sig = torch.tensor([1.0, 0.5], device=device)
    mean, std = get_kernel(name)(x, v, sig, 0.25, DEFAULT_NOISE[name])
    assert mean.device == x.device and std.device == x.device
    if name != "ode":
        assert gaussian_log_prob(mean, mean, std).device == x.device
        assert gaussian_kl(mean, x, std).device == x.device


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "std",
    [0.0, -1.0, float("nan"), float("inf"), torch.tensor([[1.0], [0.0]]), "ode"],
    ids=["zero", "negative", "nan", "inf", "one_zero_row", "ode_step_std"],
)
def test_degenerate_std_raises_instead_of_nan(std):
    x, mean = _randn((2, 3), 0), _randn((2, 3), 1)
    if isinstance(std, str):
        _, std = ode_step(x, mean, 0.5, 0.4)
    with pytest.raises(ValueError, match="^std "):
        gaussian_log_prob(x, mean, std)
    with pytest.raises(ValueError, match="^std "):
        gaussian_kl(x, mean, std)
    with pytest.raises(ValueError, match="^std "):
        flow_grpo_reference_kl(x, mean, std, 0.5, 0.4)


X = _randn((2, 3), 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: flow_sde_step(X, X, 0.5, 0.5), "^sigma_next must be strictly smaller"),
        (lambda: cps_step(X, X, 0.4, 0.5), "^sigma_next must be strictly smaller"),
        (lambda: dance_sde_step(X, X, torch.tensor([0.5, 0.3]), torch.tensor([0.4, 0.3])), "^sigma_next must be strictly"),
        (lambda: ode_step(X, X, 1.5, 0.5), "^sigma must lie in"),
        (lambda: ode_step(X, X, 0.5, -0.1), "^sigma_next must lie in"),
        (lambda: flow_sde_step(X, X, float("nan"), 0.1), "^sigma must lie in"),
        (lambda: flow_sde_step(X, X, torch.tensor([1.0, 1.2]), 0.1), "^sigma must lie in"),
        (lambda: flow_sde_step(X, X, torch.tensor([0.5, 0.5, 0.5]), 0.1), "^sigma must be a float"),
        (lambda: flow_sde_step(X, X, 0.5, torch.tensor([0.1, 0.1, 0.1])), "^sigma_next must be a float"),
        (lambda: flow_sde_step(X, X, torch.full((2, 3), 0.5), 0.1), "^sigma must be a float"),
        (lambda: flow_sde_step(X, X[:, :2], 0.5, 0.1), "^x and v must have the same shape"),
        (lambda: cps_step(X[0], X[0], 0.5, 0.1), "^x must be batched"),
        (lambda: flow_sde_step(X, X, 0.5, 0.1, -0.1), "^noise_level"),
        (lambda: cps_step(X, X, 0.5, 0.1, float("nan")), "^noise_level"),
        (lambda: flow_sde_step(X, X, 1.0, 0.1, sigma_cap=1.0), "^sigma_cap"),
        (lambda: flow_sde_step(X, X, 1.0, 0.1, sigma_cap=0.0), "^sigma_cap"),
        (lambda: gaussian_log_prob(X, X[:, :2], 1.0), "^x_next and mean must have the same shape"),
        (lambda: gaussian_kl(X, X[:1], 1.0), "^mean_p and mean_q must have the same shape"),
        (lambda: gaussian_log_prob(X, X, torch.ones(4)), "^std of shape"),
        (lambda: gaussian_kl(X, X, torch.ones(2, 1, 1)), "^std of shape"),
        (lambda: gaussian_log_prob(X, X, 1.0, reduce="max"), "^reduce must be one of"),
        (lambda: gaussian_log_prob(X, X, 1.0, convention="cps"), "^convention must be"),
        (lambda: flow_grpo_reference_kl(X, X, 1.0, 0.4, 0.5), "^sigma_next must be smaller"),
        (lambda: flow_grpo_reference_kl(X, X, 1.0, torch.tensor([0.5] * 3), 0.1), "^sigma must be a float"),
        (lambda: get_kernel("ddim"), "^unknown kernel 'ddim'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- KL / log-prob conventions
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    pair=sigma_pairs,
    per_sample=st.booleans(),
    reduce=st.sampled_from(["mean", "sum", "none"]),
)
def test_flow_grpo_reference_kl_is_exact_kl_times_dt(shape, seed, pair, per_sample, reduce):
    mean_p, mean_q = _randn(shape, seed), _randn(shape, seed + 1)
    s, sn = pair
    std = 0.3
    if per_sample:
        b = shape[0]
        s_arg = torch.linspace(s, 1.0, b)
        sn_arg = torch.full((b,), sn)
        dt = (s_arg - sn_arg).reshape(b, *([1] * (len(shape) - 1)))
    else:
        s_arg, sn_arg, dt = s, sn, torch.tensor(s - sn)
    got = flow_grpo_reference_kl(mean_p, mean_q, std, s_arg, sn_arg, reduce=reduce)
    exact_none = gaussian_kl(mean_p, mean_q, std, reduce="none")
    want = exact_none * dt
    if reduce != "none":
        dims = _non_batch_dims(want)
        want = want.mean(dims) if reduce == "mean" else want.sum(dims)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if not per_sample and reduce != "none":
        torch.testing.assert_close(got, gaussian_kl(mean_p, mean_q, std, reduce) * (s - sn), rtol=1e-5, atol=1e-7)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1), std=st.floats(0.05, 2.0))
def test_cps_legacy_log_prob_convention(shape, seed, std):
    x_next, mean = _randn(shape, seed), _randn(shape, seed + 1)
    dims = _non_batch_dims(x_next)
    legacy = gaussian_log_prob(x_next, mean, std, convention="cps_legacy")
    torch.testing.assert_close(legacy, -((x_next - mean) ** 2).mean(dims), rtol=1e-6, atol=1e-6)
    legacy_sum = gaussian_log_prob(x_next, mean, std, "sum", convention="cps_legacy")
    torch.testing.assert_close(legacy_sum, -((x_next - mean) ** 2).sum(dims), rtol=1e-6, atol=1e-6)
    # the legacy log-ratio is the exact one rescaled by 2 std^2 (for a std shared by both policies)
    mean_new = mean + 0.1 * _randn(shape, seed + 2)
    exact_ratio = gaussian_log_prob(x_next, mean_new, std) - gaussian_log_prob(x_next, mean, std)
    legacy_ratio = gaussian_log_prob(x_next, mean_new, std, convention="cps_legacy") - legacy
    torch.testing.assert_close(legacy_ratio, exact_ratio * 2 * std**2, rtol=1e-3, atol=1e-5)


def test_registry():
    assert set(KERNELS) == {"flow_sde", "cps", "dance_sde", "ode"}
    assert get_kernel("flow_sde") is flow_sde_step and get_kernel("cps") is cps_step
    assert get_kernel("dance_sde") is dance_sde_step and get_kernel("ode") is ode_step


# --------------------------------------------------------------------------- closed form: Gaussian data
# Data x0 ~ N(m, C) in 2-D (C full, so the two coordinates are coupled). With x_s = (1 - s) x0 + s eps,
# (x0, eps, x_s) are jointly Gaussian:
#   V(s) = Cov(x_s) = (1 - s)^2 C + s^2 I,   Cov(x0, x_s) = (1 - s) C,   Cov(eps, x_s) = s I
#   E[x0  | x_s = x] = m + (1 - s) C V^-1 (x - (1 - s) m)
#   E[eps | x_s = x] = s V^-1 (x - (1 - s) m)
#   v(x, s) = E[eps - x0 | x_s = x] = (s I - (1 - s) C) V^-1 (x - (1 - s) m) - m
DATA_MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
_L = torch.tensor([[0.6, 0.0], [0.4, 0.3]], dtype=torch.float64)
DATA_COV = _L @ _L.T  # [[0.36, 0.24], [0.24, 0.25]]
EYE = torch.eye(2, dtype=torch.float64)


def _posterior_gains(s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, Ae) with E[x0 | x] = m + A0 d and E[eps | x] = Ae d, d = x - (1 - s) m."""
    v_inv = torch.linalg.inv((1 - s) ** 2 * DATA_COV + s**2 * EYE)
    return (1 - s) * DATA_COV @ v_inv, s * v_inv


def exact_velocity(x: torch.Tensor, s: float) -> torch.Tensor:
    a0, ae = _posterior_gains(s)
    d = x.double() - (1 - s) * DATA_MEAN
    return (d @ (ae - a0).T - DATA_MEAN).to(x.dtype)


def test_exact_velocity_matches_monte_carlo_regression():
    """Regress eps - x0 on (x_s, 1) over 200k draws at s = 0.4: slope and intercept must match."""
    s, n = 0.4, 200_000
    g = _gen(123)
    x0 = DATA_MEAN + torch.randn(n, 2, generator=g, dtype=torch.float64) @ _L.T
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * eps
    design = torch.cat([x_s, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    coef = torch.linalg.lstsq(design, eps - x0).solution  # (3, 2)
    a0, ae = _posterior_gains(s)
    slope = ae - a0
    intercept = -slope @ ((1 - s) * DATA_MEAN) - DATA_MEAN
    # standard errors are about 0.004 here; 0.02 is five of them
    torch.testing.assert_close(coef[:2].T, slope, rtol=0, atol=0.02)
    torch.testing.assert_close(coef[2], intercept, rtol=0, atol=0.02)
    # and the field is the conditional mean: residuals are uncorrelated with x_s
    resid = (eps - x0) - exact_velocity(x_s, s)
    assert resid.mean(0).abs().max().item() < 0.01


def _sample(kernel_name: str, noise_level: float, sigmas: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    kernel = get_kernel(kernel_name)
    x = torch.randn(n, 2, generator=g)
    for k in range(len(sigmas) - 1):
        s, sn = float(sigmas[k]), float(sigmas[k + 1])
        mean, std = kernel(x, exact_velocity(x, s), s, sn, noise_level)
        x = mean + std * torch.randn(n, 2, generator=g)
    return x.double()


def _cov_standard_errors(cov: torch.Tensor, n: int) -> torch.Tensor:
    """Standard error of each entry of a Gaussian sample covariance: sqrt((C_ii C_jj + C_ij^2) / n)."""
    d = torch.diagonal(cov)
    return torch.sqrt((d[:, None] * d[None, :] + cov**2) / n)


N_SAMPLES = 20_000


@pytest.mark.parametrize(
    "name, noise_level, allowance",
    [
        # allowance = discretisation bias of the covariance for 50 linear (shift 1) steps with the
        # exact field, computed from the exact linear-Gaussian law of each chain: ODE (Euler) 0.020,
        # Flow-SDE (a = 0.7) 0.001, Dance-SDE (eta = 0.3) 0.017. The SD3.5 10-step shift-3 schedule
        # has a bias of 0.08 to 0.15 (too coarse for a sharp test), so it is not used here.
        ("ode", 0.0, 0.025),
        ("flow_sde", 0.7, 0.005),
        ("dance_sde", 0.3, 0.025),
    ],
)
def test_samplers_reproduce_gaussian_data(name, noise_level, allowance):
    sigmas = static_shift_sigmas(50, 1.0)
    x = _sample(name, noise_level, sigmas, N_SAMPLES, seed=7)
    assert torch.isfinite(x).all()
    # tolerance: 5 standard errors of the sample statistics plus the stated allowance
    mean_tol = 5 * torch.sqrt(torch.diagonal(DATA_COV) / N_SAMPLES)  # about 0.021, 0.018
    cov_tol = 5 * _cov_standard_errors(DATA_COV, N_SAMPLES) + allowance  # 5 SE is about 0.014 - 0.018
    mean_err = (x.mean(0) - DATA_MEAN).abs()
    cov_err = (torch.cov(x.T) - DATA_COV).abs()
    assert bool((mean_err <= mean_tol).all()), f"{name}: mean error {mean_err}, tol {mean_tol}"
    assert bool((cov_err <= cov_tol).all()), f"{name}: cov error {cov_err}, tol {cov_tol}"


def _cps_exact_law(sigmas: torch.Tensor, eta: float) -> torch.Tensor:
    """Covariance of the final sample of the CPS chain with the exact field, derived from the posterior.

    With d = x - (1 - s) m: mean' - (1 - s') m = G d, G = ((1 - s')(1 - s) C + k s I) V(s)^-1,
    k = sqrt(s'^2 - std^2), std = s' sin(eta pi / 2); so Cov' = G Cov G^T + std^2 I. Start: Cov = I.
    """
    cov = EYE.clone()
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        std = sn * math.sin(eta * math.pi / 2)
        k = math.sqrt(max(sn**2 - std**2, 0.0))
        gain = ((1 - sn) * (1 - s) * DATA_COV + k * s * EYE) @ torch.linalg.inv((1 - s) ** 2 * DATA_COV + s**2 * EYE)
        cov = gain @ cov @ gain.T + std**2 * EYE
    return cov


def test_cps_sampler_keeps_the_mean_but_under_disperses():
    """CPS (eta = 0.8) with the exact field keeps the data mean but NOT the covariance.

    Each CPS step re-noises to a fixed fraction sin(eta pi / 2) of sigma_next around the posterior
    means; by Cauchy-Schwarz the variance it passes on is at most the target's, with equality only
    when sqrt(s'^2 - std^2) / s = (1 - s') / (1 - s) (the deterministic DDIM choice). The lost variance
    does not vanish with more steps: with 50 linear steps the final covariance is about 0.61 C.
    So this test checks the samples against the chain's exact law (derived above), not the data's.
    """
    eta = 0.8
    sigmas = static_shift_sigmas(50, 1.0)
    x = _sample("cps", eta, sigmas, N_SAMPLES, seed=11)
    law = _cps_exact_law(sigmas, eta)
    mean_tol = 5 * torch.sqrt(torch.diagonal(law) / N_SAMPLES)
    assert bool(((x.mean(0) - DATA_MEAN).abs() <= mean_tol).all())
    cov = torch.cov(x.T)
    assert bool(((cov - law).abs() <= 5 * _cov_standard_errors(law, N_SAMPLES)).all()), f"{cov} vs {law}"
    ratio = torch.trace(law) / torch.trace(DATA_COV)
    assert 0.5 < ratio.item() < 0.7
    # eta = 0 is DDIM = Euler ODE: the same recursion then approaches the data with more steps
    ddim = _cps_exact_law(static_shift_sigmas(200, 1.0), 0.0)
    torch.testing.assert_close(ddim, DATA_COV, rtol=0, atol=0.01)


# --------------------------------------------------------------------------- whole-schedule coefficients
@pytest.mark.parametrize("name", sorted(KERNELS))
@given(seed=st.integers(0, 2**31 - 1), shift=st.sampled_from([1.0, 3.0]), steps=st.integers(2, 12))
def test_schedule_coefficients_reproduce_each_step_bit_for_bit(name, seed, shift, steps):
    """What the fused rollout relies on: coefficients computed once for a whole schedule, as Python
    floats, give exactly the per-sample kernel step (mean and std)."""
    sigmas = static_shift_sigmas(steps, shift)
    a = DEFAULT_NOISE[name]
    c_x, c_v, std = (t.expand(steps).tolist() for t in get_kernel_coefficients(name)(sigmas[:-1], sigmas[1:], a))
    x, v = _randn((5, 2, 3), seed), _randn((5, 2, 3), seed + 1)
    for k in range(steps):
        if name == "cps" and sigmas[k + 1] == 0:
            continue  # std 0 at the last step: the kernel is fine, only its density is not
        mean, step_std = get_kernel(name)(x, v, sigmas[k].expand(5), sigmas[k + 1].expand(5), a)
        assert torch.equal(mean, apply_step_coefficients(x, v, c_x[k], c_v[k])), k
        assert torch.equal(step_std.reshape(-1), torch.full((5,), std[k])), k


def test_all_finite_matches_isfinite():
    x = _randn((4, 3, 5), 0)
    assert all_finite(x) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 1, 3] = bad
        assert not all_finite(y)
    assert all_finite(torch.full((3,), 3e38)) and not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))
