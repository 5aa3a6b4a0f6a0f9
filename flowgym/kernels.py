"""Per-step Gaussian policies of the denoising MDP, their log-probabilities and exact KL.

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
from typing import Callable, Literal, Union

import torch
from torch import Tensor

Sigma = Union[float, Tensor]
Reduce = Literal["mean", "sum", "none"]

__all__ = [
    "flow_sde_step",
    "cps_step",
    "dance_sde_step",
    "ode_step",
    "gaussian_log_prob",
    "gaussian_kl",
    "flow_grpo_reference_kl",
    "KERNELS",
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
def ode_step(
    x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Deterministic Euler step: ``mean = x + v * (sigma_next - sigma)``, ``std = 0``.

    ``noise_level`` is accepted for a uniform signature and ignored.
    """
    x, v, s, s_next = _prepare_step(x, v, sigma, sigma_next, float(noise_level))
    return x + v * (s_next - s), _std_shaped(torch.zeros_like(s), s, s_next)


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
    dt = s_next - s
    if sigma_cap is not None:
        if not 0.0 < sigma_cap < 1.0:
            raise ValueError(f"sigma_cap must lie in (0, 1); got {sigma_cap}")
        s_denominator = s.clamp(max=sigma_cap)
    else:
        s_denominator = torch.where(s >= 1.0, s_next, s)
    sigma_t = noise_level * torch.sqrt(s / (1.0 - s_denominator))
    sigma_t_sq = sigma_t**2
    mean = x * (1.0 + sigma_t_sq * dt / (2.0 * s)) + v * (1.0 + sigma_t_sq * (1.0 - s) / (2.0 * s)) * dt
    std = sigma_t * torch.sqrt(-dt)
    return mean, std


def cps_step(
    x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, noise_level: float = 0.8
) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving sampling (CPS), i.e. DDIM(eta) for flow matching.

    With ``eta = noise_level``::

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
    std = s_next * math.sin(noise_level * math.pi / 2.0)
    x0_hat = x - s * v
    x1_hat = x + (1.0 - s) * v
    # sqrt(sigma_next^2 - std^2) = sigma_next * |cos(eta pi / 2)|, written without the float32
    # cancellation of the difference (which costs ~sqrt(eps) * sigma_next as eta -> 1).
    noise_coefficient = s_next * abs(math.cos(noise_level * math.pi / 2.0))
    mean = (1.0 - s_next) * x0_hat + noise_coefficient * x1_hat
    return mean, _std_shaped(std, s, s_next)


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
    dt = s_next - s
    x0_hat = x - s * v
    score = -(x - (1.0 - s) * x0_hat) / s**2
    mean = x + (v - 0.5 * noise_level**2 * score) * dt
    std = noise_level * torch.sqrt(-dt)
    return mean, std


KERNELS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "flow_sde": flow_sde_step,
    "cps": cps_step,
    "dance_sde": dance_sde_step,
    "ode": ode_step,
}


def get_kernel(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """Return the step kernel registered as ``name`` (one of ``KERNELS``)."""
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; accepted: {sorted(KERNELS)}") from None


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
    std = _checked_std(std, mean)
    per_element = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - 0.5 * math.log(2.0 * math.pi)
    return _reduce(per_element, reduce)


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
