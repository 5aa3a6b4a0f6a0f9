"""The run report: curves of one or several runs and a short ``report.md``.

::

    python -m algos.report RUN_DIR [RUN_DIR ...] [--out DIR]

reads each run's ``metrics.jsonl`` (and ``.hydra/config.yaml`` for the summary) and writes to
``--out`` (default: the single run's folder, else ``./report``):

* ``curves.png``: over iterations, with the runs overlaid: the rollout reward and every reward term;
  the evaluation reward on each split (train, held-out); the drift KL to the pretrained model (per
  rollout when logged, and along the evaluation trajectories); the trust region's clip / mask
  fractions; the family's prior-capability metrics, one panel each (``eval/<split>/<metric>`` that
  are neither a reward term nor drift, e.g. ``digit_accuracy``, ``digit_fd``, ``compose_fd``, and the
  diversity entropies, e.g. ``compose/colour_entropy``);
* ``report.md``: per run its settings, the first and last evaluation of its main metrics, and the
  images (the curves and, for one run, ``samples/first_vs_last.png``).

The trainer writes the same at the end of every run (``logger.report``). A torn last line of
``metrics.jsonl`` (what a kill during a write leaves) is skipped with a note in the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from algos.atomic_io import savefig_atomic, write_text_atomic

__all__ = ["RunRecord", "main", "panels", "read_run", "write_report"]

#: substrings of the trust-region diagnostics plotted together
TRUST_REGION_KEYS = ("clip_frac", "mask_frac", "frac_over_threshold")


@dataclass
class RunRecord:
    """One run folder: its metric rows, its settings and what could not be read."""

    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        algo = self.config.get("algo", {}).get("name")
        env = self.config.get("env", {}).get("name")
        seed = self.config.get("seed")
        return f"{algo} on {env}, seed {seed}" if algo and env else self.path.name


def read_run(path: str | Path) -> RunRecord:
    """The rows of ``path/metrics.jsonl`` (unreadable lines skipped and reported) and its config."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{path} is not a run folder: it has no metrics.jsonl")
    rows, problems = [], []
    lines = metrics.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            where = "the last line (torn by an interrupted write)" if number == len(lines) else f"line {number}"
            problems.append(f"{metrics}: {where} is not JSON and was skipped")
    config: dict[str, Any] = {}
    config_file = path / ".hydra" / "config.yaml"
    if config_file.is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    return RunRecord(path, rows, config, problems)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row["iteration"])
            ys.append(float(value))
    return xs, ys


def _reward_terms(runs: Sequence[RunRecord]) -> list[str]:
    return sorted({k.split("/", 1)[1] for r in runs for row in r.rows for k in row if k.startswith("reward/")})


def panels(runs: Sequence[RunRecord]) -> list[tuple[str, list[str]]]:
    """The plot panels: ``(title, metric keys)``, only those that some run logged."""
    keys = {k for r in runs for row in r.rows for k in row}
    terms = _reward_terms(runs)
    splits = sorted({k.split("/")[1] for k in keys if k.startswith("eval/") and k.count("/") >= 2})
    eval_reward = [f"eval/{s}/{t}" for s in splits for t in ("reward", *terms)]
    drift = ["drift_kl", *[f"eval/{s}/drift_kl" for s in splits]]
    trust = sorted(k for k in keys if any(t in k for t in TRUST_REGION_KEYS) and not k.startswith("eval/"))
    reserved = {"reward", "drift_kl", *terms}
    # prior-capability metrics, one panel each (their scales differ): top-level ones and the diversity
    # entropies a family logs under a reward term (compose's colour / digit entropy)
    prior_names = sorted({k.split("/", 2)[2] for k in keys if k.startswith("eval/") and k.count("/") >= 2
                          and ((k.count("/") == 2 and k.split("/")[2] not in reserved) or k.endswith("entropy"))})
    chosen = [
        ("rollout reward and its terms", ["reward", *[f"reward/{t}" for t in terms]]),
        ("evaluation reward (ODE)", eval_reward),
        ("drift KL to the pretrained model", drift),
        ("trust region: clip / mask fractions", trust),
        *[(f"prior capability: {name} (evaluation)", [f"eval/{s}/{name}" for s in splits]) for name in prior_names],
    ]
    return [(title, [k for k in ks if k in keys]) for title, ks in chosen if any(k in keys for k in ks)]


def _plot(runs: Sequence[RunRecord], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(runs)
    fig, axes = plt.subplots(len(chosen), 1, figsize=(7, 2.4 * max(len(chosen), 1)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes[:, 0], chosen):
        for j, key in enumerate(keys):
            for i, run in enumerate(runs):
                xs, ys = _series(run.rows, key)
                if not xs:
                    continue
                label = key if len(runs) == 1 else f"{key} [{run.label}]"
                ax.plot(xs, ys, styles[i % len(styles)], color=f"C{j % 10}", marker="." if len(xs) < 30 else None, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if title.startswith("drift"):
            ax.set_yscale("symlog", linthresh=1e-4)  # drift spans decades and starts at 0
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    path = savefig_atomic(fig, out / "curves.png", dpi=90)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:.4g}"


def _summary(run: RunRecord) -> list[str]:
    c = run.config
    t, e, a = c.get("trainer", {}), c.get("env", {}), c.get("algo", {})
    settings = ", ".join(
        f"{k} {v}" for k, v in (("algo", a.get("name")), ("env", e.get("name")), ("seed", c.get("seed")),
                                ("iterations", t.get("iterations")), ("lr", t.get("lr")),
                                ("prompts x samples", f"{e.get('num_prompts')} x {e.get('group_size')}"))
        if v is not None
    )
    evals = [r for r in run.rows if any(k.startswith("eval/") for k in r)]
    lines = [f"### {run.label}", "", f"`{run.path}`" + (f": {settings}" if settings else ""), ""]
    lines += [f"- {p}" for p in run.problems]
    if not evals:
        return [*lines, "No evaluation was logged.", ""]
    first, last = evals[0], evals[-1]
    keys = [k for k in first if k.startswith("eval/") and k.count("/") == 2]
    lines += [f"| metric | iteration {first['iteration']} | iteration {last['iteration']} |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(first.get(k))} | {_fmt(last.get(k))} |" for k in keys]
    times = [r["time_s"] for r in run.rows if isinstance(r.get("time_s"), (int, float))]
    if times:
        lines += ["", f"{len(times)} iterations logged, {sum(times):.1f} s in all ({sum(times) / len(times):.2f} s per iteration)."]
    return [*lines, ""]


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """``curves.png`` and ``report.md`` of the runs in ``out``; returns the path of ``report.md``."""
    if not run_dirs:
        raise ValueError("write_report needs at least one run folder")
    runs = [read_run(d) for d in run_dirs]
    out = Path(out)
    curves = _plot(runs, out)
    lines = ["# Run report", "", f"![curves]({os.path.relpath(curves, out)})", ""]
    if len(runs) == 1:
        grid = runs[0].path / "samples" / "first_vs_last.png"
        if grid.is_file():
            lines += [f"![first and last evaluation samples]({os.path.relpath(grid, out)})", ""]
    for run in runs:
        lines += _summary(run)
    return write_text_atomic(out / "report.md", "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m algos.report", description="Curves and report.md of one or several runs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the run's folder for one run, else ./report)")
    args = parser.parse_args(argv)
    out = args.out or (args.runs[0] if len(args.runs) == 1 else Path("report"))
    try:
        path = write_report(args.runs, out)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(f"wrote {path} and {path.parent / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
