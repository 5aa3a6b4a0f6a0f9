"""A Flow-GRPO-style sampling loop, written from the published Flow-SDE formulas (``docs/maths.md#flow-sde``),
as the comparison point of ``iteration_overhead.py``.

What Flow-GRPO's ``pipeline_with_logprob`` does per step, on any flowgym backend: one velocity
forward (with classifier-free guidance, the negative + positive conditioning concatenated once before
the loop, as their pipeline does), then ``sde_step_with_logprob``::

    sigma_t = a * sqrt(s / (1 - s))            (s = 1 replaced by the schedule's second sigma)
    mu      = x (1 + sigma_t^2 dt / (2 s)) + v (1 + sigma_t^2 (1 - s) / (2 s)) dt
    x'      = mu + sigma_t sqrt(-dt) eps
    log p   = mean over dims of the Gaussian log-density of x' under N(mu, (sigma_t sqrt(-dt))^2)

the latents and log-probs appended to lists, and a device synchronisation per step (their loop reads
values back to the host each step). Then the VAE decode and the reward. Stochastic steps are all but
the last (the last is a plain Euler step, as with ``stochastic_steps="all_but_last"``).
"""

from __future__ import annotations

import math

import torch

from timing import sync


def flow_grpo_rollout(env, noise_level: float, guidance_scale: float, generator: torch.Generator) -> tuple[list, list]:
    """One batched episode of ``env``'s backend at ``env``'s schedule the Flow-GRPO way; returns the
    latents (K + 1 of them) and the K - 1 log-probs."""
    backend, sigmas = env.backend, env.sigmas
    state = env.start_episode()
    cond = state.conditioning
    if guidance_scale != 1.0:
        both = backend.guidance_conditioning(cond)  # built once, before the loop
    x = state.latent.float()
    B, K = x.shape[0], env.num_steps
    latents, log_probs = [x], []
    with torch.no_grad():
        for k in range(K):
            s, s_next = sigmas[k], sigmas[k + 1]
            dt = s_next - s
            if guidance_scale != 1.0:
                out = backend._forward(torch.cat([x, x]), s.expand(2 * B), both)
                v_neg, v_cond = out.chunk(2)
                v = v_neg + guidance_scale * (v_cond - v_neg)
            else:
                v = backend._forward(x, s.expand(B), cond)
            v = v.float()
            if k == K - 1:  # the last step: Euler, no noise
                x = x + v * dt
            else:
                denominator = sigmas[1] if float(s) >= 1.0 else s
                sigma_t = noise_level * torch.sqrt(s / (1 - denominator))
                mean = x * (1 + sigma_t**2 / (2 * s) * dt) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
                std = sigma_t * torch.sqrt(-dt)
                eps = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
                x = mean + std * eps
                log_prob = (-((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi)))
                log_probs.append(log_prob.mean(dim=tuple(range(1, x.dim()))))
            latents.append(x)
            sync(x.device)  # their loop reads back to the host every step
        images = backend.decode(x)
        env.rewards(images, state.prompts)
    return latents, log_probs
