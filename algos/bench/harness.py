"""Running suites: build their jobs, run them (cached), write each suite's report.

``run_suite(name, options, out=..., cache=...)`` and the command line ``main``; the suites are in
``algos.bench.suites``, the jobs and the cache in ``algos.bench.jobs``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from algos.bench import paper as _paper  # noqa: F401  (registers the paper suites and the "paper" group)
from algos.bench import suites as bench_suites
from algos.bench.jobs import ROOT, BenchOptions, machine_info, run_jobs

__all__ = ["main", "run_suite"]


# --------------------------------------------------------------------------- suites
def run_suite(
    name: str,
    options: BenchOptions,
    *,
    out: Path,
    cache: Path,
    num_workers: int = 2,
    fresh: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build, run (with caching) and report suite ``name`` (``all`` and ``quick`` expand to several).

    Returns ``{"suites": [names], "reports": {name: report dict}, "runs": {"total", "executed",
    "cached"}, "wall_s": seconds}``; the reports are also written under ``out``.
    """
    if name == "quick":
        name, options = "all", BenchOptions(**{**options.__dict__, "quick": True})
    names = bench_suites.expand(name)
    out = out / "quick" if options.quick else out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    built = {n: bench_suites.SUITES[n].build(options) for n in names}
    jobs = [job for points in built.values() for point in points for job in point.jobs]
    results = run_jobs(jobs, cache, num_workers=num_workers, fresh=fresh, log=log)
    run_wall = time.perf_counter() - start
    executed = sum(1 for r in results.values() if not r.cached)
    reports = {}
    machine = machine_info()
    for n in names:
        suite = bench_suites.SUITES[n]
        data = bench_suites.SuiteData(suite=suite, options=options, points=built[n], results=results)
        reports[n] = suite.write_report(data, out, machine=machine, command=_command_line(), run_wall_s=run_wall)
        log(f"[bench] wrote {out / (n + '.md')}")
    summary = {
        "suites": names,
        "reports": reports,
        "runs": {"total": len(results), "executed": executed, "cached": len(results) - executed},
        "wall_s": time.perf_counter() - start,
        "out": str(out),
    }
    if len(names) > 1:
        index = [f"# Benchmark suites: {', '.join(names)}", ""]
        run_minutes = sum(r.wall_s for r in results.values()) / 60
        index.append(f"{summary['runs']['total']} runs ({executed} executed by this call, {summary['runs']['cached']} from cache); "
                     f"this call took {summary['wall_s'] / 60:.1f} min; the runs' own times add up to {run_minutes:.1f} min "
                     f"(run {max(num_workers, 1)} at a time). Command: `{_command_line()}`.")
        index += ["", *[f"- [{n}]({n}.md): {bench_suites.SUITES[n].title}" for n in names], ""]
        (out / ("index.md" if name == "all" else f"{name}_index.md")).write_text("\n".join(index))
    log(f"[bench] done: {summary['runs']} in {summary['wall_s'] / 60:.1f} min")
    return summary


def _command_line() -> str:
    argv = sys.argv[1:] if Path(sys.argv[0]).name in ("bench.py", "__main__.py") or sys.argv[0].endswith("algos.bench") else None
    if argv is None:
        return "python -m algos.bench (called from Python)"
    return "python -m algos.bench " + " ".join(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m algos.bench", description="The benchmark harness: trust-region methods side by side, with plots.")
    parser.add_argument("suite", choices=sorted([*bench_suites.SUITES, *bench_suites.GROUPS, "quick"]), help="which suite (or group: all, paper) to run")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per point (default 3; 2 with --quick)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="report folder")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench_cache", help="finished runs (reused across calls)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test); reports go to OUT/quick/")
    parser.add_argument("--algos", default="flow_dppo,grpo", help="comma-separated losses for the compare suite")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every run (repeatable), e.g. --set trainer.iterations=60")
    parser.add_argument("--device", default="cpu", help="device of every run (cpu, cuda, auto)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs and run everything again")
    parser.add_argument("--full", action="store_true", help="paper suites: the full version (every sweep, 100 iterations; use --seeds 5)")
    parser.add_argument("--sweep-all", action="store_true",
                        help="paper table: sweep every method's trust-region knob, not only Flow-DPPO's and Flow-GRPO's (the full version always does)")
    parser.add_argument("--methods", default=None, help="paper suites: comma-separated loss names or labels to run (default: all)")
    args = parser.parse_args(argv)
    quick = args.quick or args.suite == "quick"
    seeds = args.seeds if args.seeds is not None else (2 if quick else 3)
    options = BenchOptions(
        seeds=seeds, quick=quick, algos=tuple(a.strip() for a in args.algos.split(",") if a.strip()),
        overrides=tuple(args.overrides), device=args.device, full=args.full, sweep_all=args.sweep_all,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None,
    )
    return run_suite(args.suite, options, out=args.out, cache=args.cache, num_workers=args.jobs, fresh=args.fresh)


if __name__ == "__main__":
    main()
