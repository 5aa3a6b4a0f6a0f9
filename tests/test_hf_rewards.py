"""transformers reward models (CLIP score, PickScore, aesthetic) on tiny random models saved offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowgym.backends.sd3 import ModelNotAvailableError
from flowgym.rewards import available_rewards, make_reward
from flowgym.rewards.hf import AestheticHead, CLIPImageTransform, cosine_scores, load_aesthetic_head
from flowgym.testing.tiny_rewards import TINY_CLIP_PROJECTION, save_tiny_aesthetic_head, save_tiny_clip

PROMPTS = ["a red cube", "two cats on a sofa", 'a sign that says "HI"']


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0))


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory) -> str:
    return str(save_tiny_aesthetic_head(tmp_path_factory.mktemp("tiny_head") / "head.safetensors", seed=0))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def reference_embeddings(model_dir: str, images: torch.Tensor, prompts: list[str]):
    """Image / text embeddings straight from transformers, with the processor's own preprocessing."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    arrays = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images]
    pixels = processor(images=arrays, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    return model, image, text


def test_rewards_are_registered():
    assert {"clip_score", "pickscore", "aesthetic"} <= set(available_rewards())


def test_clip_score_matches_transformers(tiny_clip, images):
    reward = make_reward("clip_score", model=tiny_clip, device="cpu")
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert (scores.abs() <= 1).all() and scores.std() > 0
    _, image, text = reference_embeddings(tiny_clip, images, PROMPTS)
    # the torch resize differs slightly from PIL's; the cosine barely moves
    torch.testing.assert_close(scores, cosine_scores(image, text), atol=5e-3, rtol=0)
    scaled = make_reward("clip_score", model=tiny_clip, device="cpu", scale=2.5)(images, PROMPTS)
    torch.testing.assert_close(scaled, 2.5 * scores)


def test_image_transform_equals_the_processor_without_resizing(tiny_clip):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny_clip)
    transform = CLIPImageTransform.from_config(processor.to_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1)).float() / 255
    arrays = [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images]
    expected = processor(images=arrays, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(transform(images), expected, atol=1e-5, rtol=1e-5)
    # shortest side to `size`, then centre crop
    assert transform(torch.rand(1, 3, 64, 96)).shape == (1, 3, 32, 32)


def test_pickscore_is_temperature_times_cosine_over_26(tiny_clip, images):
    pick = make_reward("pickscore", model=tiny_clip, processor=tiny_clip, device="cpu")
    clip = make_reward("clip_score", model=tiny_clip, device="cpu")
    scores = pick(images, PROMPTS)
    temperature = pick.model.logit_scale.exp().item()
    assert temperature == pytest.approx(100.0, rel=1e-3)
    torch.testing.assert_close(scores, temperature * clip(images, PROMPTS) / 26)
    # the prompt matters
    assert not torch.allclose(pick(images, PROMPTS), pick(images, PROMPTS[::-1]))


def test_grey_images_are_repeated_to_rgb(tiny_clip):
    reward = make_reward("clip_score", model=tiny_clip, device="cpu")
    grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(reward(grey, PROMPTS[:2]), reward(grey.repeat(1, 3, 1, 1), PROMPTS[:2]))
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(grey, PROMPTS)
    with pytest.raises(ValueError, match="shape"):
        reward(torch.rand(2, 4, 32, 32), PROMPTS[:2])


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(tiny_clip, tiny_head, images):
    reward = make_reward("aesthetic", model=tiny_clip, head=tiny_head, device="cpu")
    scores = reward(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.std() > 0
    head = load_aesthetic_head(tiny_head)
    with torch.no_grad():
        expected = head(F.normalize(reward.image_embeds(images), dim=-1))
    torch.testing.assert_close(scores, expected)
    # prompts are ignored
    torch.testing.assert_close(reward(images, ["x"] * 3), scores)


def test_aesthetic_head_from_pth_and_folder(tiny_clip, tiny_head, tmp_path, images):
    from safetensors.torch import load_file

    state = load_file(tiny_head)
    torch.save(state, tmp_path / "head.pth")
    from_pth = make_reward("aesthetic", model=tiny_clip, head=str(tmp_path / "head.pth"), device="cpu")
    from_folder = make_reward("aesthetic", model=tiny_clip, head=str(save_tiny_aesthetic_head(tmp_path / "dir")),
                              device="cpu")
    reference = make_reward("aesthetic", model=tiny_clip, head=tiny_head, device="cpu")
    torch.testing.assert_close(from_pth(images, PROMPTS), reference(images, PROMPTS))
    torch.testing.assert_close(from_folder(images, PROMPTS), reference(images, PROMPTS))


def test_public_aesthetic_head_layout_round_trips():
    head = AestheticHead.public(768)
    state = head.state_dict()
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    rebuilt = AestheticHead.from_state_dict(state).eval()
    x = torch.randn(5, 768)
    torch.testing.assert_close(rebuilt(x), head.eval()(x))
    assert rebuilt(x).shape == (5,)
    with pytest.raises(ValueError, match="chain"):
        AestheticHead.from_state_dict({**state, "layers.2.weight": torch.zeros(128, 10)})


def test_aesthetic_head_embedding_width_is_checked(tiny_clip, tmp_path):
    wrong = save_tiny_aesthetic_head(tmp_path / "wrong.safetensors", embed_dim=TINY_CLIP_PROJECTION + 1)
    with pytest.raises(ValueError, match="embeddings"):
        make_reward("aesthetic", model=tiny_clip, head=str(wrong), device="cpu")
    with pytest.raises(ValueError, match="needs head="):
        make_reward("aesthetic", model=tiny_clip, device="cpu")


def test_missing_reward_models_give_short_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        make_reward("pickscore", device="cpu")
    message = str(info.value)
    assert "offline" in message and "hf download" in message and info.value.__cause__ is None
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message or "yuvalkirstain/PickScore_v1" in message
    with pytest.raises(ModelNotAvailableError, match="flowgym-tests/no-such-clip"):
        make_reward("clip_score", model="flowgym-tests/no-such-clip", device="cpu")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        make_reward("clip_score", model=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        make_reward("aesthetic", head=str(tmp_path / "missing.pth"), device="cpu")
