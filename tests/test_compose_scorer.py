"""Compose task scorer: reading accuracy, GenEval-style rules per category, diagnostics, rewards."""

import numpy as np
import pytest
import torch

from flowgym.backends.compose import grammar
from flowgym.backends.compose.canvas import SceneObject as O
from flowgym.backends.compose.canvas import render_canvases
from flowgym.backends.compose.scorer import canvas_cells, objects_read_right, shipped_scorer

# (prompt, satisfying scene, scenes breaking exactly one condition)
CASES = [
    ("a 3", [O(3, "green", 0)], [[O(2, "green", 0)], [O(3, "green", 0), O(1, "red", 3)]]),
    ("a 3 and a 1", [O(3, "blue", 0), O(1, "red", 3)], [[O(3, "blue", 0), O(2, "red", 3)],
                                                        [O(3, "blue", 0), O(1, "red", 3), O(0, "red", 1)]]),
    ("three 2s", [O(2, "red", 0), O(2, "blue", 1), O(2, "green", 3)],
     [[O(2, "red", 0), O(2, "blue", 1), O(4, "green", 3)], [O(2, "red", 0), O(2, "blue", 1), O(2, "green", 3), O(1, "red", 2)]]),
    ("a green 2", [O(2, "green", 2)], [[O(2, "red", 2)], [O(2, "green", 2), O(2, "green", 1)]]),
    ("a 2 to the left of a 4", [O(2, "yellow", 0), O(4, "blue", 3)], [[O(2, "yellow", 1), O(4, "blue", 2)]]),
    ("a 2 to the right of a 4", [O(2, "yellow", 1), O(4, "blue", 0)], [[O(2, "yellow", 0), O(4, "blue", 1)]]),
    ("a 0 above a 1", [O(0, "red", 1), O(1, "red", 3)], [[O(0, "red", 3), O(1, "red", 1)]]),
    ("a 0 below a 1", [O(0, "red", 2), O(1, "red", 1)], [[O(0, "red", 0), O(1, "red", 2)]]),
    ("a red 1 and a yellow 4", [O(1, "red", 0), O(4, "yellow", 1)],
     [[O(1, "red", 0), O(4, "blue", 1)], [O(1, "green", 0), O(4, "yellow", 1)]]),
]


@pytest.fixture(scope="module")
def scorer():
    return shipped_scorer()


def test_reader_accuracy_on_1000_canvases(scorer):
    rng = np.random.default_rng(2026)
    everything = grammar.all_prompts()
    prompts = [everything[i] for i in rng.integers(len(everything), size=1000)]
    scenes = [grammar.sample_scene(p, rng) for p in prompts]
    images = render_canvases(scenes, rng, split="eval")
    acc = objects_read_right(scorer, images, scenes)
    assert acc["object_accuracy"] >= 0.99, acc
    assert acc["colour_accuracy"] == 1.0 and acc["false_objects"] == 0.0
    assert float(scorer.score(images, prompts).strict.mean()) >= 0.98


def test_every_category_has_a_case():
    assert {grammar.parse_prompt(p).category for p, _, _ in CASES} == set(grammar.CATEGORIES)


@pytest.mark.parametrize("prompt,good,bad", CASES, ids=[c[0] for c in CASES])
def test_rules_satisfying_scores_one_and_one_broken_condition_scores_zero(scorer, prompt, good, bad):
    # grammar level: exactly one condition broken
    assert all(grammar.check_conditions(prompt, good))
    for scene in bad:
        met = grammar.check_conditions(prompt, scene)
        assert met.count(False) == 1, (scene, met)
    # image level, through the reader
    rng = np.random.default_rng(0)
    images = render_canvases([good, *bad], rng, split="eval")
    result = scorer.score(images, [prompt] * len(images))
    assert result.strict.tolist() == [1.0] + [0.0] * len(bad)
    n = len(grammar.condition_names(prompt))
    assert result.partial[0].item() == 1.0
    assert result.partial[1:].tolist() == pytest.approx([(n - 1) / n] * len(bad))
    assert result.strict.dtype == torch.float32


def test_empty_canvas_and_binding_swap(scorer):
    blank = torch.zeros(1, 3, 32, 32)
    r = scorer.score(blank, ["a red 1 and a yellow 4"])
    assert r.strict.item() == 0.0 and r.partial.item() == 0.0
    swapped = render_canvases([[O(1, "yellow", 0), O(4, "red", 1)]], np.random.default_rng(0))
    r = scorer.score(swapped, ["a red 1 and a yellow 4"])
    assert r.strict.item() == 0.0 and r.partial.item() == pytest.approx(3 / 5)


def test_metrics_diagnostics_see_collapse_and_stray_ink(scorer):
    rng = np.random.default_rng(4)
    prompts = grammar.balanced_prompts(grammar.prompt_sets()["all"], 40, seed=1)
    scenes = [grammar.sample_scene(p, rng) for p in prompts]
    real = render_canvases(scenes, rng)
    m = scorer.metrics(real, prompts)
    assert m["compose"] >= 0.97 and m["compose/clean"] > 0.99 and m["compose/stray_marks"] == 0.0
    assert m["compose/colour_entropy"] > 0.95 and m["compose/cell_entropy"] > 0.95
    assert set(f"compose/{c}" for c in grammar.CATEGORIES) <= set(m)
    # colour collapse: every free colour red
    collapsed = [[O(o.digit, "red" if grammar.parse_prompt(p).colour_free else o.colour, o.cell) for o in s]
                 for p, s in zip(prompts, scenes)]  # fmt: skip
    mc = scorer.metrics(render_canvases(collapsed, np.random.default_rng(4)), prompts, fd=False)
    assert mc["compose/colour_entropy"] == 0.0
    # stray ink: haze over the background and a mark in an empty cell
    dirty = real.clone()
    dirty += 0.05 * torch.rand(dirty.shape, generator=torch.Generator().manual_seed(0))
    md = scorer.metrics(dirty.clamp(0, 1), prompts, fd=False)
    assert md["compose/clean"] < 0.9
    assert m["compose_fd"] < scorer.frechet_distance(torch.rand(len(prompts), 3, 32, 32), prompts)


def test_canvas_cells_order():
    x = torch.zeros(1, 3, 32, 32)
    x[0, :, 20, 5] = 1.0  # bottom-left
    cells = canvas_cells(x)
    assert cells.shape == (1, 4, 3, 16, 16) and cells[0, 2].sum() == 3 and cells.sum() == 3
    with pytest.raises(ValueError):
        canvas_cells(torch.zeros(1, 1, 8, 8))


def test_rewards(scorer):
    from flowgym.rewards.base import make_reward
    from flowgym.rewards.compose import CleanCanvasReward, ComposePartialReward, ComposeReward

    prompt, good, bad = CASES[8]
    images = render_canvases([good, bad[0]], np.random.default_rng(0))
    prompts = [prompt, prompt]
    strict = ComposeReward()(images, prompts)
    partial = ComposePartialReward()(images, prompts)
    clean = CleanCanvasReward()(images, prompts)
    assert strict.dtype == partial.dtype == clean.dtype == torch.float32
    assert strict.shape == partial.shape == clean.shape == (2,)
    assert strict.tolist() == [1.0, 0.0] and partial.tolist() == pytest.approx([1.0, 0.8])
    assert (clean > 0.99).all()  # real canvases: only faint glyph halos lie outside the masks
    dirty = images.clone()
    dirty[:, :, 16:, :16] = 0.25  # a faint grey square in an empty cell
    assert (CleanCanvasReward()(dirty, prompts) < 0.5).all()
    assert make_reward("compose_partial")(images, prompts).tolist() == pytest.approx([1.0, 0.8])
    with pytest.raises(ValueError):
        ComposeReward()(images, prompts[:1])
