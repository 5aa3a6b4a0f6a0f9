"""The classifier-free-guidance conditioning is built once per episode, and guidance is unchanged by it."""

from __future__ import annotations

import torch

from flowgym.registration import make_backend


def test_the_guidance_conditioning_is_built_once_per_conditioning_and_is_the_negative_then_the_prompts():
    backend = make_backend("digits")
    cond = backend.encode_prompts(["3", "1", "3", "4"])
    both = backend.guidance_conditioning(cond)
    assert backend.guidance_conditioning(cond) is both  # the same episode: reused, not rebuilt
    negative = backend.encode_prompts([backend.negative_prompt])
    for key in both.keys():
        torch.testing.assert_close(both.get(key)[:4], negative.get(key).expand(4, *negative.get(key).shape[1:]), rtol=0, atol=0)
        torch.testing.assert_close(both.get(key)[4:], cond.get(key), rtol=0, atol=0)
    other = backend.encode_prompts(["2", "2", "2", "2"])  # a new episode: a new object, rebuilt
    assert backend.guidance_conditioning(other) is not both
    assert torch.equal(backend.guidance_conditioning(other).get("label")[4:], other.get("label"))


def test_guided_velocity_is_the_two_branch_formula():
    backend = make_backend("digits")
    cond = backend.encode_prompts(["0", "1", "2"])
    x = torch.randn(3, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((3,), 0.6)
    negative = backend.encode_prompts([backend.negative_prompt]).expand(3)
    with torch.no_grad():
        v_neg, v_cond = backend._forward(x, sigma, negative), backend._forward(x, sigma, cond)
        for _ in range(2):  # the second call takes the cached conditioning
            guided = backend.velocity(x, sigma, cond, guidance_scale=3.0)
            torch.testing.assert_close(guided, v_neg + 3.0 * (v_cond - v_neg), rtol=1e-5, atol=1e-5)
