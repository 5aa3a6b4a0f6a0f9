"""FLUX.1 (``flux``, FlowDenoise-FLUX-v0) on the tiny random FluxPipelines (``tiny:flux``: dev-like with a
guidance embedding and dynamic shift; ``tiny:flux_schnell``: step-distilled, static shift 1), checked
against diffusers' own pipeline: encoding, packing, one transformer call, the Euler sampler, the
scheduler, decoding; LoRA and the reference policy; the env with every kernel; the trainer; errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import flowgym  # noqa: F401  (registers the ids)
from family_checks import (
    PROMPTS, RES, SEQ, check_algos_run, check_episode, check_errors, check_gym_make, check_lora_trains_and_reference,
    check_ode_matches_pipeline, check_schedule, inputs, load, perturb_lora, pipeline_sigmas,
)
from flowgym.backends.flux import FluxBackend
from flowgym.testing.tiny_pipelines import tiny_pipeline_path

MODEL = "tiny:flux"


def make_pipe(name: str):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(tiny_pipeline_path(name))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe():
    return make_pipe("flux")


@pytest.fixture(scope="module")
def frozen() -> FluxBackend:
    return load(FluxBackend, MODEL, lora_rank=0)


@pytest.fixture(scope="module")
def tuned() -> FluxBackend:
    backend = load(FluxBackend, MODEL)
    perturb_lora(backend)
    return backend


@pytest.fixture(scope="module")
def schnell() -> FluxBackend:
    return load(FluxBackend, "tiny:flux_schnell", lora_rank=0)


def test_geometry_and_guidance_modes(frozen, schnell):
    assert frozen.latent_shape == (4, 16, 16) and frozen.image_seq_len == 64
    assert frozen.guidance == "embedded" and schnell.guidance == "distilled"
    assert frozen.schedule.dynamic and not schnell.schedule.dynamic
    with pytest.raises(ValueError, match="multiple of 4"):
        load(FluxBackend, MODEL, resolution=30, lora_rank=0)
    x = torch.randn(2, *frozen.latent_shape)
    packed = frozen.pack(x)
    assert packed.shape == (2, 64, 16)
    torch.testing.assert_close(frozen.unpack(packed), x, rtol=0, atol=0)


def test_encoding_and_packing_equal_the_pipeline(frozen, pipe):
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=SEQ)
    cond = frozen.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, *frozen.latent_shape)
    torch.testing.assert_close(frozen.pack(x), pipe._pack_latents(x, 3, 4, 16, 16), rtol=0, atol=0)
    _, ids = pipe.prepare_latents(3, 4, RES, RES, torch.float32, "cpu", None, latents=frozen.pack(x))
    torch.testing.assert_close(frozen.image_ids("cpu", torch.float32), ids, rtol=0, atol=0)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_velocity_equals_the_pipelines_transformer_call(frozen, tuned, pipe, guidance_scale):
    x, sigma, cond = inputs(frozen)
    packed, image_ids = pipe.prepare_latents(3, 4, RES, RES, torch.float32, "cpu", None, latents=frozen.pack(x))
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=SEQ)
    timestep = (sigma * 1000).to(torch.float32)
    guidance = torch.full([1], guidance_scale, dtype=torch.float32).expand(3)  # the pipeline's guidance tensor
    with torch.no_grad():
        for backend, transformer in ((frozen, pipe.transformer), (tuned, tuned.transformer)):
            expected = transformer(hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
                                   pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                   img_ids=image_ids, return_dict=False)[0]
            ours = backend.velocity(x, sigma, cond, guidance_scale=guidance_scale)
            torch.testing.assert_close(backend.pack(ours), expected, rtol=1e-5, atol=1e-5)
        assert (tuned.velocity(x, sigma, cond) - frozen.velocity(x, sigma, cond)).abs().max() > 1e-3
        # the guidance embedding is used: another scale, another velocity (one forward, no negative prompt)
        assert (frozen.velocity(x, sigma, cond, guidance_scale=guidance_scale + 2.0) - frozen.velocity(
            x, sigma, cond, guidance_scale=guidance_scale)).abs().max() > 1e-4


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_ode_rollout_reproduces_the_pipelines_sampler(frozen, pipe, guidance_scale):
    check_ode_matches_pipeline(
        "flux", frozen, pipe, guidance_scale,
        to_pipeline_latents=frozen.pack,   # FluxPipeline takes and returns packed latents
        from_env_latents=frozen.pack,
        call_kwargs={"guidance_scale": guidance_scale},
    )


def test_schnell_ode_rollout_and_schedule(schnell):
    pipeline = make_pipe("flux_schnell")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scale is ignored, and said so once
        check_ode_matches_pipeline("flux", schnell, pipeline, 3.5, to_pipeline_latents=schnell.pack,
                                   from_env_latents=schnell.pack, call_kwargs={"guidance_scale": 3.5})
    x, sigma, cond = inputs(schnell)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(schnell.velocity(x, sigma, cond, guidance_scale=3.5), schnell.velocity(x, sigma, cond))
    # static shift 1.0: linspace sigmas, whatever the resolution
    torch.testing.assert_close(schnell.sigma_schedule(4), pipeline_sigmas(pipeline, RES, 4), rtol=0, atol=1e-7)
    torch.testing.assert_close(schnell.sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_decode_equals_the_pipelines_images(frozen, pipe):
    x = torch.randn(1, *frozen.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        images = pipe(prompt="a red cube", height=RES, width=RES, num_inference_steps=2, guidance_scale=3.5,
                      latents=frozen.pack(x), output_type="pt", max_sequence_length=SEQ).images
        sigmas, cond, y = frozen.sigma_schedule(2), frozen.encode_prompts(["a red cube"]), x.clone()
        for k in range(2):
            y = y + frozen.velocity(y, sigmas[k], cond, guidance_scale=3.5) * (sigmas[k + 1] - sigmas[k])
        ours = frozen.decode(y)
    assert ours.shape == (1, 3, RES, RES) and images.std() > 0
    torch.testing.assert_close(ours, images, rtol=1e-4, atol=1e-4)


def test_sigma_schedule_equals_the_pipelines_scheduler(pipe):
    check_schedule(FluxBackend, MODEL, pipe, {"guidance_scale": 3.5})


@pytest.mark.parametrize(("kernel", "guidance_scale"), [("flow_sde", 1.0), ("cps", 1.0), ("dance_sde", 1.0),
                                                          ("ode", 1.0), ("flow_sde", 3.5)])
def test_env_episode_with_every_kernel(tuned, kernel, guidance_scale):
    check_episode("flux", tuned, kernel, guidance_scale)


def test_lora_trains_and_the_reference_is_the_base_model(frozen):
    check_lora_trains_and_reference(FluxBackend, MODEL, frozen)


def test_gym_make():
    check_gym_make("FlowDenoise-FLUX-v0", MODEL, (4, 16, 16))


def test_loading_errors_are_one_clear_line(tmp_path, monkeypatch):
    check_errors(FluxBackend, tmp_path, monkeypatch, "flowgym-tests/no-such-flux-model")


def test_algos_run_two_iterations(tmp_path):
    check_algos_run("flux_tiny", tmp_path)
