"""The paper suites on the compositional task (algos.bench.paper) and their statistics (algos.bench.stats)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from algos.bench import BenchOptions, run_suite
from algos.bench import paper
from algos.bench.stats import mean_interval, paired_test
from algos.bench.suites import GROUPS, SUITES, expand


# --------------------------------------------------------------------------- statistics
def test_interval_of_two_values_uses_the_t_quantile_with_one_degree_of_freedom():
    # n = 2: t_{1, 0.975} = 12.7062, s = |a - b| / sqrt(2), half = t * s / sqrt(2) = 12.7062 * |a - b| / 2
    interval = mean_interval([1.0, 3.0])
    assert interval.mean == 2.0 and interval.n == 2
    assert interval.half_width == pytest.approx(12.7062047 * 2.0 / 2.0, rel=1e-6)


def test_interval_drops_missing_values_and_says_nothing_about_one_seed():
    interval = mean_interval([0.5, None, math.nan])
    assert interval.mean == 0.5 and interval.n == 1 and math.isnan(interval.half_width)
    assert str(interval) == "0.5 (n=1)"
    assert mean_interval([]).n == 0 and str(mean_interval([])) == "n/a"
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], level=1.5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=12))
def test_interval_covers_the_mean_and_matches_the_closed_form(values):
    array = np.asarray(values)
    interval = mean_interval(values, level=0.9)
    assert interval.mean == pytest.approx(array.mean(), abs=1e-12)
    from scipy import stats

    expected = stats.t.ppf(0.95, len(values) - 1) * array.std(ddof=1) / math.sqrt(len(values))
    assert interval.half_width == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_paired_test_equals_a_one_sample_t_test_on_the_differences():
    a = [0.30, 0.25, 0.41, 0.33, 0.29]
    b = [0.20, 0.22, 0.30, 0.35, 0.21]
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    from scipy import stats

    p = 2 * stats.t.sf(abs(t), len(d) - 1)
    result = paired_test(a, b)
    assert result.difference.mean == pytest.approx(d.mean())
    assert result.p_value == pytest.approx(p, rel=1e-9)
    # a seed missing on either side drops that pair only
    partial = paired_test([*a, math.nan], [*b, 0.1])
    assert partial.difference.n == 5 and partial.p_value == pytest.approx(p, rel=1e-9)


def test_paired_test_degenerate_cases():
    assert paired_test([0.1, 0.2], [0.1, 0.2]).p_value == 1.0  # identical runs: no difference
    assert paired_test([0.2, 0.3], [0.1, 0.2]).p_value == 0.0  # the same non-zero difference on every seed
    assert math.isnan(paired_test([0.2], [0.1]).p_value)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_test([0.1, 0.2], [0.1])


# --------------------------------------------------------------------------- rules
def _rows(scores, start=0.2, key=paper.SCORE):
    rows = [{"iteration": 0, "eval/train/reward": 1.0, key: start}]
    rows += [{"iteration": 10 * (i + 1), "eval/train/reward": 1.0, key: s} for i, s in enumerate(scores)]
    return rows


def test_collapse_is_the_first_evaluation_below_pretrained_by_the_margin_or_non_finite():
    assert math.isnan(paper.collapse_iteration(_rows([0.18, 0.16, 0.25])))  # within the 0.05 margin
    assert paper.collapse_iteration(_rows([0.18, 0.14, 0.25])) == 20.0
    assert paper.collapse_iteration(_rows([0.3, math.nan])) == 20.0
    nan_elsewhere = _rows([0.3])
    nan_elsewhere[1]["eval/train/drift_kl"] = math.inf
    assert paper.collapse_iteration(nan_elsewhere) == 10.0


def test_every_paper_method_is_registered_and_its_knob_is_a_loss_argument():
    import importlib

    from algos.losses import get_loss_class

    for method in paper.PAPER_METHODS:
        if method.algo == "drpo":
            importlib.import_module("examples.new_method.drpo_loss")
        cls = get_loss_class(method.algo)
        if method.knob is not None:
            import inspect

            argument = method.knob.rsplit(".", 1)[-1]
            parameters = {name for klass in cls.__mro__ if "__init__" in vars(klass)
                          for name in inspect.signature(klass.__init__).parameters}
            assert argument in parameters, f"{method.label}: {argument!r} is not an argument of {cls.__name__}"
        assert method.default not in method.sweep


def test_paper_group_and_options():
    assert set(expand("paper")) == set(paper.PAPER) and all(name in SUITES for name in paper.PAPER)
    assert "paper" in GROUPS
    with pytest.raises(ValueError, match="names no paper method"):
        paper.build_table(BenchOptions(seeds=1, quick=True, methods=("no_such_method",)))
    reduced = paper.build_table(BenchOptions(seeds=1))
    full = paper.build_table(BenchOptions(seeds=1, full=True))
    assert len(full) > len(reduced)
    # every method appears with its default; the reduced frontier sweeps Flow-DPPO and Flow-GRPO
    assert {p.method for p in reduced} == {m.label for m in paper.PAPER_METHODS}
    swept = {p.method for p in reduced if not p.setting["default"]}
    assert swept == set(paper.REDUCED_SWEEP)
    # --sweep-all: every method's sweep at the reduced size (same points as the full version's table)
    every = paper.build_table(BenchOptions(seeds=1, sweep_all=True))
    assert {p.method for p in every if not p.setting["default"]} == {m.label for m in paper.PAPER_METHODS if m.sweep}
    assert len(every) == len(full) and every[0].jobs[0].config["trainer"]["iterations"] == reduced[0].jobs[0].config["trainer"]["iterations"]
    config = reduced[0].jobs[0].config
    assert config["env"]["name"] == "compose" and config["trainer"]["lr"] == 3e-3
    # the scheduler's cost estimate reads the env sizes the family fills in (the recipe leaves them unset)
    assert config["env"]["group_size"] is None
    costs = {p.setting.get("epochs", 1): p.jobs[0].cost() for p in paper.build_reuse(BenchOptions(seeds=1))}
    assert 0 < costs[1] < costs[2] < costs[4] < costs[8]


# --------------------------------------------------------------------------- the suites, quick
@pytest.fixture(scope="module")
def paper_quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    options = BenchOptions(seeds=2, quick=True, methods=("Flow-DPPO", "Flow-GRPO"))
    summary = run_suite("paper", options, out=root / "out", cache=root / "cache", num_workers=2, log=lambda _: None)
    return root / "out" / "quick", summary


def test_paper_suites_write_tables_plots_and_paired_tests(paper_quick):
    out, summary = paper_quick
    assert summary["suites"] == list(paper.PAPER)
    for name in paper.PAPER:
        assert (out / f"{name}.md").exists()
        payload = json.loads((out / f"{name}.json").read_text())
        for plot in payload["plots"]:
            assert (out / plot).stat().st_size > 1000
    table = json.loads((out / "paper_table.json").read_text())
    defaults = table["tables"][0]["rows"]
    methods = [row["method"] for row in defaults]
    assert methods[0].startswith("pretrained") and {"Flow-DPPO", "Flow-GRPO"} <= set(methods)
    grpo = next(row for row in defaults if row["method"] == "Flow-GRPO")
    assert grpo["train"]["n"] == 2 and grpo["vs"]["difference"]["n"] == 2
    assert 0.0 <= grpo["train"]["mean"] <= 1.0
    # the frontier's points as a table: every (method, setting), in knob order, paired against Flow-DPPO's default
    sweep = table["tables"][3]["rows"]
    assert len(sweep) == 4 and [row["method"] for row in sweep].count("Flow-DPPO") == 2
    dppo_default = next(row for row in sweep if row["method"] == "Flow-DPPO" and row["setting"] == "delta = 1e-05")
    assert dppo_default["vs"] == "(baseline)" and dppo_default["train"] == defaults[methods.index("Flow-DPPO")]["train"]
    grpo_values = [float(row["setting"].split("= ")[1]) for row in sweep if row["method"] == "Flow-GRPO"]
    assert grpo_values == sorted(grpo_values) and len(grpo_values) == 2
    assert (out / "paper_index.md").exists()
    reuse = json.loads((out / "paper_reuse.json").read_text())
    assert sorted({row["epochs"] for row in reuse["tables"][0]["rows"]}) == [1, 2]
    noise = json.loads((out / "paper_ratio_noise.json").read_text())
    shares = [row["disagree"]["mean"] for row in noise["tables"][0]["rows"]]
    assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)


def test_components_suite_crosses_weighting_and_sampler_per_trust_region():
    points = paper.build_components(BenchOptions(seeds=2))
    assert "paper_components" in SUITES and "paper_components" not in paper.PAPER
    cells = {(p.method, p.setting["weighting"], p.setting["sampler"]) for p in points}
    for method in ("Flow-DPPO", "Flow-GRPO"):
        assert {(method, w, "random window") for w in ("none", "tempflow", "guard")} <= cells
        assert (method, "none", "MixGRPO sliding") in cells
    for p in points:
        config = p.jobs[0].config
        assert config["algo"]["loss"]["step_weighting"] == p.setting["weighting"]
        window = config["env"]["stochastic_steps"]
        assert window["window"] == 2 and list(window["range"]) == [0, 6]
        # the reduced run has 16 iterations: a slide every 3 visits all 5 positions of the range
        assert window.get("slide_every") == (3 if p.setting["sampler"] == "MixGRPO sliding" else None)
    # exactly one plain point per method: the baseline of its paired tests
    assert sorted(p.method for p in points if p.setting["default"]) == ["Flow-DPPO", "Flow-GRPO"]


def test_ratio_noise_probe_reads_the_sizes_the_family_fills_in(tmp_path):
    """The compose recipe leaves env.num_steps unset (the family's default): the probe reports the env's."""
    from algos.bench.ratio_noise import ratio_noise_probe

    point = paper.build_ratio_noise(BenchOptions(seeds=1, quick=True))[0]
    config = point.jobs[0].config
    config["env"]["num_steps"] = None
    config["env"]["stochastic_steps"] = {"window": 2, "range": [0, 2]}
    result = ratio_noise_probe(config, tmp_path, warmup=0, probe_steps=[1])
    assert result["num_steps"] == 10 and result["probes"]["1"]["kl"]


def test_the_reports_setting_line_gives_the_sizes_the_runs_saw():
    options = BenchOptions(seeds=3)
    config = paper.build_table(options)[0].jobs[0].config
    assert config["env"]["group_size"] is None  # the recipe leaves it to the compose family
    line = paper.describe(config, options)
    assert "8 prompts x 8 samples, 10 steps" in line and "None" not in line


def test_every_paper_method_has_its_own_plot_colour():
    from algos.bench.suites import method_color

    colours = [method_color(m.label) for m in paper.PAPER_METHODS]
    assert len(set(colours)) == len(colours)
