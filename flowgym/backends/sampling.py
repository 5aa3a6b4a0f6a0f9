"""The deterministic sampler every embedded family evaluates its pretraining with."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from flowgym.backends.base import FlowBackend
from flowgym.kernels import ode_step
from flowgym.schedules import static_shift_sigmas

__all__ = ["sample_ode"]


@torch.no_grad()
def sample_ode(
    backend: FlowBackend,
    prompts: Sequence[str],
    num_steps: int = 10,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """Images ``(B, C, H, W)`` in [0, 1] for ``prompts``: the Euler ODE on ``static_shift_sigmas``
    from standard normal noise drawn with ``generator`` (on the CPU), ``batch_size`` prompts at a time."""
    sigmas = static_shift_sigmas(num_steps, shift)
    prompts = list(prompts)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond = backend.encode_prompts(chunk)
        x = torch.randn((len(chunk), *backend.latent_shape), generator=generator).to(backend.device)
        for k in range(num_steps):
            v = backend.velocity(x, sigmas[k], cond, guidance_scale=guidance_scale)
            x, _ = ode_step(x, v, float(sigmas[k]), float(sigmas[k + 1]))
        out.append(backend.decode(x))
    return torch.cat(out)
