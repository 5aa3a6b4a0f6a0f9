"""Samples per second of training on the default task with 1, 2 (and 4 where the cores allow) CPU
processes under torchrun, one torch thread each, and the scaling efficiency.

Two ways to add processes, both measured:

* weak scaling (the ``speedup`` lines): every process holds the default task's batch (8 prompts x
  8 samples); N processes train on N times the samples per iteration, as data-parallel RL recipes
  do (more GPUs, more groups per iteration);
* strong scaling (``strong_speedup``): the default task's global batch of 64 samples split over the
  N processes. On this CPU an iteration has a fixed part that does not shrink with the batch (the
  Python of 10 denoising steps, two optimizer steps; 31 ms at 32 samples against 40 ms at 64), so
  halving the batch cannot halve the time.

Each launch is
``torchrun --nproc_per_node=N -m algos.run`` with evaluation and checkpoints off; a process's
per-iteration wall time is the ``time_s`` of ``metrics.jsonl`` (collect, gathered advantages,
DDP update), so start-up is not counted; the first ``--warmup`` iterations are dropped. The process
counts are launched in turn, ``--repeats`` rounds, and the median iteration time of each is used, so
that a slow spell of a shared machine falls on all alike.

    python benchmarks/scaling.py                 # about 2-3 min on a 2-core machine
    python benchmarks/scaling.py --procs 1 2 4

Ends with one line per process count, ``speedup procs=<N> <value>`` (samples per second over the
one-process figure).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, iterations: int, prompts: int, folder: Path, extra: list[str]) -> list[float]:
    """One training run with ``procs`` processes; its per-iteration wall times (seconds).

    ``prompts`` is env.num_prompts, the global groups per iteration."""
    run = folder / f"procs{procs}-{len(list(folder.iterdir()))}"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={free_port()}",
               "-m", "algos.run", "algo=flow_dppo", f"trainer.iterations={iterations}", "trainer.eval_every=0",
               "trainer.checkpoint_every=0", "num_threads=1", f"env.num_prompts={prompts}", "logger.backends=[]",
               "logger.sample_grid=false", "logger.report=false", f"hydra.run.dir={run}", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"procs={procs} failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["world_size"] == procs for r in rows)
    return [r["time_s"] for r in rows if r["iteration"] > 0]


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=None, help="process counts (default 1, 2 and 4 where cores allow)")
    parser.add_argument("--iterations", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="env.num_prompts: groups per iteration (8 samples each)")
    parser.add_argument("extra", nargs="*", help="more algos.run overrides")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    procs = args.procs or [n for n in (1, 2, 4) if n <= max(cores, 2)]
    modes = {"strong": lambda n: args.prompts, "weak": lambda n: args.prompts * n}
    times: dict[tuple[str, int], list[float]] = {(mode, n): [] for mode in modes for n in procs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for mode, n in times:
                if mode == "weak" and n == 1:
                    continue  # the same launch as strong scaling's one process
                per_iteration = launch(n, args.iterations, modes[mode](n), Path(tmp), args.extra)[args.warmup:]
                times[mode, n].append(statistics.median(per_iteration))
                print(f"round {round_ + 1} {mode} procs={n}: {statistics.median(per_iteration) * 1e3:.1f} ms / iteration", flush=True)
    if 1 in procs:
        times["weak", 1] = times["strong", 1]
    print(f"\ndefault task (flow_dppo, digits, 8 samples per group), {cores} cores, 1 torch thread per process")
    speedups: dict[tuple[str, int], float] = {}
    for mode in ("strong", "weak"):
        rate = {n: modes[mode](n) * 8 / statistics.median(times[mode, n]) for n in procs}
        base = rate[1] if 1 in rate else rate[procs[0]] / procs[0]  # ideal scaling below the smallest count
        what = "64 samples split over the processes" if mode == "strong" else "64 samples per process"
        print(f"\n{mode} scaling ({what})")
        print(f"{'procs':>5}  {'samples / iter':>14}  {'ms / iteration':>14}  {'samples / s':>11}  {'speedup':>7}  {'efficiency':>10}")
        for n in procs:
            speedups[mode, n] = rate[n] / base
            print(f"{n:>5}  {modes[mode](n) * 8:>14}  {statistics.median(times[mode, n]) * 1e3:>14.1f}  {rate[n]:>11.1f}  "
                  f"{speedups[mode, n]:>7.2f}  {speedups[mode, n] / n:>10.2f}")
    print()
    for n in procs:
        print(f"strong_speedup procs={n} {speedups['strong', n]:.2f}")
    for n in procs:
        print(f"speedup procs={n} {speedups['weak', n]:.2f}")
    return {n: speedups["weak", n] for n in procs}


if __name__ == "__main__":
    main()
