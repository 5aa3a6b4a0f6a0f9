"""The paper suites: the Flow-DPPO paper's claims on the compositional task, with confidence intervals.

::

    python -m algos.bench paper                  # the reduced version of every paper suite (3 seeds)
    python -m algos.bench paper --full           # the full version (5 seeds, 100 iterations, every sweep)
    python -m algos.bench paper_table --seeds 5  # one suite
    python -m algos.bench paper_table --seeds 5 --sweep-all  # every method's knob swept, at the reduced size

Every run is the compose recipe (``configs/experiment/compose_recipe.yaml``: FlowDenoise-Compose-v0,
LoRA rank 16, strict + partial reward, 8 prompts x 8 samples, 2 SDE steps trained) at **lr 3e-3**,
the same samples and optimiser steps for every method. Why 3e-3 and not the recipe's 1e-3: at 1e-3
no trust region acts at all (measured: Flow-DPPO's ``frac_over_threshold`` 0 at delta 1e-5, and
``|ratio - 1| < 7e-5`` stays inside Flow-GRPO's clip band 1e-4), so every method would be the plain
policy gradient; at 3e-3 the mask acts on 9-17 % of the pairs and an unconstrained run degrades
(held-out strict score 7.5 -> 1.3 % in 30 iterations), which is the regime a trust region is for.

==========================  ================================================================
``paper_table``             every method at its default trust-region setting and a small sweep
                            of its knob; final strict score (overall, per category) on train
                            and held-out prompts, drift KL, FD, colour entropy, wall time; mean
                            and 95 % interval; each method against Flow-DPPO, seeds paired;
                            the frontier (score against drift over the sweep) and forgetting
                            (held-out score and FD over training) plots
``paper_reuse``             1, 2, 4, 8 updates per batch: score, drift, collapse and when
``paper_multiobjective``    compose partial score against ink, at two weightings: per-term
                            gains and the Pareto plot
``paper_ratio_noise``       the share of clip decisions the exact per-step KL disagrees with,
                            measured after 0 / 8 / 16 training iterations (full: 0 / 10 / 20 / 40)
``paper_components``        not in ``paper``: Flow-DPPO and Flow-GRPO with each step weighting
                            (none, TempFlow, GRPO-Guard) and with MixGRPO's sliding window, each
                            against the same method plain, seeds paired
==========================  ================================================================

The best setting of each method is chosen by one rule for all: the highest mean final strict score
on the training prompts over seeds (the default wins ties). Collapse: an evaluation after iteration
0 whose strict training score is below the same run's pretrained score by more than ``COLLAPSE_MARGIN``,
or a non-finite metric; the table gives the first iteration it happens at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from algos.bench import ratio_noise as rn
from algos.bench.jobs import BenchOptions
from algos.bench.stats import Interval, mean_interval, paired_test
from algos.bench.suites import (
    GROUPS,
    SUITES,
    Point,
    Report,
    Suite,
    SuiteData,
    Table,
    plot_band,
    method_color,
    pyplot,
    save_figure,
    eval_rows,
    final,
    initial,
    make_point,
    train_mean,
)
from flowgym.backends.compose.grammar import CATEGORIES

__all__ = ["PAPER", "PAPER_METHODS", "PAPER_SUITES", "Method", "collapse_iteration", "best_point"]

#: every paper run: the compose recipe at the learning rate where trust regions act (module docstring)
#: (the drift KL of the table is the evaluation's; the per-rollout diagnostic would add 30 % to each iteration)
PAPER_RECIPE: tuple[str, ...] = (
    "+experiment=compose_recipe", "trainer.lr=3e-3", "trainer.checkpoint_every=0", "trainer.drift_every_iteration=false",
)
#: sized so that ``python -m algos.bench paper`` (78 runs on 2 workers) fits in an hour on a 2-core CPU:
#: 16 iterations, evaluations at 0 / 8 / 16 on 2 canvases per prompt (96 per prompt split)
REDUCED_SIZE: tuple[str, ...] = ("trainer.iterations=16", "trainer.eval_every=8", "env.eval_samples_per_prompt=2")
FULL_SIZE: tuple[str, ...] = ("trainer.iterations=100", "trainer.eval_every=20")
QUICK_SIZE: tuple[str, ...] = (
    "trainer.iterations=2",
    "trainer.eval_every=2",
    "env.num_prompts=2",
    "env.group_size=4",
    "env.num_steps=3",
    "env.stochastic_steps.range=[0,2]",
    "env.eval_samples_per_prompt=1",
)
SCORE = "eval/train/compose"
HELDOUT = "eval/heldout/compose"
DRIFT = "eval/train/drift_kl"
FD = "eval/heldout/compose_fd"
COLOUR_ENTROPY = "eval/train/compose/colour_entropy"
#: strict-score points (0-1 scale) below pretrained that count as a collapse (evaluation noise is
#: about 0.02-0.03 on the overall score at 192 canvases, so a smaller drop is not evidence)
COLLAPSE_MARGIN = 0.05


@dataclass(frozen=True)
class Method:
    """A method of the paper table: its loss, its trust-region knob, default and sweep values."""

    label: str
    algo: str
    knob: str | None
    default: float | None
    sweep: tuple[float, ...] = ()
    overrides: tuple[str, ...] = ()

    def settings(self, full: bool, quick: bool = False, sweep_all: bool = False) -> list[float | None]:
        """The knob values run: the default, plus the sweep in the full version or with ``sweep_all``
        (or always, for the two methods of the reduced frontier); the quick smoke test takes one sweep value."""
        if self.knob is None:
            return [None]
        sweep = self.sweep if (full or sweep_all or self.label in REDUCED_SWEEP) else ()
        return list(dict.fromkeys([self.default, *(sweep[:1] if quick else sweep)]))


#: each method at its official default (its own yaml) and its knob's sweep
PAPER_METHODS: tuple[Method, ...] = (
    Method("PPO-clip (DDPO)", "ppo_clip", "algo.loss.clip_range", 1e-4, (3e-5, 3e-4)),
    Method("Flow-GRPO", "grpo", "algo.loss.clip_range", 1e-4, (3e-5, 3e-4)),
    Method("GRPO + CPS", "cps", "algo.loss.clip_range", 1e-5, (3e-6, 3e-5)),
    Method("GRPO-Guard", "grpo_guard", "algo.loss.clip_range", 2e-6, (1e-6, 4e-6)),
    Method("AWM", "awm", "algo.loss.clip_range", 1.0, (0.2, 0.5)),
    Method("DiffusionNFT", "diffusion_nft", "algo.loss.strength", 1.0, (0.1, 0.5)),
    Method("Flow-DPPO", "flow_dppo", "algo.loss.delta", 1e-5, (1e-6, 1e-4)),
    Method("Flow-DPPO + CPS", "flow_dppo", "algo.loss.delta", 1e-5, (1e-6, 1e-4), ("algo.kernel=cps", "algo.noise_level=0.8")),
    Method("DRPO", "drpo", "algo.loss.delta", 1e-2, (3e-3, 3e-2)),
)
#: the methods whose knob is swept in the reduced version too (the frontier needs at least two)
REDUCED_SWEEP: tuple[str, ...] = ("Flow-DPPO", "Flow-GRPO")
BASELINE = "Flow-DPPO"


def _size(options: BenchOptions) -> tuple[str, ...]:
    if options.quick:
        return QUICK_SIZE
    return FULL_SIZE if options.full else REDUCED_SIZE


def _point(method: Method, value: float | None, options: BenchOptions, *, extra: Sequence[str] = (),
           setting: Mapping[str, Any] | None = None, kind: str = "train", params: Mapping[str, Any] | None = None) -> Point:
    knob = [f"{method.knob}={value}"] if method.knob is not None and value is not None else []
    overrides = [*PAPER_RECIPE, *method.overrides, *knob, *extra]
    return make_point(method.label, method.algo, overrides, {"value": value, **(setting or {})}, options,
                      kind=kind, params=params, size=_size(options))


def _methods(options: BenchOptions) -> tuple[Method, ...]:
    """The paper methods, or those of ``--algos`` (labels or loss names) when it was given."""
    if options.methods is None:
        return PAPER_METHODS
    chosen = tuple(m for m in PAPER_METHODS if m.algo in options.methods or m.label in options.methods)
    if not chosen:
        raise ValueError(f"--methods {list(options.methods)} names no paper method; accepted: "
                         f"{[m.algo for m in PAPER_METHODS]} or labels {[m.label for m in PAPER_METHODS]}")
    return chosen


def _method(label: str) -> Method:
    return next(m for m in PAPER_METHODS if m.label == label)


def describe(config: Mapping[str, Any], options: BenchOptions) -> str:
    from algos.config import env_arguments, load_config
    from flowgym.registration import env_arguments_with_defaults

    t = config["trainer"]
    cfg = load_config(config)
    # the env's sizes as the runs saw them: the recipe leaves some to the family's defaults
    e = {**config["env"], **env_arguments_with_defaults(cfg.env.name, env_arguments(cfg.env))}
    version = "quick" if options.quick else ("full" if options.full else "reduced")
    return (
        f"{version} version: FlowDenoise-Compose-v0, {t['iterations']} iterations of {e['num_prompts']} prompts x "
        f"{e['group_size']} samples, {e['num_steps']} steps (SDE window {e['stochastic_steps']}), {t['inner_epochs']} "
        f"inner epoch x {t['num_minibatches']} mini-batches unless the table says otherwise, lr {t['lr']}, LoRA rank "
        f"{e['backend'].get('lora_rank')}, reward {'+'.join(config['reward']['weights'])}; evaluation every "
        f"{t['eval_every']} iterations with the 10-step ODE on {e['eval_samples_per_prompt']} samples of each of the "
        f"category-balanced train and held-out prompts; {options.seeds} seeds (0..{options.seeds - 1}) per point, "
        f"mean ± 95 % t-interval."
    )


# --------------------------------------------------------------------------- pure helpers
def collapse_iteration(rows: Sequence[Mapping[str, Any]], key: str = SCORE, margin: float = COLLAPSE_MARGIN) -> float:
    """The first evaluation iteration (> 0) whose ``key`` is below the run's iteration-0 value by more
    than ``margin``, or where any logged eval metric is non-finite; NaN when the run never collapses."""
    start = initial(rows, key)
    for row in eval_rows(rows):
        if row["iteration"] == 0:
            continue
        values = [v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))]
        bad = any(not math.isfinite(v) for v in values) or row.get(key) is None
        if bad or float(row[key]) < start - margin:
            return float(row["iteration"])
    return math.nan


def per_seed(data: SuiteData, point: Point, fn) -> list[float]:
    """``fn(rows)`` for each seed of ``point`` in seed order (NaN for a missing run)."""
    values = []
    for job in point.jobs:
        result = data.results.get(job.key)
        values.append(fn(result.rows) if result is not None else math.nan)
    return values


def best_point(data: SuiteData, points: Sequence[Point]) -> Point:
    """The rule for every method: the highest mean final strict training score (the default on ties)."""
    def score(p: Point) -> float:
        values = [v for v in per_seed(data, p, lambda r: final(r, SCORE)) if math.isfinite(v)]
        return float(np.mean(values)) if values else -math.inf

    return max(points, key=lambda p: (score(p), p.setting.get("default", False)))


def _interval(data: SuiteData, point: Point, fn) -> Interval:
    return mean_interval(per_seed(data, point, fn))


def _setting_text(point: Point) -> str:
    method = _method(point.method)
    if method.knob is None:
        return "-"
    return f"{method.knob.split('.')[-1]} = {point.setting['value']:g}"


# --------------------------------------------------------------------------- the table
def build_table(options: BenchOptions) -> list[Point]:
    points = []
    for method in _methods(options):
        for value in method.settings(options.full, options.quick, options.sweep_all):
            points.append(_point(method, value, options, setting={"default": value == method.default}))
    return points


def _summary_row(data: SuiteData, p: Point, baseline: Point | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": p.method,
        "setting": _setting_text(p),
        "train": _interval(data, p, lambda r: final(r, SCORE)),
        "heldout": _interval(data, p, lambda r: final(r, HELDOUT)),
        "gain": _interval(data, p, lambda r: final(r, SCORE) - initial(r, SCORE)),
        "drift": _interval(data, p, lambda r: final(r, DRIFT)),
        "fd": _interval(data, p, lambda r: final(r, FD)),
        "colour": _interval(data, p, lambda r: final(r, COLOUR_ENTROPY)),
        "wall": _interval(data, p, lambda r: math.nan),
    }
    walls = [data.results[j.key].wall_s for j in p.jobs if j.key in data.results]
    row["wall"] = mean_interval(walls)
    collapses = per_seed(data, p, collapse_iteration)
    row["collapsed"] = f"{sum(math.isfinite(c) for c in collapses)}/{len(collapses)}"
    if baseline is not None and baseline is not p:
        a = per_seed(data, p, lambda r: final(r, SCORE))
        b = per_seed(data, baseline, lambda r: final(r, SCORE))
        row["vs"] = paired_test(a, b)
        row["vs_drift"] = paired_test(per_seed(data, p, lambda r: final(r, DRIFT)), per_seed(data, baseline, lambda r: final(r, DRIFT)))
    else:
        row["vs"], row["vs_drift"] = "(baseline)", "(baseline)"
    return row


SUMMARY_COLUMNS = [
    ("method", "method"), ("setting", "setting"), ("train", "train strict"), ("heldout", "held-out strict"),
    ("gain", "train gain"), ("drift", "drift KL"), ("fd", "held-out FD"), ("colour", "colour entropy"),
    ("collapsed", "collapsed"), ("wall", "wall s"), ("vs", "train strict - Flow-DPPO (paired)"),
    ("vs_drift", "drift - Flow-DPPO (paired)"),
]


def _canvases(data: SuiteData) -> int:
    """Canvases per category and split of one evaluation: 8 balanced prompts x samples per prompt."""
    if not data.points or not data.points[0].jobs:
        return 0
    return 8 * int(data.points[0].jobs[0].config["env"]["eval_samples_per_prompt"])


def analyse_table(data: SuiteData, out: Path) -> Report:
    by_method: dict[str, list[Point]] = {}
    for p in data.points:
        by_method.setdefault(p.method, []).append(p)
    defaults = {m: next(p for p in pts if p.setting.get("default")) for m, pts in by_method.items()}
    best = {m: best_point(data, pts) for m, pts in by_method.items()}
    base_default, base_best = defaults.get(BASELINE), best.get(BASELINE)

    pretrained_points = list(defaults.values())[:1]
    pre: dict[str, Any] = {"method": "pretrained (iteration 0)", "setting": "-"}
    if pretrained_points:
        p0 = pretrained_points[0]
        pre.update(train=_interval(data, p0, lambda r: initial(r, SCORE)), heldout=_interval(data, p0, lambda r: initial(r, HELDOUT)),
                   fd=_interval(data, p0, lambda r: initial(r, FD)), colour=_interval(data, p0, lambda r: initial(r, COLOUR_ENTROPY)))
    default_table = Table("Each method at its default setting (final evaluation)", SUMMARY_COLUMNS,
                          [pre, *[_summary_row(data, p, base_default) for p in defaults.values()]])
    best_table = Table("Each method at its best setting (highest mean final train strict score of its sweep)", SUMMARY_COLUMNS,
                       [pre, *[_summary_row(data, p, base_best) for p in best.values()]])

    category_columns = [("method", "method"), ("split", "split"), *[(c, c) for c in CATEGORIES]]
    categories = Table("Per category, strict score at the best setting (final evaluation)", category_columns)
    if pretrained_points:
        for split in ("train", "heldout"):
            categories.rows.append({"method": "pretrained", "split": split, **{
                c: _interval(data, pretrained_points[0], lambda r, c=c, s=split: initial(r, f"eval/{s}/compose/{c}")) for c in CATEGORIES}})
    for p in best.values():
        for split in ("train", "heldout"):
            categories.rows.append({"method": p.method, "split": split, **{
                c: _interval(data, p, lambda r, c=c, s=split: final(r, f"eval/{s}/compose/{c}")) for c in CATEGORIES}})

    # the frontier's points as numbers: every setting of every sweep, paired against Flow-DPPO's default
    sweep_table = Table("Every setting of every sweep (the frontier's points; paired columns against Flow-DPPO at its default)",
                        SUMMARY_COLUMNS, [_summary_row(data, p, base_default) for pts in by_method.values()
                                          for p in sorted(pts, key=_knob_value)])

    plots = [_frontier_plot(data, by_method, out), _forgetting_plot(data, defaults, out)]
    headline = {m: {"best": _setting_text(p), "train": _interval(data, p, lambda r: final(r, SCORE)).to_json()} for m, p in best.items()}
    notes = [
        "Intervals: Student-t 95 % intervals of the mean over seeds; 'paired' columns: per-seed differences to Flow-DPPO "
        "(seed i of both methods sees the same prompts and the same pretrained evaluation), their mean ± 95 % interval "
        "and the paired t-test's two-sided p-value.",
        f"strict: every condition of the prompt holds (GenEval's rule); scores are fractions (0-1) of {_canvases(data)} "
        "canvases per category and split (8 category-balanced prompts x the evaluation's samples per prompt). Held-out "
        "prompts: colour-digit and position combinations never seen in pretraining nor in RL.",
        f"collapsed: runs whose strict training score fell more than {COLLAPSE_MARGIN} below their pretrained score at "
        "some evaluation, or logged a non-finite metric. colour entropy on prompts that leave the colour free (1 = uniform): "
        "the mode collapse the strict score does not see.",
        "drift KL: exact KL between the Flow-SDE step Gaussians of the trained and the pretrained model along the "
        "evaluation ODE trajectories, mean over dimensions and steps, measured identically for every method.",
    ]
    return Report([default_table, best_table, categories, sweep_table], plots, notes, headline)


def _knob_value(point: Point) -> float:
    """The sweep's order: the knob's value (a method without a knob has one point)."""
    value = point.setting.get("value")
    return 0.0 if value is None else float(value)


def _frontier_plot(data: SuiteData, by_method: Mapping[str, list[Point]], out: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in by_method.items():
        xs, ys, xe, ye = [], [], [], []
        for p in sorted(pts, key=_knob_value):
            d = _interval(data, p, lambda r: final(r, DRIFT))
            s = _interval(data, p, lambda r: final(r, SCORE))
            xs.append(d.mean), ys.append(s.mean)
            xe.append(d.half_width if math.isfinite(d.half_width) else 0), ye.append(s.half_width if math.isfinite(s.half_width) else 0)
            if p.setting["value"] is not None:
                ax.annotate(f"{p.setting['value']:.0e}", (d.mean, s.mean), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=2, color=method_color(method), label=method)
    ax.set_xlabel("final drift KL to pretrained")
    ax.set_ylabel("final strict score (train prompts)")
    ax.set_title("Frontier over each method's trust-region sweep (95 % intervals)")
    ax.legend(fontsize=6)
    return save_figure(fig, out, "paper_frontier.png")


def _forgetting_plot(data: SuiteData, defaults: Mapping[str, Point], out: Path) -> str:
    plt = pyplot()
    keys = ((SCORE, "train strict"), (HELDOUT, "held-out strict"), (FD, "held-out FD"), (COLOUR_ENTROPY, "colour entropy"))
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.2))
    for ax, (key, label) in zip(axes, keys):
        for p in defaults.values():
            plot_band(ax, data.runs(p), key, p.method, method_color(p.method))
        ax.set_title(label)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=6)
    return save_figure(fig, out, "paper_forgetting.png")


# --------------------------------------------------------------------------- reuse
REUSE_METHODS: tuple[str, ...] = ("Flow-DPPO", "Flow-GRPO")
REUSE_METHODS_FULL: tuple[str, ...] = ("Flow-DPPO", "Flow-GRPO", "GRPO-Guard", "PPO-clip (DDPO)")


def build_reuse(options: BenchOptions) -> list[Point]:
    epochs = (1, 2) if options.quick else (1, 2, 4, 8)
    labels = REUSE_METHODS_FULL if options.full else REUSE_METHODS
    points = []
    for method in (m for m in _methods(options) if m.label in labels):
        for e in epochs:
            points.append(_point(method, method.default, options, extra=[f"trainer.inner_epochs={e}"],
                                 setting={"epochs": e, "default": True}))
    return points


def analyse_reuse(data: SuiteData, out: Path) -> Report:
    table = Table(
        "Updates per batch: inner epochs over the same rollout (2 mini-batches each)",
        [("method", "method"), ("epochs", "inner epochs"), ("train", "final train strict"), ("heldout", "held-out strict"),
         ("drift", "drift KL"), ("colour", "colour entropy"), ("collapsed", "collapsed runs"), ("when", "collapse iteration"),
         ("kl_step", "KL(old, new) per step")],
    )
    for p in data.points:
        collapses = per_seed(data, p, collapse_iteration)
        table.rows.append({
            "method": p.method, "epochs": p.setting["epochs"],
            "train": _interval(data, p, lambda r: final(r, SCORE)),
            "heldout": _interval(data, p, lambda r: final(r, HELDOUT)),
            "drift": _interval(data, p, lambda r: final(r, DRIFT)),
            "colour": _interval(data, p, lambda r: final(r, COLOUR_ENTROPY)),
            "collapsed": f"{sum(math.isfinite(c) for c in collapses)}/{len(collapses)}",
            "when": ", ".join(f"{int(c)}" for c in collapses if math.isfinite(c)) or "never",
            "kl_step": _interval(data, p, lambda r: train_mean(r, "kl_old_new_mean")),
        })
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method in dict.fromkeys(p.method for p in data.points):
        pts = sorted((p for p in data.points if p.method == method), key=lambda p: p.setting["epochs"])
        for ax, key in ((axes[0], SCORE), (axes[1], DRIFT)):
            stats = [_interval(data, p, lambda r, k=key: final(r, k)) for p in pts]
            ax.errorbar([p.setting["epochs"] for p in pts], [s.mean for s in stats],
                        yerr=[s.half_width if math.isfinite(s.half_width) else 0 for s in stats],
                        marker="o", capsize=2, color=method_color(method), label=method)
    for ax, title in zip(axes, ("final train strict score", "final drift KL")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("inner epochs")
        ax.set_title(title)
    axes[0].legend(fontsize=6)
    return Report([table], [save_figure(fig, out, "paper_reuse.png")],
                  [f"collapse: strict training score more than {COLLAPSE_MARGIN} below the run's pretrained score, or a "
                   "non-finite metric; 'collapse iteration' lists the first such evaluation of each collapsed seed."])


# --------------------------------------------------------------------------- multi-objective
#: (label, reward config, second term, its weight): compose partial score against ink at two weightings
MULTI_REWARDS: tuple[tuple[str, str, str, float], ...] = (
    ("ink x 1", "compose_ink", "ink", 1.0),
    ("ink x 4", "compose_ink", "ink", 4.0),
)
MULTI_REWARDS_FULL: tuple[tuple[str, str, str, float], ...] = MULTI_REWARDS + (
    ("jpeg x 1", "compose_jpeg", "jpeg_compressibility", 1.0),
    ("jpeg x 4", "compose_jpeg", "jpeg_compressibility", 4.0),
)


def build_multiobjective(options: BenchOptions) -> list[Point]:
    points = []
    for method in (m for m in _methods(options) if m.label in REUSE_METHODS):
        rewards = MULTI_REWARDS_FULL if options.full else MULTI_REWARDS
        for label, reward, term, weight in (rewards[:1] if options.quick else rewards):
            points.append(_point(method, method.default, options, extra=[f"reward={reward}", f"reward.weights.{term}={weight}"],
                                 setting={"reward": label, "term": term, "weight": weight, "default": True}))
    return points


def analyse_multiobjective(data: SuiteData, out: Path) -> Report:
    table = Table(
        "Compose partial score against a second reward (gains: final - pretrained, train prompts)",
        [("method", "method"), ("reward", "reward"), ("partial", "compose_partial gain"), ("other", "second term gain"),
         ("strict", "strict gain"), ("balanced", "both terms gain"), ("drift", "drift KL")],
    )
    for p in data.points:
        term = p.setting["term"]
        partial = per_seed(data, p, lambda r: final(r, "eval/train/compose_partial") - initial(r, "eval/train/compose_partial"))
        other = per_seed(data, p, lambda r, t=term: final(r, f"eval/train/{t}") - initial(r, f"eval/train/{t}"))
        both = sum(1 for a, b in zip(partial, other) if a > 0 and b > 0)
        table.rows.append({
            "method": p.method, "reward": p.setting["reward"], "partial": mean_interval(partial), "other": mean_interval(other),
            "strict": _interval(data, p, lambda r: final(r, SCORE) - initial(r, SCORE)),
            "balanced": f"{both}/{len(partial)} seeds", "drift": _interval(data, p, lambda r: final(r, DRIFT)),
        })
    plt = pyplot()
    terms = list(dict.fromkeys(p.setting["term"] for p in data.points))
    fig, axes = plt.subplots(1, len(terms), figsize=(5 * len(terms), 3.6), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for p in (p for p in data.points if p.setting["term"] == term):
            xs = per_seed(data, p, lambda r: final(r, "eval/train/compose_partial"))
            ys = per_seed(data, p, lambda r, t=term: final(r, f"eval/train/{t}"))
            ax.scatter(xs, ys, color=method_color(p.method), marker="o" if p.setting["weight"] == 1.0 else "^", s=14,
                       label=f"{p.method}, {p.setting['reward']}")
        starts = [(initial(r.rows, "eval/train/compose_partial"), initial(r.rows, f"eval/train/{term}")) for p in data.points
                  if p.setting["term"] == term for r in data.runs(p)]
        if starts:
            ax.scatter(*zip(*starts), color="k", marker="*", s=30, label="pretrained")
        ax.set_xlabel("final compose_partial (train)")
        ax.set_ylabel(f"final {term} (train)")
        ax.set_title(f"Pareto view: compose against {term} (one point per seed)")
        ax.legend(fontsize=6)
    return Report([table], [save_figure(fig, out, "paper_multiobjective.png")],
                  ["weights: compose_partial 1 and the second term 1 or 4 (weighted-sum group advantages); 'both terms gain': "
                   "seeds where neither objective was sacrificed (both gains positive)."])


# --------------------------------------------------------------------------- ratio noise over training
def build_ratio_noise(options: BenchOptions) -> list[Point]:
    warmups = (0, 1) if options.quick else ((0, 10, 20, 40) if options.full else (0, 8, 16))
    method = _method("Flow-DPPO")
    return [_point(method, method.default, options, setting={"warmup": w, "default": True}, kind="ratio_noise",
                   params={"warmup": w, "probe_steps": [1]}) for w in warmups]


def analyse_ratio_noise(data: SuiteData, out: Path) -> Report:
    from algos.bench.suites import DEFAULT_CLIP, DEFAULT_DELTA

    table = Table(
        f"Clip decisions (|ratio - 1| > {DEFAULT_CLIP:g}) against divergence decisions (D >= {DEFAULT_DELTA:g}) on the next "
        "mini-batch, after one optimiser step, over training",
        [("warmup", "training iterations before"), ("ratio_outside", "ratio outside band"), ("kl_outside", "D >= delta"),
         ("disagree", "decisions disagree"), ("spearman", "Spearman(|log r|, D)")],
    )
    curve = []
    for p in sorted(data.points, key=lambda p: p.setting["warmup"]):
        rows, spearmen = [], []
        for run in data.runs(p):
            probe = run.result["probes"]["1"]
            unseen = ~np.asarray(probe["seen"], dtype=bool)
            select = unseen if unseen.any() else np.ones_like(unseen)
            arrays = {k: np.asarray(probe[k])[select] for k in ("log_ratio", "kl", "advantage")}
            rows.append(rn.decision_stats(arrays["log_ratio"], arrays["kl"], arrays["advantage"], DEFAULT_CLIP, DEFAULT_DELTA))
            spearmen.append(rn.spearman(np.abs(arrays["log_ratio"]), arrays["kl"]))
        disagree = mean_interval([r["disagree"] for r in rows])
        curve.append((p.setting["warmup"], disagree))
        table.rows.append({"warmup": p.setting["warmup"], "ratio_outside": mean_interval([r["ratio_outside"] for r in rows]),
                           "kl_outside": mean_interval([r["kl_outside"] for r in rows]), "disagree": disagree,
                           "spearman": mean_interval(spearmen)})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.errorbar([w for w, _ in curve], [d.mean for _, d in curve],
                yerr=[d.half_width if math.isfinite(d.half_width) else 0 for _, d in curve], marker="o", capsize=2)
    ax.set_xlabel("training iterations before the probe")
    ax.set_ylabel("share of clip decisions the exact KL disagrees with")
    ax.set_title("Ratio noise on compose")
    return Report([table], [save_figure(fig, out, "paper_ratio_noise.png")],
                  ["The probe (algos.bench.ratio_noise) trains the given number of iterations of Flow-DPPO, collects one more "
                   "rollout, takes one optimiser step on its first mini-batch and compares, on the pairs not trained on, "
                   "Flow-GRPO's clip decision with the divergence decision."])


# --------------------------------------------------------------------------- components
#: per-step loss weightings (every ratio-based loss's ``step_weighting``) crossed with the sampler
WEIGHTINGS: tuple[str, ...] = ("none", "tempflow", "guard")
COMPONENT_METHODS: tuple[str, ...] = ("Flow-DPPO", "Flow-GRPO")


def _mixgrpo_window(options: BenchOptions) -> list[str]:
    """MixGRPO's sliding window over the recipe's range: it visits every position of [0, 6) once
    during the run (slide every iterations / 5; the quick test slides every iteration)."""
    size = dict(o.split("=", 1) for o in _size(options))
    iterations = int(size["trainer.iterations"])
    return [f"+env.stochastic_steps.slide_every={max(1, iterations // 5)}", "+env.stochastic_steps.stride=1"]


def build_components(options: BenchOptions) -> list[Point]:
    weightings = WEIGHTINGS[:2] if options.quick else WEIGHTINGS
    points = []
    for method in (m for m in _methods(options) if m.label in COMPONENT_METHODS):
        for weighting in weightings:
            points.append(_point(method, method.default, options, extra=[f"algo.loss.step_weighting={weighting}"],
                                 setting={"weighting": weighting, "sampler": "random window", "default": weighting == "none"}))
        points.append(_point(method, method.default, options, extra=["algo.loss.step_weighting=none", *_mixgrpo_window(options)],
                             setting={"weighting": "none", "sampler": "MixGRPO sliding", "default": False}))
    return points


def analyse_components(data: SuiteData, out: Path) -> Report:
    table = Table(
        "Trust region, step weighting and sampler separated (each against the same method with no weighting and "
        "the recipe's random window, seeds paired)",
        [("method", "method"), ("weighting", "step weighting"), ("sampler", "SDE window"), ("train", "final train strict"),
         ("heldout", "held-out strict"), ("gain", "train gain"), ("drift", "drift KL"), ("vs", "train strict - plain (paired)"),
         ("vs_drift", "drift - plain (paired)")],
    )
    plain = {p.method: p for p in data.points if p.setting.get("default")}
    for p in data.points:
        base = plain.get(p.method)
        row = {
            "method": p.method, "weighting": p.setting["weighting"], "sampler": p.setting["sampler"],
            "train": _interval(data, p, lambda r: final(r, SCORE)), "heldout": _interval(data, p, lambda r: final(r, HELDOUT)),
            "gain": _interval(data, p, lambda r: final(r, SCORE) - initial(r, SCORE)),
            "drift": _interval(data, p, lambda r: final(r, DRIFT)),
        }
        if base is None or base is p:
            row["vs"] = row["vs_drift"] = "(plain)"
        else:
            row["vs"] = paired_test(per_seed(data, p, lambda r: final(r, SCORE)), per_seed(data, base, lambda r: final(r, SCORE)))
            row["vs_drift"] = paired_test(per_seed(data, p, lambda r: final(r, DRIFT)), per_seed(data, base, lambda r: final(r, DRIFT)))
        table.rows.append(row)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = {"none": "o", "tempflow": "s", "guard": "^"}
    for p in data.points:
        d, s = _interval(data, p, lambda r: final(r, DRIFT)), _interval(data, p, lambda r: final(r, SCORE))
        ax.errorbar([d.mean], [s.mean], xerr=[d.half_width if math.isfinite(d.half_width) else 0],
                    yerr=[s.half_width if math.isfinite(s.half_width) else 0], capsize=2, color=method_color(p.method),
                    marker=markers.get(p.setting["weighting"], "o"), mfc="none" if p.setting["sampler"] != "random window" else None,
                    label=f"{p.method}, {p.setting['weighting']}, {p.setting['sampler']}")
    ax.set_xlabel("final drift KL to pretrained")
    ax.set_ylabel("final strict score (train prompts)")
    ax.set_title("Weighting and sampler, per trust region (95 % intervals)")
    ax.legend(fontsize=5)
    return Report([table], [save_figure(fig, out, "paper_components.png")],
                  ["step weighting: none, TempFlow's noise-aware 2.25 s_t, GRPO-Guard's 1 / mean(sqrt(-dt))^2 (algo.loss.step_weighting); "
                   "SDE window: the recipe's random 2-step window in steps [0, 6) per episode, or MixGRPO's window sliding "
                   "deterministically over the same range during the run (env.stochastic_steps.slide_every)."])


PAPER_SUITES: tuple[Suite, ...] = (
    Suite("paper_table", "The paper table on the compositional task",
          "Flow-DPPO reaches a higher final score than PPO-clip, Flow-GRPO, CPS and the newer trust regions, at a smaller drift.",
          build_table, analyse_table, describe),
    Suite("paper_reuse", "Updates per batch on the compositional task",
          "Flow-DPPO stays stable when a batch is reused for several epochs, where ratio clipping collapses.",
          build_reuse, analyse_reuse, describe),
    Suite("paper_multiobjective", "Two objectives on the compositional task",
          "Flow-DPPO balances several objectives instead of sacrificing one.",
          build_multiobjective, analyse_multiobjective, describe),
    Suite("paper_ratio_noise", "The ratio-noise mechanism on the compositional task",
          "The single-sample ratio is a noisy estimate of the divergence, so clip decisions are mostly noise.",
          build_ratio_noise, analyse_ratio_noise, describe),
)
#: not in the reduced ``paper`` group (it would pass the hour): ``python -m algos.bench paper_components``
COMPONENTS_SUITE = Suite(
    "paper_components", "Trust region, step weighting and sampler on the compositional task",
    "A method's gain comes from its trust region, not from its per-step weighting or its SDE window.",
    build_components, analyse_components, describe)
#: what ``python -m algos.bench paper`` runs
PAPER: tuple[str, ...] = tuple(s.name for s in PAPER_SUITES)
SUITES.update({s.name: s for s in (*PAPER_SUITES, COMPONENTS_SUITE)})
GROUPS["paper"] = PAPER
