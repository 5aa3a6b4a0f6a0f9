"""Qwen-Image (``qwen_image``, FlowDenoise-QwenImage-v0) on the tiny random QwenImagePipeline
(``tiny:qwen_image``), checked against diffusers' own pipeline: the templated Qwen2.5-VL encoding with
its drop index, packing, one transformer call with the text mask, true CFG with the norm rescaling,
the Euler sampler, the scheduler (dynamic shift with shift_terminal), decoding with latents_mean /
latents_std; LoRA and the reference policy; the env with every kernel; the trainer; errors."""

from __future__ import annotations

import pytest
import torch

import flowgym  # noqa: F401  (registers the ids)
from family_checks import (
    PROMPTS, RES, SEQ, check_algos_run, check_episode, check_errors, check_gym_make, check_lora_trains_and_reference,
    check_ode_matches_pipeline, check_schedule, inputs, load, perturb_lora,
)
from flowgym.backends.qwen_image import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, QwenImageBackend
from flowgym.testing.tiny_pipelines import tiny_pipeline_path

MODEL = "tiny:qwen_image"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import QwenImagePipeline

    pipeline = QwenImagePipeline.from_pretrained(tiny_pipeline_path("qwen_image"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def frozen() -> QwenImageBackend:
    return load(QwenImageBackend, MODEL, lora_rank=0)


@pytest.fixture(scope="module")
def tuned() -> QwenImageBackend:
    backend = load(QwenImageBackend, MODEL)
    perturb_lora(backend)
    return backend


def test_geometry_template_and_declarations(frozen, pipe):
    assert frozen.vae_scale_factor == 2 and frozen.latent_shape == (4, 16, 16) and frozen.image_seq_len == 64
    assert frozen.guidance == "cfg" and frozen.negative_prompt == " "
    assert frozen.schedule.dynamic and frozen.schedule.config["shift_terminal"] == 0.02
    assert (PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    # the tiny tokenizer splits the template like the real one: the 34 dropped tokens end at the user turn
    ids = pipe.tokenizer(PROMPT_TEMPLATE.format("two cats"), return_tensors="pt").input_ids[0]
    assert pipe.tokenizer.decode(ids[PROMPT_TEMPLATE_DROP:]).startswith("two cats<|im_end|>")
    with pytest.raises(ValueError, match="multiple of 4"):
        load(QwenImageBackend, MODEL, resolution=30, lora_rank=0)


def test_encoding_equals_the_pipeline(frozen, pipe):
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=SEQ)
    cond = frozen.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (3, SEQ, 16) and mask is not None  # prompts of different lengths
    length = embeds.shape[1]
    torch.testing.assert_close(cond["prompt_embeds"][:, :length], embeds, rtol=1e-6, atol=1e-6)
    assert torch.equal(cond["prompt_embeds_mask"][:, :length], mask)
    assert not cond["prompt_embeds"][:, length:].any() and not cond["prompt_embeds_mask"][:, length:].any()
    # a prompt cached alone is the same row as in a batch (the cache pads every prompt to max_sequence_length)
    alone = frozen.encode_prompts(["two cats"])
    frozen.clear_prompt_cache()
    torch.testing.assert_close(alone["prompt_embeds"][0], cond["prompt_embeds"][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_velocity_equals_the_pipelines_transformer_call(frozen, tuned, pipe, guidance_scale):
    x, sigma, cond = inputs(frozen)
    packed = pipe._pack_latents(x.clone(), 3, 4, 16, 16)
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=SEQ)
    negative, negative_mask = pipe.encode_prompt([" "] * 3, device="cpu", max_sequence_length=SEQ)
    img_shapes = [[(1, 8, 8)]] * 3
    timestep = (sigma * 1000).to(torch.float32)

    def call(transformer, prompt_embeds, prompt_mask):
        return transformer(hidden_states=packed, timestep=timestep / 1000, guidance=None,
                           encoder_hidden_states_mask=prompt_mask, encoder_hidden_states=prompt_embeds,
                           img_shapes=img_shapes, return_dict=False)[0]

    with torch.no_grad():
        for backend, transformer in ((frozen, pipe.transformer), (tuned, tuned.transformer)):
            expected = call(transformer, embeds, mask)
            if guidance_scale != 1.0:  # the pipeline's true CFG and its norm rescaling
                v_neg = call(transformer, negative, negative_mask)
                combined = v_neg + guidance_scale * (expected - v_neg)
                expected = combined * (torch.norm(expected, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
            ours = backend.velocity(x, sigma, cond, guidance_scale=guidance_scale)
            torch.testing.assert_close(backend.pack(ours), expected, rtol=1e-5, atol=1e-5)
        assert (tuned.velocity(x, sigma, cond) - frozen.velocity(x, sigma, cond)).abs().max() > 1e-3


def test_norm_rescaled_cfg_differs_from_plain_cfg(frozen):
    x, sigma, cond = inputs(frozen)
    with torch.no_grad():
        v_cond = frozen._forward(x, sigma, cond)
        v_neg = frozen._forward(x, sigma, frozen.encode_prompts([" "] * 3))
        guided = frozen.velocity(x, sigma, cond, guidance_scale=4.0)
    plain = v_neg + 4.0 * (v_cond - v_neg)
    assert (guided - plain).abs().max() > 1e-3
    # per packed token, the guided velocity has the conditional one's norm
    torch.testing.assert_close(frozen.pack(guided).norm(dim=-1), frozen.pack(v_cond).norm(dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_ode_rollout_reproduces_the_pipelines_sampler(frozen, pipe, guidance_scale):
    check_ode_matches_pipeline(
        "qwen_image", frozen, pipe, guidance_scale,
        to_pipeline_latents=frozen.pack,    # QwenImagePipeline takes and returns packed latents
        from_env_latents=frozen.pack,
        call_kwargs={"true_cfg_scale": guidance_scale, "negative_prompt": [" "] * 4} if guidance_scale > 1 else {},
    )


def test_decode_equals_the_pipelines_images(frozen, pipe):
    x = torch.randn(1, *frozen.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        images = pipe(prompt="a red cube", height=RES, width=RES, num_inference_steps=2, latents=frozen.pack(x),
                      output_type="pt", max_sequence_length=SEQ).images
        sigmas, cond, y = frozen.sigma_schedule(2), frozen.encode_prompts(["a red cube"]), x.clone()
        for k in range(2):
            y = y + frozen.velocity(y, sigmas[k], cond) * (sigmas[k + 1] - sigmas[k])
        ours = frozen.decode(y)
    assert ours.shape == (1, 3, RES, RES) and images.std() > 0
    torch.testing.assert_close(ours, images, rtol=1e-4, atol=1e-4)


def test_sigma_schedule_equals_the_pipelines_scheduler(pipe):
    check_schedule(QwenImageBackend, MODEL, pipe, {})


@pytest.mark.parametrize(("kernel", "guidance_scale"), [("flow_sde", 1.0), ("cps", 1.0), ("dance_sde", 1.0),
                                                          ("ode", 1.0), ("flow_sde", 4.0)])
def test_env_episode_with_every_kernel(tuned, kernel, guidance_scale):
    check_episode("qwen_image", tuned, kernel, guidance_scale)


def test_lora_trains_and_the_reference_is_the_base_model(frozen):
    check_lora_trains_and_reference(QwenImageBackend, MODEL, frozen)


def test_gym_make():
    check_gym_make("FlowDenoise-QwenImage-v0", MODEL, (4, 16, 16))


def test_loading_errors_are_one_clear_line(tmp_path, monkeypatch):
    check_errors(QwenImageBackend, tmp_path, monkeypatch, "flowgym-tests/no-such-qwen-image")


def test_algos_run_two_iterations(tmp_path):
    check_algos_run("qwen_image_tiny", tmp_path)
