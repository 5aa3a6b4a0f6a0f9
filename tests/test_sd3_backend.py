"""SD3 backend on a tiny random-weight SD3 pipeline saved offline, plus the prompt loader."""

from __future__ import annotations

import pytest
import torch

from flowgym.backends.prompts import PROMPT_SETS, available_prompt_sets, load_prompts
from flowgym.backends.sd3 import SD3_LORA_TARGETS, ModelNotAvailableError, SD3Backend
from flowgym.schedules import static_shift_sigmas
from flowgym.testing.tiny_sd3 import TINY_SD3_CONFIG, save_tiny_sd3

RES = 32
SEQ = 16


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), seed=0))


@pytest.fixture(scope="session")
def tiny_sd3_no_t5(tmp_path_factory) -> str:
    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3_no_t5"), with_t5=False, seed=1))


def load(path: str, **kwargs) -> SD3Backend:
    kwargs = {"resolution": RES, "max_sequence_length": SEQ, "lora_rank": 4, "lora_alpha": 8, "device": "cpu", **kwargs}
    return SD3Backend.from_pretrained(path, **kwargs)


@pytest.fixture(scope="module")
def frozen(tiny_sd3) -> SD3Backend:
    return load(tiny_sd3, lora_rank=0)


def inputs(backend: SD3Backend, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *backend.latent_shape, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    prompts = ["a red cube", "two cats", "a red cube", 'a sign that says "HI"'][:batch]
    return x, sigma, backend.encode_prompts(prompts)


def perturb_lora(backend: SD3Backend, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(backend.transformer.named_parameters())
    with torch.no_grad():
        for name in backend.lora_parameter_names():
            params[name].add_(0.1 * torch.randn(params[name].shape, generator=g))


# ------------------------------------------------------------------------------ shapes and decode
@pytest.mark.parametrize("resolution", [16, 32, 48])
def test_latent_shape_follows_vae_and_transformer(tiny_sd3, resolution):
    backend = load(tiny_sd3, resolution=resolution, lora_rank=0)
    side = resolution // TINY_SD3_CONFIG["vae_scale_factor"]
    assert backend.vae_scale_factor == TINY_SD3_CONFIG["vae_scale_factor"]
    assert backend.latent_shape == (backend.transformer.config.in_channels, side, side)
    x = torch.randn(2, *backend.latent_shape)
    v = backend.velocity(x, torch.tensor([0.3, 0.9]), backend.encode_prompts(["a", "b"]))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_bad_resolution_is_rejected(tiny_sd3):
    with pytest.raises(ValueError, match="multiple of"):
        load(tiny_sd3, resolution=30)


def test_decode_size_range_and_formula(frozen):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(3, *frozen.latent_shape, generator=g) * 0.3
    with torch.no_grad():
        images = frozen.decode(latents)
        config = frozen.vae.config
        raw = frozen.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
    assert images.shape == (3, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))
    assert not torch.equal(images[0], images[1])


# ------------------------------------------------------------------------------ consistency with diffusers
@pytest.mark.parametrize("decode_batch_size", [None, 1, 2])
def test_decode_in_one_call_or_in_chunks_gives_the_same_images(tiny_sd3, frozen, decode_batch_size):
    latents = torch.randn(5, *frozen.latent_shape, generator=torch.Generator().manual_seed(4)) * 0.3
    backend = load(tiny_sd3, decode_batch_size=decode_batch_size)
    with torch.no_grad():
        torch.testing.assert_close(backend.decode(latents), frozen.decode(latents), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_a_bad_decode_batch_size_is_refused(tiny_sd3, bad):
    with pytest.raises(ValueError, match="decode_batch_size must be an integer >= 1, or null"):
        load(tiny_sd3, decode_batch_size=bad)


def test_encoding_matches_the_diffusers_pipeline(tiny_sd3, frozen):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    prompts = ["a red cube", 'a sign that says "HI"']
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=SEQ
    )
    cond = frozen.encode_prompts(prompts)
    assert cond["prompt_embeds"].shape == (2, 77 + SEQ, TINY_SD3_CONFIG["t5_d_model"])
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)


def test_euler_sampling_matches_the_diffusers_pipeline(tiny_sd3, frozen):
    """Timestep convention (1000 * sigma), schedule and decode agree with StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, *frozen.latent_shape, generator=g)
    common = dict(
        prompt="a red cube", height=RES, width=RES, num_inference_steps=3, guidance_scale=1.0,
        latents=x0.clone(), max_sequence_length=SEQ,
    )
    captured = {}

    def keep_latents(pipeline, step, timestep, callback_kwargs):
        captured["latents"] = callback_kwargs["latents"].clone()
        return callback_kwargs

    with torch.no_grad():
        ref_images = pipe(**common, output_type="pt", callback_on_step_end=keep_latents).images
        ref_latents = captured["latents"]
        sigmas = static_shift_sigmas(3, frozen.scheduler_shift)
        x, cond = x0.clone(), frozen.encode_prompts(["a red cube"])
        for k in range(3):
            v = frozen.velocity(x, sigmas[k], cond)
            x = x + v * (sigmas[k + 1] - sigmas[k])
        images = frozen.decode(x)
    torch.testing.assert_close(x, ref_latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(images, ref_images, rtol=1e-4, atol=1e-5)


def test_forward_passes_timestep_1000_sigma(frozen):
    seen = {}

    def hook(module, args, kwargs):
        seen["timestep"] = kwargs["timestep"].clone()

    handle = frozen.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        x, sigma, cond = inputs(frozen)
        frozen.velocity(x, sigma, cond)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["timestep"], sigma * 1000)


def test_cfg_in_one_batched_forward_equals_two_forwards(frozen):
    x, sigma, cond = inputs(frozen)
    scale = 4.5
    with torch.no_grad():
        guided = frozen.velocity(x, sigma, cond, guidance_scale=scale)
        negative = frozen.encode_prompts([frozen.negative_prompt] * x.shape[0])
        v_neg = frozen._forward(x, sigma, negative)
        v_cond = frozen._forward(x, sigma, cond)
    assert not torch.allclose(v_neg, v_cond)
    torch.testing.assert_close(guided, v_neg + scale * (v_cond - v_neg), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ prompt cache
def test_prompt_cache_encodes_each_distinct_prompt_once(tiny_sd3):
    backend = load(tiny_sd3, lora_rank=0)
    seen: dict[str, list[int]] = {"clip_l": [], "clip_g": [], "t5": []}
    hooks = [
        module.register_forward_hook(lambda m, a, o, key=key: seen[key].append(a[0].shape[0]))
        for key, module in (("clip_l", backend.text_encoder), ("clip_g", backend.text_encoder_2),
                            ("t5", backend.text_encoder_3))
    ]
    try:
        first = backend.encode_prompts(["a cat", "a dog", "a cat"])
        second = backend.encode_prompts(["a dog", "a bird", "a cat", "a bird"])
    finally:
        for h in hooks:
            h.remove()
    for key in seen:
        assert sum(seen[key]) == 3, (key, seen[key])  # cat, dog, bird: once each
    assert first.batch_size == torch.Size([3]) and second.batch_size == torch.Size([4])
    torch.testing.assert_close(first["prompt_embeds"][0], first["prompt_embeds"][2])
    torch.testing.assert_close(second["prompt_embeds"][2], first["prompt_embeds"][0])
    assert not torch.equal(first["prompt_embeds"][0], first["prompt_embeds"][1])


def test_freed_text_encoders_keep_cached_prompts(tiny_sd3):
    backend = load(tiny_sd3, lora_rank=0)
    cached = backend.encode_prompts(["a cat", ""])
    backend.free_text_encoders()
    assert backend.text_encoder is None
    torch.testing.assert_close(backend.encode_prompts(["", "a cat"])["pooled_prompt_embeds"],
                               cached["pooled_prompt_embeds"].flip(0))
    with pytest.raises(RuntimeError, match="freed"):
        backend.encode_prompts(["a new prompt"])


def test_without_t5_the_t5_tokens_are_zeros(tiny_sd3_no_t5):
    backend = load(tiny_sd3_no_t5, lora_rank=0)
    assert not backend.has_t5
    cond = backend.encode_prompts(["a cat", "a dog"])
    assert cond["prompt_embeds"].shape == (2, 77 + SEQ, backend.transformer.config.joint_attention_dim)
    assert torch.count_nonzero(cond["prompt_embeds"][:, 77:]) == 0
    assert torch.count_nonzero(cond["prompt_embeds"][:, :77]) > 0
    x, sigma, cond = inputs(backend)
    assert torch.isfinite(backend.velocity(x, sigma, cond, guidance_scale=2.0)).all()


def test_load_t5_false_skips_the_t5_encoder(tiny_sd3):
    backend = load(tiny_sd3, lora_rank=0, load_t5=False)
    assert backend.text_encoder_3 is None
    assert torch.count_nonzero(backend.encode_prompts(["a cat"])["prompt_embeds"][:, 77:]) == 0


# ------------------------------------------------------------------------------ LoRA and reference
def test_only_lora_parameters_require_grad(tiny_sd3):
    backend = load(tiny_sd3)
    trainable = [n for n, p in backend.named_parameters() if p.requires_grad]
    assert len(trainable) > 0
    assert all("lora_" in n and n.startswith("transformer.") for n in trainable)
    assert sorted(n.removeprefix("transformer.") for n in trainable) == sorted(backend.lora_parameter_names())
    assert sum(p.numel() for p in backend.trainable_parameters()) > 0
    assert all(p.dtype == torch.float32 for p in backend.trainable_parameters())
    targeted = {n.rsplit(".lora_", 1)[0].split(".", 2)[-1] for n in backend.lora_parameter_names()}
    assert targeted == set(SD3_LORA_TARGETS)  # every Flow-GRPO target, and attn2 untouched
    # gradients reach the adapters (lora_B starts at zero, so its gradient is the non-zero one)
    x, sigma, cond = inputs(backend)
    backend.velocity(x, sigma, cond).square().mean().backward()
    grads = [p.grad for p in backend.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in backend.named_parameters() if "lora_" not in n)


def test_reference_disables_adapters_and_reproduces_the_base_model(tiny_sd3, frozen):
    backend = load(tiny_sd3)
    x, sigma, cond = inputs(backend)
    with torch.no_grad():
        base = frozen.velocity(x, sigma, cond)
        torch.testing.assert_close(backend.velocity(x, sigma, cond), base)  # LoRA B starts at zero
        perturb_lora(backend)
        tuned = backend.velocity(x, sigma, cond)
        assert (tuned - base).abs().max() > 1e-3
        with backend.reference():
            assert torch.equal(backend.velocity(x, sigma, cond), base)
            with backend.reference():  # nesting is harmless
                assert torch.equal(backend.velocity(x, sigma, cond), base)
            assert torch.equal(backend.velocity(x, sigma, cond), base)
        assert torch.equal(backend.velocity(x, sigma, cond), tuned)
    assert all(p.requires_grad for p in backend.trainable_parameters())
    assert len(list(backend.trainable_parameters())) == len(backend.lora_parameter_names())


def test_full_finetune_uses_a_frozen_snapshot(tiny_sd3, frozen):
    backend = load(tiny_sd3, full_finetune=True)
    assert backend.lora_parameter_names() == []
    assert all(p.requires_grad for p in backend.transformer.parameters())
    x, sigma, cond = inputs(backend)
    with torch.no_grad():
        base = frozen.velocity(x, sigma, cond)
        for p in backend.transformer.parameters():
            p.add_(0.01)
        assert (backend.velocity(x, sigma, cond) - base).abs().max() > 1e-3
        with backend.reference():
            torch.testing.assert_close(backend.velocity(x, sigma, cond), base)


def test_trainable_state_dict_holds_only_lora_and_round_trips(tiny_sd3, tmp_path):
    from safetensors.torch import load_file, save_file

    backend = load(tiny_sd3)
    perturb_lora(backend)
    state = backend.trainable_state_dict()
    assert sorted(state) == sorted(backend.lora_parameter_names())
    save_file(state, str(tmp_path / "lora.safetensors"))
    other = load(tiny_sd3)
    x, sigma, cond = inputs(backend)
    with torch.no_grad():
        assert not torch.equal(other.velocity(x, sigma, cond), backend.velocity(x, sigma, cond))
        other.load_trainable_state_dict(load_file(str(tmp_path / "lora.safetensors")))
        assert torch.equal(other.velocity(x, sigma, cond), backend.velocity(x, sigma, cond))
    with pytest.raises(ValueError, match="unknown keys"):
        other.load_trainable_state_dict({**state, "not.a.lora.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing keys"):
        other.load_trainable_state_dict(dict(list(state.items())[1:]))


def test_lora_targets_that_match_nothing_are_rejected(tiny_sd3):
    with pytest.raises(ValueError, match="match no module"):
        load(tiny_sd3, lora_targets=["not_a_module"])


# ------------------------------------------------------------------------------ errors
def test_half_precision_on_cpu_is_rejected(tiny_sd3):
    with pytest.raises(ValueError, match="float32 on CPU"):
        load(tiny_sd3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        load(tiny_sd3, dtype="float8")
    assert load(tiny_sd3, dtype="fp32", lora_rank=0).dtype == torch.float32


def test_missing_local_folder_gives_a_short_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotAvailableError) as info:
        SD3Backend.from_pretrained(str(missing), device="cpu")
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message and "hf download" in message
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.__cause__ is None


def test_folder_without_the_components_is_explained(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelNotAvailableError, match="lacks .*vae"):
        SD3Backend.from_pretrained(str(tmp_path), device="cpu")


def test_unknown_hub_id_offline_gives_a_short_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        SD3Backend.from_pretrained("flowgym-tests/no-such-sd3-model", device="cpu")
    message = str(info.value)
    assert "flowgym-tests/no-such-sd3-model" in message and "offline" in message
    assert "hf download flowgym-tests/no-such-sd3-model" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert len(message) < 1000


# ------------------------------------------------------------------------------ prompts
def test_prompt_sets_of_the_backend(frozen):
    sets = frozen.prompt_sets()
    assert sets["train"] == list(PROMPT_SETS["pickscore_demo"])
    assert not set(sets["train"]) & set(sets["heldout"])
    assert set(available_prompt_sets()) <= set(sets)


def test_load_prompts_accepts_lists_files_and_named_sets(tmp_path):
    assert load_prompts(["a cat", "a dog"]) == ["a cat", "a dog"]
    file = tmp_path / "prompts.txt"
    file.write_text("a cat\n\n  a dog on a log  \n", encoding="utf-8")
    assert load_prompts(str(file)) == ["a cat", "a dog on a log"]
    assert load_prompts(file) == ["a cat", "a dog on a log"]
    for name in ("pickscore_demo", "geneval_demo", "ocr_demo", "pickscore_demo_eval"):
        prompts = load_prompts(name)
        assert len(prompts) >= 8 and prompts == list(PROMPT_SETS[name])
        assert len(set(prompts)) == len(prompts)
    assert all('"' in p for p in load_prompts("ocr_demo"))
    loaded = load_prompts("geneval_demo")
    loaded.append("mutated")
    assert "mutated" not in load_prompts("geneval_demo")


def test_load_prompts_errors_are_clear(tmp_path):
    with pytest.raises(ValueError) as info:
        load_prompts("no_such_set")
    for name in available_prompt_sets():
        assert name in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(empty))
    with pytest.raises(ValueError, match="non-empty strings"):
        load_prompts(["ok", 3])
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts([])
    with pytest.raises(ValueError, match="list of strings"):
        load_prompts(42)
