"""FLUX.2-klein (``flux2_klein``, FlowDenoise-FLUX2Klein-v0) on the tiny random Flux2KleinPipeline
(``tiny:flux2_klein``), checked against diffusers' own pipeline: encoding, one transformer call, the
Euler sampler, the scheduler, decoding; LoRA and the reference policy; the env with every kernel;
the trainer end to end; loading errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import flowgym  # noqa: F401  (registers the ids)
from family_checks import (
    PROMPTS, RES, SEQ, check_algos_run, check_episode, check_errors, check_gym_make, check_lora_trains_and_reference,
    check_ode_matches_pipeline, check_schedule, inputs, load, perturb_lora,
)
from flowgym.backends.flux2_klein import Flux2KleinBackend, empirical_mu
from flowgym.testing.tiny_pipelines import tiny_pipeline_path

MODEL = "tiny:flux2_klein"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline.from_pretrained(tiny_pipeline_path("flux2_klein"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def frozen() -> Flux2KleinBackend:
    return load(Flux2KleinBackend, MODEL, lora_rank=0)


@pytest.fixture(scope="module")
def tuned() -> Flux2KleinBackend:
    backend = load(Flux2KleinBackend, MODEL)
    perturb_lora(backend)
    return backend


def test_geometry_and_declarations(frozen):
    # (in_channels = 4 VAE channels x 2 x 2, 32 / (2 x 2), same): one token per latent position
    assert frozen.latent_shape == (16, 8, 8) and frozen.image_seq_len == 64
    assert frozen.guidance == "cfg" and frozen.schedule.dynamic
    with pytest.raises(ValueError, match="multiple of 4"):
        load(Flux2KleinBackend, MODEL, resolution=30, lora_rank=0)
    assert Flux2KleinBackend.env_id == "FlowDenoise-FLUX2Klein-v0"
    # flowgym's own FLUX.2 mu equals the pipeline's, on both sides of its 4300-token switch
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for n, k in ((64, 3), (1024, 10), (4096, 50), (5000, 28)):
        assert empirical_mu(n, k) == pytest.approx(compute_empirical_mu(n, k), rel=1e-12)


def test_encoding_equals_the_pipeline(frozen, pipe):
    embeds, text_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=SEQ)
    cond = frozen.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (3, SEQ, 48)  # hidden states 9, 18, 27 of a 16-wide Qwen3
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(frozen.text_ids(SEQ, "cpu"), text_ids[0])


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_velocity_equals_the_pipelines_transformer_call(frozen, tuned, pipe, guidance_scale):
    x, sigma, cond = inputs(frozen)
    packed, latent_ids = pipe.prepare_latents(3, 4, RES, RES, torch.float32, "cpu", None, latents=x.clone())
    embeds, text_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=SEQ)
    negative, negative_ids = pipe.encode_prompt([""] * 3, device="cpu", max_sequence_length=SEQ)
    timestep = (sigma * 1000).to(torch.float32)  # the scheduler's timesteps; the pipeline passes t / 1000

    def call(transformer, prompt_embeds, ids):
        return transformer(hidden_states=packed, timestep=timestep / 1000, guidance=None, encoder_hidden_states=prompt_embeds,
                           txt_ids=ids, img_ids=latent_ids, return_dict=False)[0]

    with torch.no_grad():
        for backend, transformer in ((frozen, pipe.transformer), (tuned, tuned.transformer)):
            expected = call(transformer, embeds, text_ids)
            if guidance_scale != 1.0:
                v_neg = call(transformer, negative, negative_ids)
                expected = v_neg + guidance_scale * (expected - v_neg)
            ours = backend.velocity(x, sigma, cond, guidance_scale=guidance_scale)
            assert ours.shape == x.shape
            torch.testing.assert_close(backend.pack(ours), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(backend.unpack(backend.pack(x)), x, rtol=0, atol=0)
        assert (tuned.velocity(x, sigma, cond) - frozen.velocity(x, sigma, cond)).abs().max() > 1e-3


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_ode_rollout_reproduces_the_pipelines_sampler(frozen, pipe, guidance_scale):
    check_ode_matches_pipeline(
        "flux2_klein", frozen, pipe, guidance_scale,
        to_pipeline_latents=lambda x: x,                 # the pipeline takes patchified (B, 4C, h, w) latents
        from_env_latents=frozen.vae_latents,             # it returns them de-normalised and unpatchified
        call_kwargs={"guidance_scale": guidance_scale},
    )


def test_decode_equals_the_pipelines_images(frozen, pipe):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, *frozen.latent_shape, generator=g)
    with torch.no_grad():
        images = pipe(prompt="a red cube", height=RES, width=RES, num_inference_steps=2, guidance_scale=1.0,
                      latents=x.clone(), output_type="pt", max_sequence_length=SEQ).images
        sigmas, cond, y = frozen.sigma_schedule(2), frozen.encode_prompts(["a red cube"]), x.clone()
        for k in range(2):
            y = y + frozen.velocity(y, sigmas[k], cond) * (sigmas[k + 1] - sigmas[k])
        ours = frozen.decode(y)
    assert ours.shape == (1, 3, RES, RES) and images.std() > 0
    torch.testing.assert_close(ours, images, rtol=1e-4, atol=1e-4)
    # the batch-norm statistics are not the identity: de-normalising matters
    assert not torch.allclose(frozen.vae.bn.running_mean, torch.zeros_like(frozen.vae.bn.running_mean))


def test_sigma_schedule_equals_the_pipelines_scheduler(pipe):
    check_schedule(Flux2KleinBackend, MODEL, pipe, {"guidance_scale": 1.0})


@pytest.mark.parametrize(("kernel", "guidance_scale"), [("flow_sde", 1.0), ("cps", 1.0), ("dance_sde", 1.0),
                                                          ("ode", 1.0), ("flow_sde", 3.0)])
def test_env_episode_with_every_kernel(tuned, kernel, guidance_scale):
    check_episode("flux2_klein", tuned, kernel, guidance_scale)


def test_lora_trains_and_the_reference_is_the_base_model(frozen):
    check_lora_trains_and_reference(Flux2KleinBackend, MODEL, frozen)


def test_lora_targets_cover_both_block_kinds(tuned):
    names = tuned.lora_parameter_names()
    assert any(n.startswith("transformer_blocks.") and ".attn.add_q_proj." in n for n in names)
    assert any(n.startswith("single_transformer_blocks.") and ".attn.to_qkv_mlp_proj." in n for n in names)


def test_distilled_model_ignores_guidance():
    backend = load(Flux2KleinBackend, "tiny:flux2_klein_distilled", lora_rank=0)
    assert backend.guidance == "distilled"
    x, sigma, cond = inputs(backend)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guided = backend.velocity(x, sigma, cond, guidance_scale=4.0)
    assert any("ignored" in str(w.message) for w in caught)
    with torch.no_grad():
        assert torch.equal(guided, backend.velocity(x, sigma, cond))


def test_gym_make():
    check_gym_make("FlowDenoise-FLUX2Klein-v0", MODEL, (16, 8, 8))


def test_loading_errors_are_one_clear_line(tmp_path, monkeypatch):
    check_errors(Flux2KleinBackend, tmp_path, monkeypatch, "flowgym-tests/no-such-flux2-klein")


def test_algos_run_two_iterations(tmp_path):
    check_algos_run("flux2_klein_tiny", tmp_path)
