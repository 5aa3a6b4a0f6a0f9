"""Tests for flowgym.schedules: the SD3.5 static-shift and FLUX dynamic-shift sigma schedules."""

from __future__ import annotations

import math

import pytest
import torch

from flowgym.kernels import flow_sde_step
from flowgym.schedules import dynamic_shift_sigmas, flux_mu, make_sigmas, static_shift_sigmas

SD35_10_STEPS = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
# Flow-GRPO's per-step std for 10 SD3.5 steps at noise level 0.7 (docs/maths.md#sde-kernels).
FLOW_SDE_STD_10_STEPS = [0.70, 0.74, 0.54, 0.45, 0.39, 0.35, 0.32, 0.28, 0.23, 0.006]


def _shift(s: torch.Tensor | float, shift: float):
    return shift * s / (1.0 + (shift - 1.0) * s)


def _assert_valid_schedule(sigmas: torch.Tensor, num_steps: int) -> None:
    assert sigmas.dtype == torch.float32
    assert sigmas.shape == (num_steps + 1,)
    assert sigmas[0].item() == pytest.approx(1.0, abs=1e-6)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all()), f"schedule not strictly decreasing: {sigmas}"


def test_sd35_schedule_matches_published_values():
    sigmas = static_shift_sigmas(10, 3.0)
    _assert_valid_schedule(sigmas, 10)
    torch.testing.assert_close(sigmas, torch.tensor(SD35_10_STEPS), rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_steps", [1, 2, 10, 28, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_static_schedule_is_double_shifted_linspace(num_steps: int, shift: float):
    """diffusers shifts when built (only the end point 1/1000 survives) and again in set_timesteps.

    Independent derivation: t = linspace(1, shift(1/1000), K), sigmas = shift(t), then a final 0.
    """
    sigmas = static_shift_sigmas(num_steps, shift)
    _assert_valid_schedule(sigmas, num_steps)
    t = torch.linspace(1.0, _shift(1.0 / 1000.0, shift), num_steps, dtype=torch.float64)
    expected = torch.cat([_shift(t, shift), torch.zeros(1, dtype=torch.float64)]).float()
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-5)


def test_larger_static_shift_spends_more_steps_at_high_noise():
    low, high = static_shift_sigmas(10, 1.0), static_shift_sigmas(10, 3.0)
    assert bool((high[1:-1] > low[1:-1]).all())


def test_flow_sde_std_on_sd35_schedule_matches_flow_grpo():
    sigmas = static_shift_sigmas(10, 3.0)
    x = torch.zeros(1, 4)
    stds = [
        flow_sde_step(x, x, float(sigmas[k]), float(sigmas[k + 1]), 0.7)[1].item() for k in range(10)
    ]
    # The last entry (.006) is given to one significant figure: compare it to 1e-3.
    for k, (got, want) in enumerate(zip(stds, FLOW_SDE_STD_10_STEPS)):
        tol = 1e-3 if k == 9 else 1e-2
        assert got == pytest.approx(want, abs=tol), f"step {k}: std {got:.4f}, published {want}"


@pytest.mark.parametrize("num_steps", [1, 4, 10, 28])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_dynamic_schedule_shape_and_ends(num_steps: int, image_seq_len: int):
    sigmas = dynamic_shift_sigmas(num_steps, image_seq_len)
    _assert_valid_schedule(sigmas, num_steps)


def test_dynamic_schedule_is_flux_time_shift_and_differs_from_static():
    """FLUX's exponential time shift: s = e^mu / (e^mu + 1/t - 1) on t = linspace(1, 1/K, K)."""
    num_steps, seq = 10, 4096
    sigmas = dynamic_shift_sigmas(num_steps, seq)
    mu = flux_mu(seq)
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    expected = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    torch.testing.assert_close(sigmas[:-1], expected.float(), rtol=0, atol=1e-5)
    for static in (static_shift_sigmas(num_steps, 3.0), static_shift_sigmas(num_steps, 1.0)):
        assert (sigmas - static).abs().max().item() > 1e-2


def test_dynamic_shift_grows_with_resolution():
    small, large = dynamic_shift_sigmas(10, 256), dynamic_shift_sigmas(10, 4096)
    assert bool((large[1:-1] > small[1:-1]).all())


def test_flux_mu_is_linear_between_its_anchors():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx((0.5 + 1.15) / 2)
    assert flux_mu(1024, base_shift=0.0, max_shift=1.0, base_seq_len=0, max_seq_len=2048) == pytest.approx(0.5)


def test_make_sigmas_dispatches():
    torch.testing.assert_close(make_sigmas(10, 3.0), static_shift_sigmas(10, 3.0), rtol=0, atol=0)
    torch.testing.assert_close(
        make_sigmas(10, "dynamic", image_seq_len=1024), dynamic_shift_sigmas(10, 1024), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: static_shift_sigmas(0), "num_steps"),
        (lambda: static_shift_sigmas(2.5), "num_steps"),
        (lambda: static_shift_sigmas(10, 0.0), "shift"),
        (lambda: static_shift_sigmas(10, -1.0), "shift"),
        (lambda: static_shift_sigmas(10, float("inf")), "shift"),
        (lambda: dynamic_shift_sigmas(0, 1024), "num_steps"),
        (lambda: dynamic_shift_sigmas(10, 0), "image_seq_len"),
        (lambda: make_sigmas(10, "dynamic"), "image_seq_len"),
        (lambda: make_sigmas(10, "exponential"), "shift"),
        (lambda: make_sigmas(10, float("inf")), "shift"),
        (lambda: make_sigmas(10, float("nan")), "shift"),
    ],
)
def test_bad_schedule_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
