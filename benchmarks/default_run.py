"""The default run, measured over several training seeds: each evaluation metric before and after.

    python benchmarks/default_run.py                         # the default config, seeds 0 1 2
    python benchmarks/default_run.py --seeds 0 1 2 --set env=compose --set algo=grpo

Runs ``python -m algos.run`` once per seed (one after another, so wall times are comparable),
reads each run's ``metrics.jsonl`` and prints, for every ``eval/`` metric, the first evaluation
(the pretrained model) and the last one, as mean +- std over the seeds, with each run's wall time.
The last lines are machine-readable: ``metric <name> <before mean> <after mean> <after - before>``
and ``wall_s <mean>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def run(seed: int, overrides: Sequence[str], out: Path, threads: int | None) -> tuple[list[dict], float]:
    command = [sys.executable, "-m", "algos.run", f"seed={seed}", *overrides, f"hydra.run.dir={out}", "logger.backends=[csv]"]
    env = None
    if threads:
        import os

        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, wall


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Hydra override (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args(argv)
    scratch = tempfile.TemporaryDirectory()
    base = args.keep or Path(scratch.name)
    firsts: dict[str, list[float]] = {}
    lasts: dict[str, list[float]] = {}
    walls = []
    for seed in args.seeds:
        rows, wall = run(seed, args.overrides, base / f"seed{seed}", args.threads)
        walls.append(wall)
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        for key in evals[0]:
            if key.startswith("eval/"):
                firsts.setdefault(key, []).append(evals[0][key])
                lasts.setdefault(key, []).append(evals[-1].get(key))
        print(f"seed {seed}: {wall:.1f} s, evaluations at iterations {[r['iteration'] for r in evals]}", flush=True)
    width = max(len(k) for k in firsts)
    print(f"\n{'metric':<{width}}  {'first eval':>18}  {'last eval':>18}  (mean +- std over seeds {args.seeds})")
    summary = {}
    for key in sorted(firsts):
        (a, sa), (b, sb) = mean_std(firsts[key]), mean_std(lasts[key])
        summary[key] = (a, b)
        print(f"{key:<{width}}  {a:>10.4g} +- {sa:<5.2g}  {b:>10.4g} +- {sb:<5.2g}")
    wall_mean, wall_std = mean_std(walls)
    print(f"wall time per run: {wall_mean:.1f} +- {wall_std:.1f} s ({' '.join(sys.argv[1:]) or 'default config'})\n")
    for key, (a, b) in summary.items():
        print(f"metric {key} {a:.6g} {b:.6g} {b - a:.6g}")
    print(f"wall_s {wall_mean:.2f}")
    scratch.cleanup()
    return summary


if __name__ == "__main__":
    main()
