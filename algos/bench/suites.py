"""The benchmark suites: which runs each claim needs, and how its report (tables, plots) is made.

Each suite mirrors one claim of the Flow-DPPO paper (see BENCHMARKS.md) and compares Flow-DPPO
(``flow_dppo``: exact-KL asymmetric mask) with ratio clipping (``grpo``: Flow-GRPO's PPO clip) on
the embedded digits task with the conflicting ``digits_bold`` reward (digit alignment + ink):

========================  ==================================================================
``frontier``              final reward against final drift KL from the pretrained model,
                          sweeping GRPO's clip range and Flow-DPPO's threshold delta
``reuse``                 1, 2 and 4 inner epochs on full and half rollouts
``multiobjective``        weighted-sum (``group``) against GDPO advantages, per-objective gains
``forgetting``            held-out digit accuracy / FD and train FD over training
``ratio_noise``           sampled log-ratio against the exact per-step KL; clip decisions
``compare``               any registered methods (``--algos``) at their default configs
========================  ==================================================================

Sizes: every training run uses the same trainer and evaluation settings (``FULL_SIZE``; the
``--quick`` variant ``QUICK_SIZE`` is only a smoke test) so runs are shared across suites.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from algos.bench import ratio_noise as rn
from algos.bench.jobs import BenchOptions, Job, RunResult, compose_config

__all__ = ["SUITES", "ALL", "Point", "Suite", "SuiteData", "Stat", "Table", "expand", "method_color", "plot_band", "pyplot", "save_figure", "stat"]

#: the training size of every suite: 40 iterations of 8 prompts x 8 samples, 10 steps, 2 mini-batches,
#: evaluation (16 ODE samples per train / held-out prompt) every 5 iterations
FULL_SIZE: tuple[str, ...] = ("trainer.iterations=40", "trainer.eval_every=5")
QUICK_SIZE: tuple[str, ...] = (
    "trainer.iterations=2",
    "trainer.eval_every=2",
    "env.num_prompts=2",
    "env.group_size=4",
    "env.num_steps=3",
    "env.eval_samples_per_prompt=2",
    "env.stochastic_steps=all_but_last",
)
COMMON: tuple[str, ...] = ("logger.backends=[]", "logger.sample_grid=false", "logger.report=false", "trainer.checkpoint_every=0")

METHOD_NAMES = {
    "flow_dppo": "Flow-DPPO",
    "grpo": "Flow-GRPO",
    "cps": "Flow-CPS",
    "ppo_clip": "PPO-clip (DDPO)",
    "drpo": "DRPO",
}
COLORS = {"Flow-DPPO": "tab:blue", "Flow-GRPO": "tab:orange", "no trust region": "tab:gray", "DRPO": "tab:green",
          "Flow-CPS": "tab:red", "PPO-clip (DDPO)": "tab:purple",
          # the paper suites' other methods: one colour each (a hash of ten colours would pair them up)
          "GRPO + CPS": "tab:red", "GRPO-Guard": "tab:brown", "AWM": "tab:pink", "DiffusionNFT": "tab:olive",
          "Flow-DPPO + CPS": "tab:cyan"}
DEFAULT_CLIP = 1e-4    # Flow-GRPO's published clip range
DEFAULT_DELTA = 1e-5   # Flow-DPPO's official threshold


def method_name(algo: str) -> str:
    return METHOD_NAMES.get(algo, algo)


# --------------------------------------------------------------------------- statistics and tables
@dataclass
class Stat:
    """Mean and sample standard deviation (ddof 1; 0 for one value) over seeds, NaNs dropped."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a"
        return f"{_fmt(self.mean)} ± {_fmt(self.std, 2)}"

    def to_json(self) -> dict[str, float]:
        return {"mean": _finite_or_none(self.mean), "std": _finite_or_none(self.std), "n": self.n}


def stat(values: Sequence[float | None]) -> Stat:
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not clean:
        return Stat(math.nan, math.nan, 0)
    array = np.asarray(clean)
    return Stat(float(array.mean()), float(array.std(ddof=1)) if len(clean) > 1 else 0.0, len(clean))


def _fmt(value: float, digits: int = 4) -> str:
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{max(digits - 1, 1)}e}"
    return f"{value:.{digits}g}"


def _escape(text: str) -> str:
    """A markdown table cell: literal pipes escaped."""
    return text.replace("|", "\\|")


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass
class Table:
    """A report table: ``columns`` are (key, header) pairs; cells are strings, numbers or ``Stat``s."""

    title: str
    columns: list[tuple[str, str]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    #: cells averaging fewer values than this say so ("(n=1)")
    expected_n: int = 0

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(_escape(h) for _, h in self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            cells = []
            for key, _ in self.columns:
                value = row.get(key, "")
                text = _fmt(value) if isinstance(value, float) else str(value)
                if isinstance(value, Stat) and 0 < value.n < self.expected_n:
                    text += f" (n={value.n})"
                cells.append(_escape(text))
            lines.append("| " + " | ".join(cells) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def cell(value: Any) -> Any:
            if hasattr(value, "to_json"):
                return value.to_json()
            if isinstance(value, float):
                return _finite_or_none(value)
            return value

        return {
            "title": self.title,
            "columns": [key for key, _ in self.columns],
            "headers": [header for _, header in self.columns],
            "rows": [{key: cell(row.get(key)) for key, _ in self.columns} for row in self.rows],
        }


# --------------------------------------------------------------------------- points and suites
@dataclass
class Point:
    """One setting of one method, run over seeds (one ``Job`` per seed)."""

    method: str
    algo: str
    setting: dict[str, Any]
    jobs: list[Job]


def make_point(
    method: str,
    algo: str,
    overrides: Sequence[str],
    setting: Mapping[str, Any],
    options: BenchOptions,
    *,
    kind: str = "train",
    params: Mapping[str, Any] | None = None,
    size: Sequence[str] | None = None,
) -> Point:
    """Compose the point's config once and derive one job per seed (``seed`` is a top-level key only).

    ``size`` replaces the digits suites' ``FULL_SIZE`` / ``QUICK_SIZE`` (the compose suites pass their own).
    """
    if size is None:
        size = QUICK_SIZE if options.quick else FULL_SIZE
    full = [*COMMON, f"device={options.device}", *size, *overrides, *options.overrides]
    base = compose_config(algo, full, seed=0)
    if base["algo"].get("advantage") is None:
        # spell out the loss's default estimator, so equal runs get equal cache keys across suites
        base["algo"]["advantage"] = default_advantage(base["algo"])
    jobs = []
    for seed in range(options.seeds):
        config = copy.deepcopy(base)
        config["seed"] = seed
        jobs.append(Job(kind=kind, config=config, params=dict(params or {})))
    return Point(method=method, algo=algo, setting=dict(setting), jobs=jobs)


def default_advantage(algo_cfg: Mapping[str, Any]) -> str:
    """The advantage estimator the configured loss uses when ``algo.advantage`` is null."""
    import importlib

    from algos.losses import get_loss_class

    if algo_cfg.get("module"):
        importlib.import_module(algo_cfg["module"])
    return get_loss_class(algo_cfg["name"]).default_advantage


@dataclass
class SuiteData:
    """A suite's points and every finished run (by job key)."""

    suite: "Suite"
    options: BenchOptions
    points: list[Point]
    results: Mapping[str, RunResult]

    def runs(self, point: Point) -> list[RunResult]:
        return [self.results[job.key] for job in point.jobs if job.key in self.results]

    def find(self, **setting: Any) -> list[Point]:
        return [p for p in self.points if all(p.setting.get(k) == v for k, v in setting.items())]


@dataclass
class Report:
    tables: list[Table]
    plots: list[str]
    notes: list[str] = field(default_factory=list)
    headline: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    title: str
    claim: str
    build: Callable[[BenchOptions], list[Point]]
    analyse: Callable[[SuiteData, Path], Report]
    #: the report's "Setting:" line from one job's config and the options (None: the digits description)
    describe: Callable[[Mapping[str, Any], BenchOptions], str] | None = None

    def write_report(self, data: SuiteData, out: Path, *, machine: Mapping[str, str], command: str, run_wall_s: float) -> dict[str, Any]:
        """Write ``<out>/<name>.md`` and ``<out>/<name>.json`` (plots are written by ``analyse``)."""
        report = self.analyse(data, out)
        runs = [r for p in data.points for r in data.runs(p)]
        run_seconds = sum(r.wall_s for r in runs)
        sample = data.points[0].jobs[0].config
        t, e = sample["trainer"], sample["env"]
        size = self.describe(sample, data.options) if self.describe is not None else (
            f"{t['iterations']} iterations of {e['num_prompts']} prompts x {e['group_size']} samples, {e['num_steps']} steps "
            f"({e['stochastic_steps']} stochastic), {t['inner_epochs']} inner epoch x {t['num_minibatches']} mini-batches "
            f"unless the table says otherwise, lr {t['lr']}, reward {'+'.join(sample['reward']['weights'])}; evaluation every "
            f"{t['eval_every']} iterations: {e['eval_samples_per_prompt']} ODE samples per prompt on the train (0-4) and "
            f"held-out (5-9) digits; {data.options.seeds} seeds (0..{data.options.seeds - 1}) per point, mean ± std (ddof 1)."
        )
        lines = [f"# {self.title}", "", f"Claim tested: {self.claim}", "", f"Setting: {size}", ""]
        for table in report.tables:
            table.expected_n = table.expected_n or data.options.seeds
            lines += [table.markdown(), ""]
        for plot in report.plots:
            lines += [f"![{plot}]({plot})", ""]
        if report.notes:
            lines += ["Notes:", "", *[f"- {n}" for n in report.notes], ""]
        lines += [
            f"Runs: {len(runs)} ({sum(r.wall_s for r in runs if not r.cached) / 60:.1f} min of run time executed now, "
            f"{run_seconds / 60:.1f} min in all). Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
            f"python {machine['python']}. Command: `{command}`.",
            "",
        ]
        (out / f"{self.name}.md").write_text("\n".join(lines))
        payload = {
            "suite": self.name,
            "title": self.title,
            "claim": self.claim,
            "setting": size,
            "tables": [t.to_json() for t in report.tables],
            "plots": report.plots,
            "notes": report.notes,
            "headline": report.headline,
            "machine": dict(machine),
            "command": command,
            "runs": [{"key": r.key, "seed": r.seed, "wall_s": r.wall_s, "cached": r.cached} for r in runs],
        }
        (out / f"{self.name}.json").write_text(json.dumps(payload, indent=1, default=_json_default))
        return payload


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_json"):  # Stat, and the intervals / paired tests of algos.bench.stats
        return value.to_json()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- metric helpers
def eval_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("eval/train/reward") is not None]


def final(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    evals = eval_rows(rows)
    value = evals[-1].get(key) if evals else None
    return math.nan if value is None else float(value)


def initial(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    evals = [r for r in eval_rows(rows) if r["iteration"] == 0]
    value = evals[0].get(key) if evals else None
    return math.nan if value is None else float(value)


def gain(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return final(rows, key) - initial(rows, key)


def peak(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in eval_rows(rows) if r.get(key) is not None]
    return max(values) if values else math.nan


def train_mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    """Mean over training iterations of a per-iteration diagnostic (NaN/None ignored)."""
    values = [float(r[key]) for r in rows if r.get("iteration", 0) > 0 and r.get(key) is not None]
    return float(np.mean(values)) if values else math.nan


def curve(runs: Sequence[RunResult], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(iterations, mean, std)`` of an evaluation metric over seeds, at the evaluation iterations."""
    per_seed = []
    for run in runs:
        per_seed.append({r["iteration"]: float(r[key]) for r in eval_rows(run.rows) if r.get(key) is not None})
    if not per_seed:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    iterations = sorted(set.intersection(*(set(s) for s in per_seed)))
    values = np.array([[s[i] for i in iterations] for s in per_seed])
    std = values.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(iterations))
    return np.asarray(iterations), values.mean(axis=0), std


def value_at_drift(rows: Sequence[Mapping[str, Any]], drift: float, key: str = "eval/train/reward", drift_key: str = "eval/train/drift_kl") -> float:
    """``key`` linearly interpolated at the first evaluation where ``drift_key`` reaches ``drift`` (NaN if never)."""
    points = [(float(r[drift_key]), float(r[key])) for r in eval_rows(rows) if r.get(drift_key) is not None and r.get(key) is not None]
    for (d0, v0), (d1, v1) in zip(points, points[1:]):
        if d0 <= drift <= d1:
            return v0 if d1 == d0 else v0 + (v1 - v0) * (drift - d0) / (d1 - d0)
    return math.nan


def over_seeds(runs: Sequence[RunResult], fn: Callable[[Sequence[Mapping[str, Any]]], float]) -> Stat:
    return stat([fn(run.rows) for run in runs])


# --------------------------------------------------------------------------- plotting
def pyplot():
    """matplotlib.pyplot on the headless Agg backend with the reports' small fonts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7})
    return plt


def save_figure(fig, out: Path, name: str) -> str:
    """Write ``fig`` to ``out / name`` (80 dpi), close it, return ``name`` (for the report's link)."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=80)
    pyplot().close(fig)
    return name


def method_color(method: str) -> str:
    """The plot colour of a method: its fixed one, else one of matplotlib's ten picked by a stable hash."""
    return COLORS.get(method, None) or f"C{zlib.crc32(method.encode()) % 10}"


def plot_band(ax, runs: Sequence[RunResult], key: str, label: str, color: str | None, linestyle: str = "-") -> None:
    """The seed-mean curve of ``key`` over iterations, with a band of one standard deviation."""
    x, mean, std = curve(runs, key)
    if len(x) == 0:
        return
    ax.plot(x, mean, linestyle, color=color, label=label, marker=".")
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)


# --------------------------------------------------------------------------- frontier
def _frontier_grid(options: BenchOptions) -> tuple[list[float], list[float]]:
    if options.quick:
        return [1e-4, 1e-2], [1e-5]
    return [1e-5, 1e-4, 1e-3, 1e-2], [1e-6, 1e-5, 1e-4, 1e-3]


def build_frontier(options: BenchOptions) -> list[Point]:
    clips, deltas = _frontier_grid(options)
    points = [make_point("Flow-GRPO", "grpo", [f"algo.loss.clip_range={c}"], {"param": "clip_range", "value": c}, options) for c in clips]
    points += [make_point("Flow-DPPO", "flow_dppo", [f"algo.loss.delta={d}"], {"param": "delta", "value": d}, options) for d in deltas]
    # both families' limit: the plain importance-weighted policy gradient (no clip, no mask)
    points.append(make_point("no trust region", "flow_dppo", ["algo.loss.delta=inf"], {"param": "delta", "value": math.inf}, options))
    return points


def analyse_frontier(data: SuiteData, out: Path) -> Report:
    table = Table(
        "Final evaluation (train prompts) against drift from the pretrained model",
        [("method", "method"), ("param", "trust-region parameter"), ("reward", "eval reward"), ("gain", "reward gain"),
         ("drift", "drift KL"), ("efficiency", "gain / drift KL"), ("fd", "held-out FD"), ("clip", "ratio outside clip band"),
         ("mask", "masked (Flow-DPPO)")],
    )
    for p in data.points:
        runs = data.runs(p)
        table.rows.append({
            "method": p.method,
            "param": f"{p.setting['param']} = {_fmt(p.setting['value'], 2) if math.isfinite(p.setting['value']) else 'inf'}",
            "reward": over_seeds(runs, lambda r: final(r, "eval/train/reward")),
            "gain": over_seeds(runs, lambda r: gain(r, "eval/train/reward")),
            "drift": over_seeds(runs, lambda r: final(r, "eval/train/drift_kl")),
            "efficiency": over_seeds(runs, lambda r: gain(r, "eval/train/reward") / final(r, "eval/train/drift_kl")),
            "fd": over_seeds(runs, lambda r: final(r, "eval/heldout/digit_fd")),
            "clip": over_seeds(runs, lambda r: train_mean(r, "clip_frac_high") + train_mean(r, "clip_frac_low")),
            "mask": over_seeds(runs, lambda r: (train_mean(r, "mask_frac_pos") + train_mean(r, "mask_frac_neg")) / 2),
        })
    # matched drift: reward along training when the default configurations reach the same drift
    defaults = [p for p in data.points if (p.method, p.setting["value"]) in (("Flow-GRPO", DEFAULT_CLIP), ("Flow-DPPO", DEFAULT_DELTA), ("no trust region", math.inf))]
    matched = Table(
        "Reward at equal drift (default settings, interpolated along training)",
        [("method", "method"), ("param", "parameter"), ("drift", "final drift KL"), ("at", "reward at drift D*")],
    )
    # D*: the smallest final drift of any of these runs, so that every run passes it during training
    finals = [final(r.rows, "eval/train/drift_kl") for p in defaults for r in data.runs(p)]
    target = min((t for t in finals if math.isfinite(t)), default=math.nan)
    headline: dict[str, Any] = {"matched_drift": target}
    for p in defaults:
        runs = data.runs(p)
        at = over_seeds(runs, lambda r: value_at_drift(r, target))
        matched.rows.append({"method": p.method, "param": f"{p.setting['param']} = {p.setting['value']:g}",
                             "drift": over_seeds(runs, lambda r: final(r, "eval/train/drift_kl")), "at": at})
        headline[f"{p.method} reward at D*"] = at.to_json()
    matched.note = (f"D* = {_fmt(target)}, the smallest final drift of any run above; each run's evaluation curve "
                    "(reward against drift) is interpolated where it first reaches D*.")

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    start = stat([initial(r.rows, "eval/train/reward") for p in data.points for r in data.runs(p)])
    ax.scatter([0], [start.mean], marker="*", s=80, color="k", label="pretrained", zorder=3)
    for method in dict.fromkeys(p.method for p in data.points):
        pts = sorted((p for p in data.points if p.method == method), key=lambda p: p.setting["value"])
        xs, ys, xe, ye = [], [], [], []
        for p in pts:
            runs = data.runs(p)
            d = stat([final(r.rows, "eval/train/drift_kl") for r in runs])
            w = stat([final(r.rows, "eval/train/reward") for r in runs])
            xs.append(d.mean), ys.append(w.mean), xe.append(d.std), ye.append(w.std)
            value = p.setting["value"]
            ax.annotate(f"{value:.0e}" if math.isfinite(value) else "inf", (d.mean, w.mean), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", color=method_color(method), label=method, capsize=2)
    ax.set_xlabel("final drift KL to pretrained (mean over dims and steps)")
    ax.set_ylabel("final eval reward (train prompts)")
    ax.set_title("Frontier: sweep of clip range / delta")
    ax.legend()
    ax = axes[1]
    for p in defaults:
        runs = data.runs(p)
        _, d, _ = curve(runs, "eval/train/drift_kl")
        _, w, _ = curve(runs, "eval/train/reward")
        ax.plot(d, w, marker=".", color=method_color(p.method), label=f"{p.method} ({p.setting['param']} {p.setting['value']:g})")
    if math.isfinite(target):
        ax.axvline(target, color="k", lw=0.6, ls=":")
    ax.set_xlabel("drift KL to pretrained")
    ax.set_ylabel("eval reward")
    ax.set_title("Along training (default settings)")
    ax.legend()
    plots = [save_figure(fig, out, "frontier.png")]
    notes = [
        "drift KL: exact KL between the Flow-SDE(0.7) step Gaussians of the current and the pretrained model along "
        "the evaluation ODE trajectories, mean over dimensions and steps; identical for every method.",
        "'ratio outside clip band' is Flow-GRPO's logged clip_frac_high + clip_frac_low (|ratio - 1| > eps, whatever the "
        "sign of A); 'masked' is Flow-DPPO's mean of mask_frac_pos and mask_frac_neg (gradient actually removed).",
        "'no trust region' is the plain importance-weighted policy gradient (Flow-DPPO with delta = inf, which is also "
        "Flow-GRPO with an infinite clip range): the limit both sweeps tend to.",
    ]
    return Report([table, matched], plots, notes, headline)


# --------------------------------------------------------------------------- reuse
def _reuse_grid(options: BenchOptions) -> tuple[list[int], list[tuple[str, float, list[int]]]]:
    """``(all epoch counts, [(rollout label, prompt fraction, its epoch counts)])``."""
    if options.quick:
        return [1, 2], [("full", 1.0, [1, 2]), ("half", 0.5, [1, 2])]
    return [1, 2, 4, 8], [("full", 1.0, [1, 2, 4, 8]), ("half", 0.5, [1, 2, 4])]


def build_reuse(options: BenchOptions) -> list[Point]:
    _, sizes = _reuse_grid(options)
    num_prompts = 2 if options.quick else 8
    points = []
    for algo, loss in (("flow_dppo", f"algo.loss.delta={DEFAULT_DELTA}"), ("grpo", f"algo.loss.clip_range={DEFAULT_CLIP}")):
        for label, fraction, epochs in sizes:
            for e in epochs:
                prompts = max(int(num_prompts * fraction), 1)
                overrides = [loss, f"trainer.inner_epochs={e}", f"env.num_prompts={prompts}"]
                points.append(make_point(method_name(algo), algo, overrides, {"epochs": e, "rollout": label, "prompts": prompts}, options))
    return points


def analyse_reuse(data: SuiteData, out: Path) -> Report:
    table = Table(
        "Sample reuse: inner epochs over the same rollout (2 mini-batches each)",
        [("method", "method"), ("rollout", "rollout"), ("epochs", "inner epochs"), ("reward", "final eval reward"),
         ("peak", "peak eval reward"), ("drop", "peak - final"), ("drift", "drift KL"), ("fd", "held-out FD"),
         ("kl_step", "KL(old, new) per step"), ("blocked", "clip / mask active")],
    )
    for p in data.points:
        runs = data.runs(p)
        blocked_key = ("clip_frac_high", "clip_frac_low") if p.algo != "flow_dppo" else ("mask_frac_pos", "mask_frac_neg")
        table.rows.append({
            "method": p.method,
            "rollout": f"{p.setting['rollout']} ({p.setting['prompts']} prompts)",
            "epochs": p.setting["epochs"],
            "reward": over_seeds(runs, lambda r: final(r, "eval/train/reward")),
            "peak": over_seeds(runs, lambda r: peak(r, "eval/train/reward")),
            "drop": over_seeds(runs, lambda r: peak(r, "eval/train/reward") - final(r, "eval/train/reward")),
            "drift": over_seeds(runs, lambda r: final(r, "eval/train/drift_kl")),
            "fd": over_seeds(runs, lambda r: final(r, "eval/heldout/digit_fd")),
            "kl_step": over_seeds(runs, lambda r: train_mean(r, "kl_old_new_mean")),
            "blocked": over_seeds(runs, lambda r, k=blocked_key: (train_mean(r, k[0]) + train_mean(r, k[1])) / (2 if p.algo == "flow_dppo" else 1)),
        })
    plt = pyplot()
    epochs, sizes = _reuse_grid(data.options)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for method in dict.fromkeys(p.method for p in data.points):
        for label, _, _ in sizes:
            pts = sorted((p for p in data.points if p.method == method and p.setting["rollout"] == label), key=lambda p: p.setting["epochs"])
            for ax, key, fn in ((axes[0], "reward", final), (axes[1], "drift", final)):
                metric = "eval/train/reward" if key == "reward" else "eval/train/drift_kl"
                stats = [stat([fn(r.rows, metric) for r in data.runs(p)]) for p in pts]
                ax.errorbar([p.setting["epochs"] for p in pts], [s.mean for s in stats], yerr=[s.std for s in stats],
                            marker="o", capsize=2, color=method_color(method), ls="-" if label == "full" else "--", label=f"{method}, {label} rollout")
            longest = [p for p in pts if p.setting["epochs"] == 4] or [p for p in pts if p.setting["epochs"] == max(epochs)]
            if longest:
                plot_band(axes[2], data.runs(longest[0]), "eval/train/reward", f"{method}, {label}", method_color(method), "-" if label == "full" else "--")
    axes[0].set_title("final eval reward")
    axes[1].set_title("final drift KL")
    axes[0].set_xscale("log", base=2)
    axes[1].set_xscale("log", base=2)
    axes[2].set_title(f"eval reward over training, {4 if 4 in epochs else max(epochs)} inner epochs")
    for ax in axes[:2]:
        ax.set_xlabel("inner epochs")
        ax.set_xticks(epochs, [str(e) for e in epochs])
    axes[2].set_xlabel("iteration")
    axes[0].legend()
    plots = [save_figure(fig, out, "reuse.png")]
    notes = ["'half' rollouts halve the prompts per rollout (the group size stays 8), so each iteration sees half the samples.",
             "'clip / mask active': Flow-GRPO's clip_frac_high + clip_frac_low, Flow-DPPO's mean of mask_frac_pos and mask_frac_neg."]
    return Report([table], plots, notes)


# --------------------------------------------------------------------------- multi-objective
def build_multiobjective(options: BenchOptions) -> list[Point]:
    points = []
    for algo, loss in (("flow_dppo", f"algo.loss.delta={DEFAULT_DELTA}"), ("grpo", f"algo.loss.clip_range={DEFAULT_CLIP}")):
        for advantage, label in (("group", "weighted sum"), ("gdpo", "GDPO")):
            points.append(make_point(method_name(algo), algo, [loss, f"algo.advantage={advantage}"], {"advantage": label}, options))
    return points


def analyse_multiobjective(data: SuiteData, out: Path) -> Report:
    terms = list(data.points[0].jobs[0].config["reward"]["weights"])
    columns = [("method", "method"), ("advantage", "advantage")]
    for t in terms:
        columns += [(f"{t}", f"{t} (final)"), (f"gain_{t}", f"{t} gain")]
    columns += [("gain_total", "total reward gain"), ("balance", "min / max gain"), ("drift", "drift KL"), ("fd", "held-out FD")]
    table = Table("Per-objective results on the train prompts (gains: final - pretrained)", columns)

    def balance(rows: Sequence[Mapping[str, Any]]) -> float:
        gains = [gain(rows, f"eval/train/{t}") for t in terms]
        top = max(gains)
        return min(gains) / top if top > 0 else math.nan

    for p in data.points:
        runs = data.runs(p)
        row: dict[str, Any] = {"method": p.method, "advantage": p.setting["advantage"]}
        for t in terms:
            row[t] = over_seeds(runs, lambda r, t=t: final(r, f"eval/train/{t}"))
            row[f"gain_{t}"] = over_seeds(runs, lambda r, t=t: gain(r, f"eval/train/{t}"))
        row["gain_total"] = over_seeds(runs, lambda r: gain(r, "eval/train/reward"))
        row["balance"] = over_seeds(runs, balance)
        row["drift"] = over_seeds(runs, lambda r: final(r, "eval/train/drift_kl"))
        row["fd"] = over_seeds(runs, lambda r: final(r, "eval/heldout/digit_fd"))
        table.rows.append(row)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    width = 0.8 / max(len(data.points), 1)
    for i, p in enumerate(data.points):
        runs = data.runs(p)
        stats = [stat([gain(r.rows, f"eval/train/{t}") for r in runs]) for t in terms]
        xs = np.arange(len(terms)) + (i - (len(data.points) - 1) / 2) * width
        ax.bar(xs, [s.mean for s in stats], width, yerr=[s.std for s in stats], capsize=2, color=method_color(p.method),
               alpha=1.0 if p.setting["advantage"] == "GDPO" else 0.5, label=f"{p.method}, {p.setting['advantage']}")
    ax.set_xticks(np.arange(len(terms)), terms)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("gain over pretrained (eval, train prompts)")
    ax.set_title("Per-objective gains")
    ax.legend()
    ax = axes[1]
    if len(terms) >= 2:
        for p in data.points:
            runs = data.runs(p)
            _, a, _ = curve(runs, f"eval/train/{terms[0]}")
            _, b, _ = curve(runs, f"eval/train/{terms[1]}")
            ax.plot(a, b, marker=".", color=method_color(p.method), ls="-" if p.setting["advantage"] == "GDPO" else "--",
                    label=f"{p.method}, {p.setting['advantage']}")
            if len(a):
                ax.scatter(a[:1], b[:1], color="k", s=12, zorder=3)
        ax.set_xlabel(terms[0])
        ax.set_ylabel(terms[1])
        ax.set_title("Objectives along training (black: pretrained)")
        ax.legend()
    plots = [save_figure(fig, out, "multiobjective.png")]
    notes = ["weighted sum: group-relative advantage of w1 r1 + w2 r2 (weights 1, 1); GDPO: each reward normalised within its "
             "group, summed, the sum normalised over the batch.",
             "'min / max gain': the smaller per-objective gain over the larger one (1 = balanced; negative = one objective got worse)."]
    return Report([table], plots, notes)


# --------------------------------------------------------------------------- forgetting
FORGETTING_METRICS = (
    ("eval/train/reward", "train reward"),
    ("eval/heldout/digit_accuracy", "held-out accuracy"),
    ("eval/heldout/digit_fd", "held-out FD"),
    ("eval/train/digit_fd", "train FD"),
    ("eval/heldout/drift_kl", "held-out drift KL"),
)


def build_forgetting(options: BenchOptions) -> list[Point]:
    return [
        make_point("Flow-DPPO", "flow_dppo", [f"algo.loss.delta={DEFAULT_DELTA}"], {}, options),
        make_point("Flow-GRPO", "grpo", [f"algo.loss.clip_range={DEFAULT_CLIP}"], {}, options),
    ]


def _forgetting_table(data: SuiteData, title: str) -> Table:
    columns = [("method", "method"), *[(k, h) for k, h in FORGETTING_METRICS], ("fd_per_gain", "held-out FD rise / reward gain")]
    table = Table(title, columns)
    all_runs = [r for p in data.points for r in data.runs(p)]
    pretrained = {"method": "pretrained (iteration 0)"}
    for key, _ in FORGETTING_METRICS:
        pretrained[key] = over_seeds(all_runs, lambda r, k=key: initial(r, k))
    table.rows.append(pretrained)
    for p in data.points:
        runs = data.runs(p)
        row: dict[str, Any] = {"method": p.method}
        for key, _ in FORGETTING_METRICS:
            row[key] = over_seeds(runs, lambda r, k=key: final(r, k))
        row["fd_per_gain"] = over_seeds(runs, lambda r: gain(r, "eval/heldout/digit_fd") / gain(r, "eval/train/reward"))
        table.rows.append(row)
    return table


def analyse_forgetting(data: SuiteData, out: Path) -> Report:
    table = _forgetting_table(data, "Prior capability after training (final evaluation) and before (iteration 0)")
    # the same metrics where each run's drift from the pretrained model first reaches a common D*
    finals = [final(r.rows, "eval/train/drift_kl") for p in data.points for r in data.runs(p)]
    target = min((t for t in finals if math.isfinite(t)), default=math.nan)
    matched = Table(
        "At equal drift from the pretrained model (interpolated where each run first reaches D*, see below)",
        [("method", "method"), *[(k, h) for k, h in FORGETTING_METRICS[:4]]],
        note=f"D* = {_fmt(target)} (train-prompt drift KL), the smallest final drift of any run above.",
    )
    for p in data.points:
        runs = data.runs(p)
        row: dict[str, Any] = {"method": p.method}
        for key, _ in FORGETTING_METRICS[:4]:
            row[key] = over_seeds(runs, lambda r, k=key: value_at_drift(r, target, key=k))
        matched.rows.append(row)
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for ax, (key, label) in zip(axes, FORGETTING_METRICS[:4]):
        for p in data.points:
            plot_band(ax, data.runs(p), key, p.method, method_color(p.method))
        ax.set_title(label)
        ax.set_xlabel("iteration")
    axes[0].legend()
    plots = [save_figure(fig, out, "forgetting.png")]
    notes = ["digit_accuracy: the shipped classifier's accuracy on samples of held-out digits 5-9 (never trained on); "
             "digit_fd: Frechet distance of classifier features to real digits (lower is better; biased upward at 16 "
             "samples per prompt, so compare across methods, not with other sample sizes).",
             "'held-out FD rise / reward gain' normalises forgetting by how much reward was bought with it."]
    return Report([table, matched], plots, notes, {"matched_drift": target})


# --------------------------------------------------------------------------- ratio noise
def build_ratio_noise(options: BenchOptions) -> list[Point]:
    params = {"warmup": 1 if options.quick else 5, "probe_steps": [1, 4]}
    return [make_point("Flow-DPPO", "flow_dppo", [f"algo.loss.delta={DEFAULT_DELTA}"], {}, options, kind="ratio_noise", params=params)]


def _probe_subsets(result: Mapping[str, Any]) -> list[tuple[str, str, dict[str, list]]]:
    """``(count, subset, per-seed-independent arrays)`` views of one probe result: for every probe
    count the pairs not trained on yet ("next mini-batch", when any) and all pairs."""
    views = []
    for count in sorted(result["probes"], key=int):
        probe = result["probes"][count]
        seen = np.asarray(probe["seen"], dtype=bool)
        subsets = ([("next mini-batch", ~seen)] if (~seen).any() else []) + [("all pairs", np.ones_like(seen))]
        for label, sel in subsets:
            views.append((count, label, {k: list(np.asarray(probe[k])[sel]) for k in ("step", "kl", "log_ratio", "noise", "advantage")}))
    return views


def analyse_ratio_noise(data: SuiteData, out: Path) -> Report:
    point = data.points[0]
    runs = data.runs(point)
    dim = runs[0].result["dim"]
    per_run = [_probe_subsets(r.result) for r in runs]
    tables: list[Table] = []
    headline: dict[str, Any] = {}
    decisions = Table(
        "Clip decisions (|ratio - 1| > eps) against divergence decisions (D >= delta), per (sample, step) pair",
        [("probe", "after"), ("pairs", "pairs"), ("rule", "eps / delta"), ("ratio_outside", "ratio outside band"),
         ("kl_outside", "D >= delta"), ("disagree", "decisions disagree"), ("over", "over-constrained"),
         ("under", "under-constrained"), ("clip_blocked", "PPO-clip blocks grad"), ("mask_blocked", "DPPO mask blocks grad"),
         ("blocked_disagree", "blocking disagrees"), ("spearman", "Spearman(|log r|, D)")],
    )
    for index, (count, subset, _) in enumerate(per_run[0]):
        per_seed = [views[index][2] for views in per_run]
        for label, delta in (("published", DEFAULT_DELTA), ("calibrated", DEFAULT_DELTA), ("calibrated", 1e-4)):
            rows = []
            for probe in per_seed:
                eps = DEFAULT_CLIP if label == "published" else rn.calibrated_clip_range(probe["log_ratio"], probe["kl"], delta)
                if math.isfinite(eps):
                    rows.append(rn.decision_stats(probe["log_ratio"], probe["kl"], probe["advantage"], eps, delta))
            if not rows:
                continue
            eps_stat = stat([r["clip_range"] for r in rows])
            entry = {
                "probe": f"{count} optimiser step(s)",
                "pairs": subset,
                "rule": f"{label}: eps {_fmt(eps_stat.mean, 2)}, delta {delta:g}",
                "ratio_outside": stat([r["ratio_outside"] for r in rows]),
                "kl_outside": stat([r["kl_outside"] for r in rows]),
                "disagree": stat([r["disagree"] for r in rows]),
                "over": stat([r["over_constrained"] for r in rows]),
                "under": stat([r["under_constrained"] for r in rows]),
                "clip_blocked": stat([r["clip_blocked"] for r in rows]),
                "mask_blocked": stat([r["mask_blocked"] for r in rows]),
                "blocked_disagree": stat([r["blocked_disagree"] for r in rows]),
                "spearman": stat([rn.spearman(np.abs(p["log_ratio"]), p["kl"]) for p in per_seed]),
            }
            decisions.rows.append(entry)
            headline[f"{count} step(s), {subset}, {label}, delta {delta:g}"] = {
                k: (v.to_json() if isinstance(v, Stat) else v) for k, v in entry.items()
            }
        if subset == "next mini-batch" or (subset == "all pairs" and count != min((c for c, _, _ in per_run[0]), key=int)):
            pooled = {k: sum((list(p[k]) for p in per_seed), []) for k in ("step", "log_ratio", "kl", "noise")}
            steps_table = Table(
                f"Per denoising step after {count} optimiser step(s), {subset} (pooled over seeds)",
                [("step", "step"), ("pairs", "pairs"), ("kl_mean", "mean D (exact KL)"), ("log_ratio_mean", "mean log r"),
                 ("log_ratio_std", "std log r"), ("noise_std_predicted", "sqrt(2 D / n)"), ("snr", "|mean log r| / std"),
                 ("signal_share", "var share of -D")],
            )
            for s in rn.per_step_stats(pooled["step"], pooled["log_ratio"], pooled["kl"], pooled["noise"], dim):
                s["snr"] = abs(s["log_ratio_mean"]) / s["log_ratio_std"] if s["log_ratio_std"] > 0 else math.nan
                steps_table.rows.append(s)
            tables.append(steps_table)
    tables.insert(0, decisions)
    error = max(r.result["decomposition_max_abs_error"] for r in runs)
    headline["decomposition_max_abs_error"] = error

    plt = pyplot()
    first = per_run[0][0]
    pooled = {k: sum((list(views[0][2][k]) for views in per_run), []) for k in ("step", "log_ratio", "kl")}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    kl = np.maximum(np.asarray(pooled["kl"], dtype=float), 1e-12)
    lr = np.abs(np.asarray(pooled["log_ratio"], dtype=float))
    sc = ax.scatter(kl, np.maximum(lr, 1e-9), c=pooled["step"], s=4, cmap="viridis", alpha=0.6)
    grid = np.logspace(np.log10(kl.min()), np.log10(kl.max()), 50)
    ax.plot(grid, grid, "k-", lw=0.8, label="signal |-D|")
    ax.plot(grid, np.sqrt(2 * grid / dim), "k--", lw=0.8, label="noise std sqrt(2D/n)")
    ax.axhline(DEFAULT_CLIP, color="tab:orange", lw=0.8, label=f"clip eps {DEFAULT_CLIP:g}")
    ax.axvline(DEFAULT_DELTA, color="tab:blue", lw=0.8, label=f"delta {DEFAULT_DELTA:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("exact KL D per (sample, step), mean over dims")
    ax.set_ylabel("|sampled log-ratio| (mean over dims)")
    ax.set_title(f"After {first[0]} optimiser step(s), {first[1]}")
    fig.colorbar(sc, ax=ax, label="denoising step")
    ax.legend(loc="lower right")
    ax = axes[1]
    last = max((c for c, _, _ in per_run[0]), key=int)
    shown = [i for i, (c, sub, _) in enumerate(per_run[0]) if sub == "next mini-batch" or (c == last and sub == "all pairs")]
    for index, style in zip(shown, ("-", "--", ":", "-.")):
        count, subset, _ = per_run[0][index]
        pooled = {k: sum((list(views[index][2][k]) for views in per_run), []) for k in ("step", "log_ratio", "kl", "noise")}
        stats = rn.per_step_stats(pooled["step"], pooled["log_ratio"], pooled["kl"], pooled["noise"], dim)
        steps = [s["step"] for s in stats]
        tag = f"{count} step, {subset}"
        ax.plot(steps, [s["log_ratio_std"] for s in stats], style, marker="o", ms=3, color="tab:red", label=f"std log r ({tag})")
        ax.plot(steps, [s["noise_std_predicted"] for s in stats], style, color="k", lw=0.8, label=f"sqrt(2D/n) ({tag})")
        ax.plot(steps, [s["kl_mean"] for s in stats], style, marker="s", ms=3, color="tab:blue", label=f"mean D ({tag})")
    ax.set_yscale("log")
    ax.set_xlabel("denoising step")
    ax.set_title("Per step: log-ratio spread vs the divergence")
    ax.legend(fontsize=5)
    plots = [save_figure(fig, out, "ratio_noise.png")]
    notes = [
        f"A policy after {runs[0].result['warmup']} training iteration(s) collects a rollout whose trained pairs are split into the "
        "trainer's 2 mini-batches; optimiser steps (Flow-DPPO's loss, as in training) move it, and every pair is then compared "
        "with the rollout policy. 'next mini-batch' = the pairs not trained on yet: exactly where, after the first step, a "
        "trainer takes its clip or mask decisions; there the noise term is independent of the update.",
        f"log r (mean over the n = {dim} latent dims) = noise - D with noise = mean(eps * d) / std, ~ N(0, 2D/n) on unseen pairs: "
        f"the decomposition holds on the model to max abs error {error:.2e}. On pairs already trained on, the update "
        "followed their own eps, so log r is pushed towards sign(A) (a real signal, not noise).",
        "over-constrained: the ratio left the clip band although the step's exact KL is under delta; under-constrained: "
        "the exact KL is over delta but the ratio sits inside the band. 'calibrated' picks eps so both rules flag "
        "the same number of pairs (then disagreement is about which pairs, not how many).",
    ]
    return Report(tables, plots, notes, headline)


# --------------------------------------------------------------------------- compare
def build_compare(options: BenchOptions) -> list[Point]:
    return [make_point(method_name(a), a, [], {"algo": a}, options) for a in options.algos]


def analyse_compare(data: SuiteData, out: Path) -> Report:
    terms = list(data.points[0].jobs[0].config["reward"]["weights"])
    columns = [("method", "method"), ("config", "loss config"), ("reward", "final eval reward"), ("gain", "reward gain")]
    columns += [(t, t) for t in terms]
    columns += [("drift", "drift KL"), ("efficiency", "gain / drift KL"), ("acc", "held-out accuracy"), ("fd", "held-out FD"),
                ("train_fd", "train FD")]
    table = Table("Default configurations side by side (final evaluation)", columns)
    for p in data.points:
        runs = data.runs(p)
        loss = p.jobs[0].config["algo"].get("loss") or {}
        row: dict[str, Any] = {
            "method": p.method,
            "config": ", ".join(f"{k}={v}" for k, v in loss.items() if k in ("clip_range", "delta", "beta", "normalize")),
            "reward": over_seeds(runs, lambda r: final(r, "eval/train/reward")),
            "gain": over_seeds(runs, lambda r: gain(r, "eval/train/reward")),
            "drift": over_seeds(runs, lambda r: final(r, "eval/train/drift_kl")),
            "acc": over_seeds(runs, lambda r: final(r, "eval/heldout/digit_accuracy")),
            "fd": over_seeds(runs, lambda r: final(r, "eval/heldout/digit_fd")),
            "train_fd": over_seeds(runs, lambda r: final(r, "eval/train/digit_fd")),
            "efficiency": over_seeds(runs, lambda r: gain(r, "eval/train/reward") / final(r, "eval/train/drift_kl")),
        }
        for t in terms:
            row[t] = over_seeds(runs, lambda r, t=t: final(r, f"eval/train/{t}"))
        table.rows.append(row)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, label) in zip(axes, (("eval/train/reward", "eval reward"), ("eval/train/drift_kl", "drift KL"), ("eval/heldout/digit_fd", "held-out FD"))):
        for p in data.points:
            plot_band(ax, data.runs(p), key, p.method, method_color(p.method))
        ax.set_title(label)
        ax.set_xlabel("iteration")
    axes[0].legend()
    name = "compare_" + "_".join(p.algo for p in data.points) + ".png"
    return Report([table], [save_figure(fig, out, name)])


# --------------------------------------------------------------------------- registry
SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("frontier", "Reward against drift from the pretrained model (KL-proximal efficiency)",
              "Flow-DPPO reaches higher reward for the same drift KL from the pretrained model than ratio clipping.",
              build_frontier, analyse_frontier),
        Suite("reuse", "Sample reuse: several inner epochs per rollout",
              "Flow-DPPO keeps improving with several inner epochs, where ratio clipping degrades or collapses.",
              build_reuse, analyse_reuse),
        Suite("multiobjective", "Two conflicting rewards: weighted sum against GDPO",
              "Flow-DPPO promotes balanced multi-objective optimisation.",
              build_multiobjective, analyse_multiobjective),
        Suite("forgetting", "Forgetting of prior capability",
              "Flow-DPPO alleviates catastrophic forgetting (held-out prompts, sample quality).",
              build_forgetting, analyse_forgetting),
        Suite("ratio_noise", "The ratio-noise diagnostic",
              "The per-sample ratio is a noisy single-sample estimate of the policy divergence, so clipping decisions are mostly noise.",
              build_ratio_noise, analyse_ratio_noise),
        Suite("compare", "Methods side by side at their default configurations",
              "(no claim: a side-by-side comparison of any registered methods, e.g. a new one against Flow-DPPO)",
              build_compare, analyse_compare),
    )
}
#: the suites ``all`` runs (``compare`` is run on demand with ``--algos``)
ALL: tuple[str, ...] = ("frontier", "reuse", "multiobjective", "forgetting", "ratio_noise")


#: names that run several suites (``algos.bench.paper`` adds ``paper``)
GROUPS: dict[str, tuple[str, ...]] = {"all": ALL}


def expand(name: str) -> list[str]:
    """Suite names for ``name`` (a group such as ``all`` expands); ``ValueError`` for an unknown name."""
    if name in GROUPS:
        return list(GROUPS[name])
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; accepted: {sorted([*SUITES, *GROUPS, 'quick'])}")
    return [name]
