"""Sigma schedules for K denoising steps, built on diffusers' ``FlowMatchEulerDiscreteScheduler``.

A schedule is a float32 tensor of K + 1 decreasing sigmas ``s_0 = 1 > s_1 > ... > s_K = 0``;
step k goes from ``s_k`` to ``s_{k+1}``. The environment reads sigmas from this tensor directly
instead of calling the scheduler's stateful ``step()``, so batch members may sit at different steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

__all__ = ["static_shift_sigmas", "dynamic_shift_sigmas", "flux_mu", "make_sigmas"]


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")


def static_shift_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD3 / SD3.5 schedule: diffusers' static shift ``s -> shift s / (1 + (shift - 1) s)``.

    diffusers applies the shift when the scheduler is built and again inside ``set_timesteps``
    and appends a final 0; this returns exactly what an SD3 pipeline samples with.
    SD3.5-medium uses ``shift=3.0``.
    """
    _check_steps(num_steps)
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite positive number; got {shift!r}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift))
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.to(torch.float32).clone()


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift exponent: linear in the image token count."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def dynamic_shift_sigmas(num_steps: int, image_seq_len: int, **mu_kwargs: float) -> torch.Tensor:
    """FLUX schedule: diffusers' dynamic (exponential time-shift) schedule for a resolution.

    ``image_seq_len`` is the number of latent tokens (``(H / 16) * (W / 16)`` for FLUX);
    ``mu_kwargs`` override FLUX's ``base_seq_len, max_seq_len, base_shift, max_shift``.
    """
    _check_steps(num_steps)
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1; got {image_seq_len}")
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=flux_mu(image_seq_len, **mu_kwargs))
    return scheduler.sigmas.to(torch.float32).clone()


def make_sigmas(num_steps: int, shift: float | str = 3.0, image_seq_len: int | None = None) -> torch.Tensor:
    """Schedule by name: a number is a static shift; ``"dynamic"`` needs ``image_seq_len``."""
    if shift == "dynamic":
        if image_seq_len is None:
            raise ValueError("shift='dynamic' needs image_seq_len (the number of latent tokens)")
        return dynamic_shift_sigmas(num_steps, image_seq_len)
    if isinstance(shift, str):
        raise ValueError(
            f"shift must be a positive number, 'dynamic' or 'model' (the model's own scheduler, in an env); got {shift!r}"
        )
    if not math.isfinite(shift):
        raise ValueError(f"shift must be finite; got {shift}")
    return static_shift_sigmas(num_steps, shift)
