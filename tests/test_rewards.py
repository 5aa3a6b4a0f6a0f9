"""Built-in rewards: digit alignment, ink, JPEG (in)compressibility, the registry and composition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowgym.backends.digits import digit_prompt, digit_split
from flowgym.rewards import Reward, RewardComposer, available_rewards, make_reward
from flowgym.rewards.image import jpeg_size_kb

BUILTIN = ["digit_alignment", "ink", "jpeg_compressibility", "jpeg_incompressibility"]


@pytest.fixture(scope="module")
def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digit_split("eval")
    return images[:200], labels[:200]


def _blank_and_noisy(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    blank = torch.zeros(4, *shape)
    noisy = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    return blank, noisy


# --------------------------------------------------------------------------- registry
def test_registry_lists_builtins_and_rejects_unknown_names() -> None:
    names = available_rewards()
    assert set(BUILTIN) <= set(names)
    with pytest.raises(ValueError, match="accepted: .*digit_alignment.*jpeg_compressibility"):
        make_reward("no_such_reward")
    for name in BUILTIN:
        reward = make_reward(name)
        assert isinstance(reward, Reward) and reward.name == name
        assert type(reward).__doc__ and type(reward).__doc__.strip()
        assert reward.to("cpu") is reward


# --------------------------------------------------------------------------- digit alignment
def test_alignment_prefers_the_true_class_on_real_digits(real_digits) -> None:
    images, labels = real_digits
    reward = make_reward("digit_alignment")
    scores = torch.stack([reward(images, [digit_prompt(d)] * len(images)) for d in range(10)], dim=1)  # (N, 10)
    assert scores.dtype == torch.float32 and scores.shape == (len(images), 10)
    assert ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(len(images)), atol=1e-4, rtol=0)
    aligned = scores.gather(1, labels[:, None]).squeeze(1)
    best_other = scores.masked_fill(torch.nn.functional.one_hot(labels, 10).bool(), -1).max(dim=1).values
    assert (aligned > best_other).float().mean() >= 0.95
    assert aligned.mean() >= 0.9
    # the reward reads the digit out of any prompt wording
    words = reward(images[:3], ["the digit " + ["zero", "one", "two", "three", "four", "five", "six", "seven",
                                                "eight", "nine"][int(d)] for d in labels[:3]])  # fmt: skip
    torch.testing.assert_close(words, aligned[:3])


def test_alignment_accepts_rgb_and_larger_images(real_digits) -> None:
    images, labels = real_digits
    prompts = [digit_prompt(int(d)) for d in labels[:50]]
    reward = make_reward("digit_alignment")
    grey = reward(images[:50], prompts)
    rgb_big = images[:50].repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).expand(-1, 3, -1, -1)
    torch.testing.assert_close(reward(rgb_big, prompts), grey, atol=1e-5, rtol=1e-5)


def test_alignment_rejects_bad_prompts(real_digits) -> None:
    images, _ = real_digits
    reward = make_reward("digit_alignment")
    with pytest.raises(ValueError, match="digit 0-9"):
        reward(images[:2], ["a cat", "a dog"])
    with pytest.raises(ValueError, match="prompts"):
        reward(images[:2], [digit_prompt(1)])


# --------------------------------------------------------------------------- ink
def test_ink_orders_bold_above_faint(real_digits) -> None:
    images, labels = real_digits
    prompts = [digit_prompt(int(d)) for d in labels]
    ink = make_reward("ink")
    faint, bold = images * 0.4, (images * 2.0).clamp(0, 1)
    r_faint, r_real, r_bold = ink(faint, prompts), ink(images, prompts), ink(bold, prompts)
    assert (r_bold > r_real).all() and (r_real > r_faint).all()
    assert 0.2 < float(r_real.mean()) < 0.45  # real digits cover about a third of the canvas
    assert ink(torch.ones(2, 1, 8, 8), ["", ""]).tolist() == [1.0, 1.0]
    assert ink(torch.zeros(2, 3, 16, 16), ["", ""]).tolist() == [0.0, 0.0]


def test_ink_conflicts_with_alignment_when_pushed(real_digits) -> None:
    """Saturating the ink (thick blobs) raises ink but lowers digit alignment."""
    images, labels = real_digits
    prompts = [digit_prompt(int(d)) for d in labels]
    blob = torch.nn.functional.max_pool2d(images, 3, stride=1, padding=1).mul(3).clamp(0, 1)
    ink, align = make_reward("ink"), make_reward("digit_alignment")
    assert ink(blob, prompts).mean() > ink(images, prompts).mean() + 0.2
    assert align(blob, prompts).mean() < align(images, prompts).mean() - 0.2


# --------------------------------------------------------------------------- JPEG
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 64, 64), (4, 16, 16), (2, 12, 10)])
def test_jpeg_rewards_order_blank_and_noisy(shape) -> None:
    blank, noisy = _blank_and_noisy(shape)
    prompts = [""] * 4
    compress, incompress = make_reward("jpeg_compressibility"), make_reward("jpeg_incompressibility")
    c_blank, c_noisy = compress(blank, prompts), compress(noisy, prompts)
    assert c_blank.dtype == torch.float32 and c_blank.shape == (4,)
    assert (c_blank > c_noisy).all()
    assert (incompress(blank, prompts) < incompress(noisy, prompts)).all()
    torch.testing.assert_close(incompress(noisy, prompts), -c_noisy)


def test_jpeg_convention_is_minus_kilobytes_over_500() -> None:
    _, noisy = _blank_and_noisy((3, 32, 32))
    kb = jpeg_size_kb(noisy)
    assert (kb > 0.5).all()  # a noisy 32x32 RGB JPEG is well over 500 bytes
    torch.testing.assert_close(make_reward("jpeg_compressibility")(noisy, [""] * 4), -kb / 500)
    torch.testing.assert_close(make_reward("jpeg_incompressibility", scale=1.0)(noisy, [""] * 4), kb)
    with pytest.raises(ValueError, match="scale"):
        make_reward("jpeg_compressibility", scale=0.0)
    with pytest.raises(ValueError, match="quality"):
        make_reward("jpeg_compressibility", quality=0)
    with pytest.raises(ValueError, match="shape"):
        jpeg_size_kb(noisy[0])


@settings(max_examples=20, deadline=None)
@given(level=st.floats(0.0, 1.0), size=st.sampled_from([8, 16]))
def test_jpeg_of_a_constant_image_is_smaller_than_noise(level: float, size: int) -> None:
    flat = torch.full((1, 1, size, size), level)
    noisy = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(size))
    assert jpeg_size_kb(flat) < jpeg_size_kb(noisy)


# --------------------------------------------------------------------------- composition
def test_composer_weights_terms(real_digits) -> None:
    images, labels = real_digits
    images, prompts = images[:16], [digit_prompt(int(d)) for d in labels[:16]]
    composer = RewardComposer({"digit_alignment": 1.0, "ink": -0.5, "jpeg_compressibility": 2.0})
    total, terms = composer(images, prompts)
    assert set(terms) == {"digit_alignment", "ink", "jpeg_compressibility"}
    expected = terms["digit_alignment"] - 0.5 * terms["ink"] + 2.0 * terms["jpeg_compressibility"]
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["ink"], make_reward("ink")(images, prompts))
    with pytest.raises(ValueError, match="accepted"):
        RewardComposer({"nope": 1.0})
