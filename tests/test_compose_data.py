"""Compose task data: canvases, grammar, scene sampler and the train / held-out split."""

import numpy as np
import pytest
import torch

from flowgym.backends.compose import canvas, grammar
from flowgym.backends.compose.canvas import COLOURS, DIGITS, SceneObject, glyph_split, render_canvas, render_canvases


def test_glyph_split_disjoint_and_fixed():
    sizes = {}
    for name in ("flow", "scorer", "eval"):
        glyphs, labels = glyph_split(name)
        assert glyphs.shape[1:] == (12, 12) and glyphs.dtype == torch.float32
        assert float(glyphs.min()) >= 0.0 and float(glyphs.max()) <= 1.0
        assert set(labels.tolist()) == set(DIGITS)
        sizes[name] = len(labels)
    idx = canvas._split_indices()
    sets = {n: set(np.concatenate(list(idx[n].values())).tolist()) for n in idx}
    assert not (sets["flow"] & sets["scorer"]) and not (sets["flow"] & sets["eval"]) and not (sets["scorer"] & sets["eval"])
    assert sum(sizes.values()) == len(canvas._glyphs()[1])
    with pytest.raises(ValueError, match="unknown glyph split"):
        glyph_split("test")


def test_render_deterministic_and_in_range():
    scene = [SceneObject(3, "green", 0), SceneObject(1, "yellow", 3)]
    a = render_canvas(scene, np.random.default_rng(7))
    b = render_canvas(scene, np.random.default_rng(7))
    assert torch.equal(a, b)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # green object: no red / blue ink in cell 0; yellow: no blue anywhere; empty cells are black
    assert float(a[0, :16, :16].max()) == 0.0 and float(a[1, :16, :16].max()) > 0.5
    assert float(a[2].max()) == 0.0
    assert float(a[:, :16, 16:].max()) == 0.0 and float(a[:, 16:, :16].max()) == 0.0
    with pytest.raises(ValueError, match="share a cell"):
        render_canvas([SceneObject(1, "red", 0), SceneObject(2, "red", 0)], np.random.default_rng(0))
    with pytest.raises(ValueError):
        SceneObject(7, "red", 0)
    assert render_canvases([], np.random.default_rng(0)).shape == (0, 3, 32, 32)


def test_prompt_sets_disjoint_deterministic_and_documented_sizes():
    sets = grammar.prompt_sets()
    assert set(sets["train"]).isdisjoint(sets["heldout"])
    assert sorted(sets["train"] + sets["heldout"]) == sorted(sets["all"])
    assert len(set(sets["all"])) == len(sets["all"]) == 380
    assert (len(sets["train"]), len(sets["heldout"])) == (223, 157)
    assert sets == grammar.prompt_sets()
    cats = {grammar.parse_prompt(p).category for p in sets["train"]}
    assert cats == set(grammar.CATEGORIES)
    assert {grammar.parse_prompt(p).category for p in sets["heldout"]} == set(grammar.CATEGORIES) - {"single_object"}
    balanced = grammar.balanced_prompts(sets["train"], 8, seed=0)
    assert len(balanced) == 48 and balanced == grammar.balanced_prompts(sets["train"], 8, seed=0)


def test_heldout_combinations_never_in_train_prompts():
    for prompt in grammar.prompt_sets()["train"]:
        spec = grammar.parse_prompt(prompt)
        for o in spec.objects:
            assert (o.digit, o.colour) not in grammar.HELDOUT_COLOUR_DIGITS
        if len(spec.objects) == 2:
            assert frozenset(spec.digits) not in grammar.HELDOUT_DIGIT_PAIRS
        if spec.category == "counting":
            assert (spec.objects[0].count, spec.objects[0].digit) not in grammar.HELDOUT_COUNTS
    # and every held-out prompt does name one
    assert all(grammar.is_heldout_prompt(p) for p in grammar.prompt_sets()["heldout"])


def test_pretraining_scenes_never_show_heldout_combinations():
    rng = np.random.default_rng(0)
    train = grammar.prompt_sets()["train"]
    for prompt in train * 10:
        scene = grammar.sample_scene(prompt, rng, pretraining=True)
        assert not grammar.scene_is_heldout(scene), (prompt, scene)
        assert all(grammar.check_conditions(prompt, scene))
    with pytest.raises(ValueError, match="held out"):
        grammar.sample_scene(grammar.prompt_sets()["heldout"][0], rng, pretraining=True)
    # the same flags catch held-out scenes
    assert grammar.scene_is_heldout([SceneObject(0, "red", 0)])
    assert grammar.scene_is_heldout([SceneObject(0, "blue", 0), SceneObject(3, "blue", 1)])
    assert grammar.scene_is_heldout([SceneObject(1, "red", 0), SceneObject(1, "blue", 1)])


def test_sample_scene_satisfies_every_prompt_and_is_seeded():
    rng = np.random.default_rng(1)
    for prompt in grammar.all_prompts():
        scene = grammar.sample_scene(prompt, rng)
        assert all(grammar.check_conditions(prompt, scene)), (prompt, scene)
        assert len(grammar.check_conditions(prompt, scene)) == len(grammar.condition_names(prompt))
    a = [grammar.sample_scene(p, np.random.default_rng(3)) for p in grammar.all_prompts()[:50]]
    b = [grammar.sample_scene(p, np.random.default_rng(3)) for p in grammar.all_prompts()[:50]]
    assert a == b


def test_parse_prompt_forms_and_errors():
    s = grammar.parse_prompt("A  red 1 and a yellow 4")
    assert s.category == "color_attr" and s.objects == (grammar.ObjectSpec(1, "red"), grammar.ObjectSpec(4, "yellow"))
    s = grammar.parse_prompt("three 2s")
    assert s.category == "counting" and s.num_objects == 3
    s = grammar.parse_prompt("a 2 to the left of a 4")
    assert s.category == "position" and s.relation == "left of"
    assert grammar.parse_prompt("a 2 below a 4").relation == "below"
    assert grammar.parse_prompt("a green 2").category == "colors"
    for bad in ("a 7", "a cat", "a 2 and a 2", "a red 1 and a red 4", "five 2s", ""):
        with pytest.raises(ValueError):
            grammar.parse_prompt(bad)
    assert len(set(COLOURS)) == 4
