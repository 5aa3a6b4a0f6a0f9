"""The embedded digits backend, its pretraining command and the prior-capability metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowgym.backends.digits import (
    ASSETS_DIR,
    CLASSIFIER_FILE,
    DEFAULT_GUIDANCE,
    DEFAULT_SHIFT,
    FLOW_FILE,
    METADATA_FILE,
    NULL_LABEL,
    DigitClassifier,
    DigitsBackend,
    DigitVelocityNet,
    digit_prompt,
    digit_split,
    digit_split_indices,
    load_classifier,
    load_module,
    parse_digit,
    sample_ode,
)
from flowgym.backends.digits.pretrain import PretrainConfig, main, train_flow
from flowgym.kernels import ode_step
from flowgym.backends.base import FlowBackend
from flowgym.backends.digits.metrics import digit_accuracy, digit_fd
from flowgym.metrics import frechet_distance, gaussian_statistics
from flowgym.schedules import static_shift_sigmas

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def backend() -> DigitsBackend:
    return DigitsBackend()


def _balanced_prompts(per_digit: int) -> list[str]:
    return [digit_prompt(d) for d in range(10) for _ in range(per_digit)]


def _real_flow_split(per_digit: int) -> tuple[torch.Tensor, list[str]]:
    images, labels = digit_split("flow")
    pick = torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)])
    return images[pick], [digit_prompt(int(d)) for d in labels[pick]]


# --------------------------------------------------------------------------- prompts
@given(digit=st.integers(0, 9), words=st.booleans(), prefix=st.sampled_from(["", "a handwritten ", "the digit "]))
def test_parse_digit_reads_characters_and_words(digit: int, words: bool, prefix: str) -> None:
    name = WORDS[digit] if words else str(digit)
    assert parse_digit(prefix + name) == digit
    assert parse_digit((prefix + name).upper() + "!") == digit


@pytest.mark.parametrize("prompt", ["a handwritten digit", "", "a cat", "a 3 and a 4", "a handwritten 12", "one or two"])
def test_parse_digit_rejects_prompts_without_exactly_one_digit(prompt: str) -> None:
    with pytest.raises(ValueError, match="accepts prompts naming"):
        parse_digit(prompt)


def test_prompt_sets_split_digits(backend: DigitsBackend) -> None:
    sets = backend.prompt_sets()
    assert [parse_digit(p) for p in sets["train"]] == [0, 1, 2, 3, 4]
    assert [parse_digit(p) for p in sets["heldout"]] == [5, 6, 7, 8, 9]
    assert sorted(parse_digit(p) for p in sets["all"]) == list(range(10))
    with pytest.raises(ValueError, match="accepted"):
        backend.resolve_prompt_set("nope")


def test_encode_labels_and_null_prompt(backend: DigitsBackend) -> None:
    cond = backend.encode_prompts(["a handwritten 3", "", "the digit nine"])
    assert cond["label"].tolist() == [3, NULL_LABEL, 9]
    assert cond["label"].dtype == torch.long
    with pytest.raises(ValueError, match="digit 0-9"):
        backend.encode_prompts(["a handwritten cat"])


def test_prompt_cache_encodes_each_distinct_prompt_once(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = DigitsBackend()
    calls: list[list[str]] = []
    original = backend._encode

    def counting(prompts: list[str]):
        calls.append(list(prompts))
        return original(prompts)

    monkeypatch.setattr(backend, "_encode", counting)
    prompts = ["a handwritten 3"] * 5 + ["a handwritten 4"] * 3 + ["a handwritten 3"]
    cond = backend.encode_prompts(prompts)
    assert cond["label"].tolist() == [3] * 5 + [4] * 3 + [3]
    assert calls == [["a handwritten 3", "a handwritten 4"]]
    backend.encode_prompts(["a handwritten 4", "a handwritten 3"])
    assert len(calls) == 1
    assert backend.encode_prompts(["a handwritten 5", "a handwritten 3"])["label"].tolist() == [5, 3]
    assert calls[-1] == ["a handwritten 5"]
    # the stack of distinct prompts is reused while the set repeats and rebuilt when it changes
    for batch in (["a handwritten 3", "a handwritten 5"] * 2, ["a handwritten 4"], ["a handwritten 5", "a handwritten 4"]):
        assert backend.encode_prompts(batch)["label"].tolist() == [parse_digit(p) for p in batch]
    backend.clear_prompt_cache()
    assert backend.encode_prompts(["a handwritten 7"])["label"].tolist() == [7]


# --------------------------------------------------------------------------- backend contract
def test_shapes_decode_and_latent_convention(backend: DigitsBackend) -> None:
    x = torch.randn(7, *backend.latent_shape)
    cond = backend.encode_prompts([digit_prompt(d % 10) for d in range(7)])
    v = backend.velocity(x, torch.full((7,), 0.5), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    images = backend.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).reshape(5, 1, 1, 1).expand(5, 1, 8, 8))
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.float32
    assert images[:, 0, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    real, _ = digit_split("eval")
    assert torch.allclose(backend.decode(backend.encode_images(real)), real)


def test_velocity_points_from_data_to_noise(backend: DigitsBackend) -> None:
    """Near the data end, x0_hat = x - s v recovers a real digit far better than the noisy input."""
    images, labels = digit_split("eval")
    x0 = backend.encode_images(images[:200])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    s = 0.3
    xs = (1 - s) * x0 + s * eps
    with torch.no_grad():
        v = backend.velocity(xs, s, backend.encode_prompts([digit_prompt(int(d)) for d in labels[:200]]))
    error_model = ((xs - s * v) - x0).square().mean()
    assert error_model < 0.5 * (xs - x0).square().mean()


def test_cfg_with_guidance_one_equals_plain_forward(backend: DigitsBackend) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    sigma = torch.rand(6, generator=gen)
    cond = backend.encode_prompts(_balanced_prompts(1)[:6])
    with torch.no_grad():
        plain = backend._forward(x, sigma, cond)
        assert torch.equal(backend.velocity(x, sigma, cond, guidance_scale=1.0), plain)
        negative = backend.encode_prompts([""] * 6)
        v_neg = backend._forward(x, sigma, negative)
        guided = backend.velocity(x, sigma, cond, guidance_scale=2.5)
    torch.testing.assert_close(guided, v_neg + 2.5 * (plain - v_neg), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, v_neg, atol=1e-3)  # the label matters


def test_reference_returns_pretrained_velocity_after_perturbation() -> None:
    backend = DigitsBackend()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 1, 8, 8, generator=gen)
    sigma = torch.rand(8, generator=gen)
    cond = backend.encode_prompts(_balanced_prompts(1)[:8])
    with torch.no_grad():
        before = backend.velocity(x, sigma, cond)
        for p in backend.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        after = backend.velocity(x, sigma, cond)
        with backend.reference():
            reference = backend.velocity(x, sigma, cond)
        again = backend.velocity(x, sigma, cond)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(reference, before)
    torch.testing.assert_close(again, after)
    assert all(not p.requires_grad for p in backend.reference_model.parameters())


def test_float64_backend_and_gradients() -> None:
    backend = DigitsBackend(dtype=torch.float64)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    v = backend.velocity(x, torch.full((4,), 0.7), backend.encode_prompts(_balanced_prompts(1)[:4]))
    assert v.dtype == torch.float64
    v.square().mean().backward()
    assert all(p.grad is not None for p in backend.trainable_parameters())


def test_bad_weights_path_raises(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        DigitsBackend(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="expected DigitVelocityNet"):
        DigitsBackend(ASSETS_DIR / CLASSIFIER_FILE)


# --------------------------------------------------------------------------- the shipped model
def test_shipped_assets_are_small_and_described() -> None:
    for name in (FLOW_FILE, CLASSIFIER_FILE, METADATA_FILE):
        assert (ASSETS_DIR / name).stat().st_size < 3_000_000
    meta = json.loads((ASSETS_DIR / METADATA_FILE).read_text())
    assert meta["split"]["eval_indices"] == digit_split_indices()["eval"].tolist()
    assert meta["metrics"]["ode_accuracy"] >= 0.95
    assert isinstance(load_module(ASSETS_DIR / FLOW_FILE, DigitVelocityNet), DigitVelocityNet)


def test_split_is_disjoint_stratified_and_covers_the_data() -> None:
    split = digit_split_indices()
    all_idx = np.concatenate(list(split.values()))
    assert len(all_idx) == len(set(all_idx.tolist())) == 1797
    for name in split:
        _, labels = digit_split(name)
        counts = np.bincount(labels.numpy(), minlength=10)
        assert counts.min() >= 0.8 * counts.max()


@pytest.fixture(scope="module")
def ode_samples(backend: DigitsBackend) -> tuple[torch.Tensor, list[str]]:
    """500 samples (50 per digit) from the 10-step Euler ODE on the shipped schedule."""
    prompts = _balanced_prompts(50)
    sigmas = static_shift_sigmas(10, DEFAULT_SHIFT)
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(len(prompts), 1, 8, 8, generator=gen)
    cond = backend.encode_prompts(prompts)
    with torch.no_grad():
        for k in range(10):
            v = backend.velocity(x, sigmas[k], cond, guidance_scale=DEFAULT_GUIDANCE)
            x, std = ode_step(x, v, sigmas[k], sigmas[k + 1])
            assert float(std.max()) == 0.0
    return backend.decode(x), prompts


def test_shipped_model_draws_the_prompted_digit(ode_samples) -> None:
    images, prompts = ode_samples
    assert digit_accuracy(images, prompts) >= 0.95
    # the conditioning is what makes it right: the same samples judged against shifted prompts fail
    wrong = [digit_prompt((parse_digit(p) + 1) % 10) for p in prompts]
    assert digit_accuracy(images, wrong) < 0.1


def test_shipped_model_fd_is_near_real_data(ode_samples) -> None:
    """Bar: FD(samples) <= 1.5 * FD(real flow-split digits) + 5, both vs the real eval split, n = 500."""
    images, prompts = ode_samples
    real_images, real_prompts = _real_flow_split(50)
    fd_model = digit_fd(images, prompts)
    fd_real = digit_fd(real_images, real_prompts)
    assert fd_model <= 1.5 * fd_real + 5.0, (fd_model, fd_real)
    # and the metric can tell: noise or digits of the wrong class are far away
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert digit_fd(noise, prompts) > 10 * fd_real
    shifted = [digit_prompt((parse_digit(p) + 1) % 10) for p in real_prompts[:250]]
    assert digit_fd(real_images[:250], shifted) > 3 * fd_real


# --------------------------------------------------------------------------- metrics
@settings(max_examples=30, deadline=None)
@given(
    mu1=st.lists(st.floats(-5, 5), min_size=3, max_size=3),
    mu2=st.lists(st.floats(-5, 5), min_size=3, max_size=3),
    var1=st.lists(st.floats(0.01, 4), min_size=3, max_size=3),
    var2=st.lists(st.floats(0.01, 4), min_size=3, max_size=3),
)
def test_frechet_distance_matches_closed_form_for_diagonal_covariances(mu1, mu2, var1, var2) -> None:
    """Diagonal case: FD = ||mu1 - mu2||^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2."""
    mu1, mu2, var1, var2 = map(np.asarray, (mu1, mu2, var1, var2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert frechet_distance(mu2, np.diag(var2), mu1, np.diag(var1)) == pytest.approx(got, rel=1e-6, abs=1e-8)


def test_frechet_distance_is_rotation_invariant_and_zero_on_itself() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + 0.1 * np.eye(4)
    mu = rng.normal(size=4)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    b = rng.normal(size=(4, 4))
    cov2 = b @ b.T
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    rotated = frechet_distance(q @ mu, q @ cov @ q.T, q @ mu[::-1], q @ cov2 @ q.T)
    assert rotated == pytest.approx(frechet_distance(mu, cov, mu[::-1], cov2), rel=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu, cov, mu[:3], cov[:3, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_statistics(np.zeros((1, 4)))


def test_prior_capability_entry_point() -> None:
    images, prompts = _real_flow_split(20)
    metrics = DigitsBackend().prior_capability_metrics(images, prompts)
    assert set(metrics) == {"digit_accuracy", "digit_fd"}
    assert metrics["digit_accuracy"] >= 0.95
    assert FlowBackend.prior_capability_metrics(DigitsBackend(), images, prompts) == {}  # the base hook has none
    with pytest.raises(ValueError, match="prompts"):
        digit_accuracy(images, prompts[:-1])
    with pytest.raises(ValueError, match="reference"):
        digit_fd(images, prompts, reference="fake")


# --------------------------------------------------------------------------- pretraining
def test_quick_pretraining_from_scratch_learns_digits(tmp_path) -> None:
    """Bar for the shortened run (~25 s): ODE samples >= 80% right (shipped classifier), own classifier >= 90%."""
    threads = torch.get_num_threads()
    try:  # one thread is fastest for these tiny models, and robust on a busy machine
        metadata = main(["--quick", "--seed", "3", "--out", str(tmp_path), "--log-every", "0", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert {p.name for p in tmp_path.iterdir()} == {FLOW_FILE, CLASSIFIER_FILE, METADATA_FILE}
    assert json.loads((tmp_path / METADATA_FILE).read_text())["config"]["seed"] == 3
    assert metadata["metrics"]["classifier_eval_accuracy"] >= 0.9
    backend = DigitsBackend(tmp_path)
    prompts = _balanced_prompts(20)
    images = sample_ode(backend, prompts, generator=torch.Generator().manual_seed(0))
    assert digit_accuracy(images, prompts) >= 0.8
    assert isinstance(load_classifier(tmp_path), DigitClassifier)


def test_pretraining_is_reproducible_for_a_seed() -> None:
    config = PretrainConfig(seed=5, flow_steps=15, flow_batch=32)
    a, b = train_flow(config), train_flow(config)
    c = train_flow(PretrainConfig(seed=6, flow_steps=15, flow_batch=32))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_pretrain_command_rejects_bad_steps(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--steps", "0", "--out", str(tmp_path)])
    assert "--steps must be >= 1" in capsys.readouterr().err
