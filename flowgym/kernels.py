"""Per-step Gaussian policies of the denoising MDP, their log-probabilities and exact KL.

The maths, with the published noise levels: docs/maths.md#sde-kernels and
docs/maths.md#log-probabilities-and-kl.

Conventions (rectified flow, as SD3 / FLUX and diffusers use it):

* ``x_s = (1 - s) * x_data + s * eps``; ``s = 1`` is pure noise, ``s = 0`` is data.
* The model predicts the velocity ``v ~ eps - x_data``.
* Denoising walks a decreasing schedule; a step goes from ``sigma`` to ``sigma_next < sigma``
  and ``dt = sigma_next - sigma < 0``.
* ``x0_hat = x - sigma * v`` (predicted data) and ``x1_hat = x + (1 - sigma) * v`` (predicted
  noise).

Every step kernel maps ``(x, v, sigma, sigma_next, noise_level)`` to ``(mean, std)`` of the
next latent, ``x_next ~ N(mean, std^2 I)``. ``std`` has shape ``(B, 1, ..., 1)`` (or a 0-d
tensor when both sigmas are Python floats) and broadcasts against ``mean``. The std never depends
on the model parameters, so an old and a new policy evaluated on the same state share it.

All kernel maths runs in float32 whatever the input dtype: bf16 overflows in the Flow-SDE
coefficients, and log-ratios of two float32 evaluations must be exactly zero when the
parameters did not change.

Reductions: ``reduce="mean"`` averages over every non-batch dimension (the scale on which the
published clip ranges, e.g. 1e-4, and divergence thresholds, e.g. 1e-5, are set); ``"sum"``
sums, giving the exact log-density / KL of the full latent.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple, Union

import torch
from torch import Tensor

from flowgym.registry import Registry

Sigma = Union[float, Tensor]
Reduce = Literal["mean", "sum", "none"]

__all__ = [
    "flow_sde_step",
    "cps_step",
    "dance_sde_step",
    "ode_step",
    "all_finite",
    "apply_step_coefficients",
    "flow_sde_coefficients",
    "cps_coefficients",
    "dance_sde_coefficients",
    "ode_coefficients",
    "Kernel",
    "get_kernel_coefficients",
    "gaussian_log_prob",
    "gaussian_log_prob_unchecked",
    "log_prob_coefficients",
    "isotropic_log_prob",
    "gaussian_kl",
    "flow_grpo_reference_kl",
    "KERNELS",
    "register_kernel",
    "get_kernel",
    "StepKernel",
]

StepKernel = Callable[[Tensor, Tensor, Sigma, Sigma, float], "tuple[Tensor, Tensor]"]


# --------------------------------------------------------------------------- validation helpers
def _as_sigma(value: Sigma, x: Tensor, name: str, check: bool = True) -> Tensor:
    """Return ``value`` as a float32 tensor of shape ``(B, 1, ..., 1)`` (or 0-d for a scalar).

    Accepts a Python float, a 0-d tensor or a per-sample tensor of shape ``(B,)`` (or already
    ``(B, 1, ..., 1)``). Raises ``ValueError`` naming ``name`` when the value lies outside
    [0, 1] or its batch size does not match ``x``.
    """
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.dim() > 0:
        if t.shape[0] != x.shape[0] or any(d != 1 for d in t.shape[1:]):
            raise ValueError(
                f"{name} must be a float, a 0-d tensor or a per-sample tensor of shape "
                f"({x.shape[0]},); got shape {tuple(t.shape)} for latents of shape {tuple(x.shape)}"
            )
        t = t.reshape(x.shape[0], *([1] * (x.dim() - 1)))
    # one reduction (one device sync): NaN fails both comparisons, +-inf fails one
    if check and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")
    return t


def _prepare_step(
    x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate a step's arguments and return float32 ``x, v, sigma, sigma_next``."""
    if x.shape != v.shape:
        raise ValueError(
            f"x and v must have the same shape; got x {tuple(x.shape)} and v {tuple(v.shape)}"
        )
    if x.dim() < 2:
        raise ValueError(f"x must be batched, shape (B, ...); got shape {tuple(x.shape)}")
    if not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"noise_level must be a finite float >= 0; got {noise_level!r}")
    s = _as_sigma(sigma, x, "sigma", check=False)
    s_next = _as_sigma(sigma_next, x, "sigma_next", check=False)
    # every sigma check in one reduction (a single device sync per step); diagnose on failure
    if not bool(((s <= 1) & (s_next >= 0) & (s_next < s)).all()):
        _as_sigma(sigma, x, "sigma")
        _as_sigma(sigma_next, x, "sigma_next")
        raise ValueError(
            "sigma_next must be strictly smaller than sigma (denoising walks a decreasing "
            f"schedule); got sigma={sigma}, sigma_next={sigma_next}"
        )
    return x.float(), v.float(), s, s_next


def _std_shaped(std: Tensor, s: Tensor, s_next: Tensor) -> Tensor:
    """Broadcast ``std`` to the sigmas' common shape: ``(B, 1, ..., 1)`` when either sigma is
    per-sample, 0-d when both are scalars (the documented shape of every kernel's std)."""
    shape = torch.broadcast_shapes(std.shape, s.shape, s_next.shape)
    return std if std.shape == shape else std.expand(shape).contiguous()


# --------------------------------------------------------------------------- step kernels
# Every kernel is affine in (x, v) with a std that depends on the sigmas only:
#     mean = c_x * x + c_v * v,    std = s(sigma, sigma_next)
# so each is written as a pure coefficient function (any broadcastable sigma tensors, no checks),
# and the validated step functions below apply it. A whole schedule's coefficients can be computed
# in one call (``FlowPolicy.plan_episode``), which the fast rollout path relies on.
StepCoefficients = tuple[Tensor, Tensor, Tensor]


def apply_step_coefficients(x: Tensor, v: Tensor, c_x: Tensor | float, c_v: Tensor | float) -> Tensor:
    """The kernel mean ``c_x * x + c_v * v`` (coefficients: floats or tensors broadcasting to x)."""
    return x * c_x + v * c_v


def _score_corrected_coefficients(s: Tensor, dt: Tensor, g_sq: Tensor | float) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama mean of ``dx = (v - g^2 / 2 * score) dt`` with ``score = -(x + (1 - s) v) / s``::

        c_x = 1 + g^2 dt / (2 s),  c_v = (1 + g^2 (1 - s) / (2 s)) * dt

    Flow-SDE (``g = sigma_t``, which depends on sigma) and Dance-SDE (``g = eta``) share it.
    """
    return 1.0 + g_sq * dt / (2.0 * s), (1.0 + g_sq * (1.0 - s) / (2.0 * s)) * dt


def ode_coefficients(s: Tensor, s_next: Tensor, noise_level: float = 0.0) -> StepCoefficients:
    """Euler step: ``c_x = 1``, ``c_v = dt = sigma_next - sigma``, ``std = 0``."""
    dt = s_next - s
    return torch.ones_like(dt), dt, torch.zeros_like(dt)


def flow_sde_coefficients(
    s: Tensor, s_next: Tensor, noise_level: float = 0.7, *, sigma_cap: float | None = None
) -> StepCoefficients:
    """Flow-GRPO's step coefficients (see ``flow_sde_step``)::

        sigma_t = a * sqrt(s / (1 - s_den))      s_den = s, or s_next where s = 1 (sigma_cap: clamp)
        c_x = 1 + sigma_t^2 * dt / (2 s),  c_v = (1 + sigma_t^2 (1 - s) / (2 s)) * dt,  std = sigma_t * sqrt(-dt)
    """
    dt = s_next - s
    if sigma_cap is not None:
        if not 0.0 < sigma_cap < 1.0:
            raise ValueError(f"sigma_cap must lie in (0, 1); got {sigma_cap}")
        s_denominator = s.clamp(max=sigma_cap)
    else:
        s_denominator = torch.where(s >= 1.0, s_next, s)
    sigma_t = noise_level * torch.sqrt(s / (1.0 - s_denominator))
    c_x, c_v = _score_corrected_coefficients(s, dt, sigma_t**2)
    return c_x, c_v, sigma_t * torch.sqrt(-dt)


def cps_coefficients(s: Tensor, s_next: Tensor, noise_level: float = 0.8) -> StepCoefficients:
    """CPS step coefficients (see ``cps_step``); with ``n = sigma_next * |cos(eta pi / 2)|``::

        mean = (1 - s_next) * (x - s v) + n * (x + (1 - s) v)
        c_x = (1 - s_next) + n,  c_v = n (1 - s) - (1 - s_next) s,  std = s_next * sin(eta pi / 2)

    ``n`` is ``sqrt(sigma_next^2 - std^2)`` written without the float32 cancellation of the
    difference (which costs ~sqrt(eps) * sigma_next as eta -> 1).
    """
    noise_coefficient = s_next * abs(math.cos(noise_level * math.pi / 2.0))
    c_x = (1.0 - s_next) + noise_coefficient
    c_v = noise_coefficient * (1.0 - s) - (1.0 - s_next) * s
    std = s_next * math.sin(noise_level * math.pi / 2.0)
    return c_x, c_v, std


def dance_sde_coefficients(s: Tensor, s_next: Tensor, noise_level: float = 0.3) -> StepCoefficients:
    """DanceGRPO's step coefficients (see ``dance_sde_step``); with ``eta = noise_level``::

        c_x = 1 + eta^2 dt / (2 s),  c_v = (1 + eta^2 (1 - s) / (2 s)) * dt,  std = eta * sqrt(-dt)

    (the score correction ``-(eta^2 / 2) * score * dt`` with ``score = -(x + (1 - s) v) / s``
    folded into the two coefficients).
    """
    dt = s_next - s
    c_x, c_v = _score_corrected_coefficients(s, dt, noise_level**2)
    return c_x, c_v, noise_level * torch.sqrt(-dt)


def ode_step(
    x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Deterministic Euler step: ``mean = x + v * (sigma_next - sigma)``, ``std = 0``.

    ``noise_level`` is accepted for a uniform signature and ignored.
    """
    x, v, s, s_next = _prepare_step(x, v, sigma, sigma_next, float(noise_level))
    c_x, c_v, std = ode_coefficients(s, s_next)
    return apply_step_coefficients(x, v, c_x, c_v), _std_shaped(std, s, s_next)


def flow_sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float = 0.7,
    *,
    sigma_cap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Flow-GRPO's Euler-Maruyama step of the marginal-preserving reverse SDE.

    With ``a = noise_level`` and ``dt = sigma_next - sigma < 0``::

        sigma_t = a * sqrt(sigma / (1 - sigma))
        mean    = x * (1 + sigma_t^2 * dt / (2 sigma)) + v * (1 + sigma_t^2 (1 - sigma) / (2 sigma)) * dt
        std     = sigma_t * sqrt(-dt)

    ``a = 0`` gives the Euler ODE step exactly.

    At ``sigma = 1`` the ratio ``sigma / (1 - sigma)`` is infinite. By default the denominator's
    sigma is replaced by ``sigma_next`` there, which is what Flow-GRPO's reference code does (it
    substitutes the schedule's second sigma, and the step leaving sigma = 1 is the first step, whose
    ``sigma_next`` is that second sigma). Passing ``sigma_cap`` (UniRL uses 0.99) instead clamps the
    denominator's sigma at ``sigma_cap`` everywhere.
    """
    x, v, s, s_next = _prepare_step(x, v, sigma, sigma_next, noise_level)
    c_x, c_v, std = flow_sde_coefficients(s, s_next, noise_level, sigma_cap=sigma_cap)
    return apply_step_coefficients(x, v, c_x, c_v), std


def cps_step(
    x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float = 0.8
) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving sampling (CPS), i.e. DDIM(eta) for flow matching.

    With ``eta = noise_level``, ``x0_hat = x - sigma v`` and ``x1_hat = x + (1 - sigma) v``::

        std  = sigma_next * sin(eta * pi / 2)
        mean = (1 - sigma_next) * x0_hat + sqrt(sigma_next^2 - std^2) * x1_hat

    (computed as ``sigma_next * |cos(eta pi / 2)|``, the same value without cancellation),
    so the next latent's data coefficient is exactly ``1 - sigma_next`` and its total noise
    level (deterministic part and fresh noise together) is exactly ``sigma_next``.
    ``eta = 0`` is the deterministic DDIM step, which coincides with the Euler ODE step.

    The coefficients are preserved for each sample's own (predicted) data and noise, not the
    marginal distribution: the fresh noise does not shrink with the step size, and the posterior
    spread of the data is not re-injected, so with eta > 0 the samples' covariance shrinks even
    with the exact velocity field (to about 0.6 of the data's for 2-D Gaussian data at eta = 0.8,
    whatever the number of steps; see ``tests/test_kernels.py``). Flow-SDE and Dance-SDE do
    reproduce the ODE's marginals.
    """
    x, v, s, s_next = _prepare_step(x, v, sigma, sigma_next, noise_level)
    c_x, c_v, std = cps_coefficients(s, s_next, noise_level)
    return apply_step_coefficients(x, v, c_x, c_v), _std_shaped(std, s, s_next)


def dance_sde_step(
    x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float = 0.3
) -> tuple[Tensor, Tensor]:
    """DanceGRPO's SDE step: constant diffusion ``eta`` with a score correction.

    With ``eta = noise_level``, ``dt = sigma_next - sigma`` and the score estimate
    ``score = -(x - (1 - sigma) * x0_hat) / sigma^2``::

        mean = x + (v - eta^2 / 2 * score) * dt
        std  = eta * sqrt(-dt)

    This is Euler-Maruyama on ``dx = (v - g^2/2 * score) dt + g dW`` with ``g = eta``, which
    preserves the ODE's marginals.
    """
    x, v, s, s_next = _prepare_step(x, v, sigma, sigma_next, noise_level)
    c_x, c_v, std = dance_sde_coefficients(s, s_next, noise_level)
    return apply_step_coefficients(x, v, c_x, c_v), std


class Kernel(NamedTuple):
    """A registered step kernel: the validated step function and its pure coefficient function."""

    step: Callable[..., tuple[Tensor, Tensor]]
    coefficients: Callable[..., StepCoefficients]


#: step kernels by name (``register_kernel`` adds one)
KERNELS: Registry[Kernel] = Registry("kernel")


def register_kernel(name: str, step: Callable[..., tuple[Tensor, Tensor]], coefficients: Callable[..., StepCoefficients]) -> Kernel:
    """Register a step kernel: ``step(x, v, sigma, sigma_next, noise_level) -> (mean, std)`` and
    ``coefficients(sigma, sigma_next, noise_level) -> (c_x, c_v, std)`` with ``mean = c_x x + c_v v``."""
    return KERNELS.register(name, Kernel(step, coefficients))


register_kernel("flow_sde", flow_sde_step, flow_sde_coefficients)
register_kernel("cps", cps_step, cps_coefficients)
register_kernel("dance_sde", dance_sde_step, dance_sde_coefficients)
register_kernel("ode", ode_step, ode_coefficients)


def get_kernel(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Return the step kernel registered as ``name`` (one of ``KERNELS``)."""
    return KERNELS.lookup(name).step


def get_kernel_coefficients(name: str) -> Callable[..., StepCoefficients]:
    """Return the coefficient function ``(sigma, sigma_next, noise_level) -> (c_x, c_v, std)`` of
    kernel ``name``: pure tensor maths, no validation (the step functions validate)."""
    return KERNELS.lookup(name).coefficients


def all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite, in one reduction and one device sync.

    ``max(|x|)`` is NaN when any element is NaN and inf when any is +-inf; on CPU this is ~10x
    faster than ``torch.isfinite(x).all()``.
    """
    return x.numel() == 0 or bool(torch.isfinite(x.detach().abs().amax()))


# --------------------------------------------------------------------------- densities
def _reduce(per_element: Tensor, reduce: str) -> Tensor:
    """Reduce over every non-batch dimension by ``mean`` or ``sum`` (``none`` keeps them)."""
    if reduce == "none":
        return per_element
    dims = tuple(range(1, per_element.dim()))
    if reduce == "mean":
        return per_element.mean(dim=dims) if dims else per_element
    if reduce == "sum":
        return per_element.sum(dim=dims) if dims else per_element
    raise ValueError(f"reduce must be one of 'mean', 'sum', 'none'; got {reduce!r}")


def _checked_std(std: Tensor | float, like: Tensor, name: str = "std") -> Tensor:
    std = torch.as_tensor(std, dtype=torch.float32, device=like.device)
    if not bool(((std > 0) & torch.isfinite(std)).all()):  # one reduction, one device sync
        raise ValueError(
            f"{name} must be finite and > 0 for a log-probability or KL; got a zero or invalid "
            "std (noise level 0 / an ODE step has no density: never train on deterministic steps)"
        )
    try:
        broadcast = torch.broadcast_shapes(std.shape, like.shape)
    except RuntimeError:
        broadcast = None
    # std must broadcast *to* the mean's shape: a std such as (B, 1, 1, 1) against a (B, D) mean
    # broadcasts to (B, 1, B, D) and would silently give per-element values of the wrong shape.
    if broadcast is None or tuple(broadcast) != tuple(like.shape):
        raise ValueError(
            f"{name} of shape {tuple(std.shape)} does not broadcast to the mean's shape "
            f"{tuple(like.shape)}; accepted: a float, a 0-d tensor, a per-sample (B, 1, ..., 1) "
            "tensor or any shape that broadcasts to the mean's"
        )
    return std


def _checked_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def gaussian_log_prob(
    x_next: Tensor,
    mean: Tensor,
    std: Tensor | float,
    reduce: Reduce = "mean",
    *,
    convention: Literal["exact", "cps_legacy"] = "exact",
) -> Tensor:
    """Log-density of ``x_next`` under ``N(mean, std^2 I)``, in float32, per batch element.

    ``convention="exact"`` (default)::

        log p = -(x_next - mean)^2 / (2 std^2) - log(std) - log(2 pi) / 2      per element

    ``convention="cps_legacy"`` reproduces the CPS reference code, which drops every constant
    including the ``1 / (2 std^2)`` factor: ``log p = -(x_next - mean)^2`` per element. That
    rescales log-ratios by ``2 std^2`` per step; use it only to reproduce published CPS runs.

    The per-element values are reduced over the non-batch dimensions by ``reduce``
    ("mean" by default, "sum" for the full-latent density, "none" to keep them).
    """
    _checked_pair(x_next, mean, "x_next", "mean")
    x_next = x_next.float()
    mean = mean.float()
    if convention == "cps_legacy":
        return _reduce(-((x_next - mean) ** 2), reduce)
    if convention != "exact":
        raise ValueError(f"convention must be 'exact' or 'cps_legacy'; got {convention!r}")
    return gaussian_log_prob_unchecked(x_next, mean, _checked_std(std, mean), reduce)


_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob_unchecked(x_next: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """``gaussian_log_prob`` (exact convention) without the checks, for callers that validated once.

    ``x_next`` and ``mean`` are float32 of one shape; ``std`` is a float32 tensor that is > 0 and
    broadcasts to it. With a per-sample std (0-d or ``(B, 1, ..., 1)``) the squared distance is
    reduced first and the std terms are applied per sample (``D`` = elements per sample)::

        mean: -mean((x_next - mean)^2) / (2 std^2) - log(std) - log(2 pi) / 2
        sum:  -sum((x_next - mean)^2) / (2 std^2) - D * (log(std) + log(2 pi) / 2)

    which is the per-element formula with fewer full-size operations; any other std shape (or
    ``reduce="none"``) uses the per-element formula.
    """
    per_sample_std = std.dim() == 0 or (std.dim() == mean.dim() and all(d == 1 for d in std.shape[1:]))
    if reduce == "none" or not per_sample_std or mean.dim() < 2:
        per_element = -(x_next - mean).square() / (2.0 * std**2) - torch.log(std) - _HALF_LOG_2PI
        return _reduce(per_element, reduce)
    std = std.reshape(-1) if std.dim() > 0 else std
    quadratic, constant = log_prob_coefficients(std, reduce, mean[0].numel())
    return isotropic_log_prob(x_next, mean, quadratic, constant, reduce)


def isotropic_log_prob(
    x_next: Tensor, mean: Tensor, quadratic: Tensor | float, constant: Tensor | float, reduce: Reduce = "mean"
) -> Tensor:
    """``reduce((x_next - mean)^2) * quadratic - constant`` per sample, with the terms of
    ``log_prob_coefficients`` (floats or per-sample tensors): the per-sample-std path of
    ``gaussian_log_prob_unchecked``, for a batch whose samples share one std."""
    return _reduce((x_next - mean).square(), reduce) * quadratic - constant


def log_prob_coefficients(std: Tensor, reduce: Reduce, numel: int) -> tuple[Tensor, Tensor]:
    """Per-sample terms of an isotropic Gaussian log-density: ``log p = r * quadratic - constant``
    with ``r`` the ``reduce``-reduced squared distance over ``numel`` elements, i.e.
    ``quadratic = -1 / (2 std^2)`` and ``constant = n * (log(std) + log(2 pi) / 2)``, ``n = 1`` for
    ``"mean"`` and ``numel`` for ``"sum"``."""
    count = 1.0 if reduce == "mean" else float(numel)
    return -0.5 / std.square(), count * (torch.log(std) + _HALF_LOG_2PI)


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor | float, reduce: Reduce = "mean") -> Tensor:
    """Exact ``KL(N(mean_p, std^2 I) || N(mean_q, std^2 I))`` for a shared isotropic std, float32.

    Per element ``(mean_p - mean_q)^2 / (2 std^2)``; symmetric in p and q, zero exactly when the
    means are equal. Reduced over the non-batch dimensions by ``reduce`` ("mean" is the
    per-dimension average that published thresholds use; "sum" is the full-latent KL).
    """
    _checked_pair(mean_p, mean_q, "mean_p", "mean_q")
    mean_p = mean_p.float()
    mean_q = mean_q.float()
    std = _checked_std(std, mean_p)
    return _reduce((mean_p - mean_q) ** 2 / (2.0 * std**2), reduce)


def flow_grpo_reference_kl(
    mean_p: Tensor,
    mean_q: Tensor,
    std: Tensor | float,
    sigma: Sigma,
    sigma_next: Sigma,
    reduce: Reduce = "mean",
) -> Tensor:
    """Flow-GRPO's KL-to-reference term, which omits ``dt`` from the denominator.

    Flow-GRPO divides ``||mean_p - mean_q||^2`` by ``2 sigma_t^2`` where ``std = sigma_t *
    sqrt(-dt)``; that equals the exact KL times ``|dt| = sigma - sigma_next``. Its published
    beta (0.004 for instance) is on this scale; the same penalty on the exact KL needs
    ``beta * |dt|``. Offered to reproduce published runs; ``gaussian_kl`` is the exact value.
    """
    exact = gaussian_kl(mean_p, mean_q, std, reduce="none")
    s = _as_sigma(sigma, exact, "sigma")
    s_next = _as_sigma(sigma_next, exact, "sigma_next")
    if bool((s_next >= s).any()):
        raise ValueError(f"sigma_next must be smaller than sigma; got sigma={sigma}, sigma_next={sigma_next}")
    return _reduce(exact * (s - s_next), reduce)
