"""The benchmark package: trust-region methods side by side on the embedded digits task, with plots.

::

    python -m algos.bench SUITE [--seeds 3] [--jobs 2] [--out benchmarks/results] [--quick]
    python -m algos.bench all                              # every suite below (about 45 min on 2 cores)
    python -m algos.bench quick --out /tmp/bench           # a tiny version of all (about a minute)
    python -m algos.bench compare --algos drpo,flow_dppo   # any registered methods, default configs

Suites (``algos.bench.suites``): ``frontier`` (reward against drift KL from the pretrained model
while sweeping the clip range / the divergence threshold), ``reuse`` (1, 2, 4 inner epochs on
full and half rollouts), ``multiobjective`` (weighted-sum versus GDPO advantages on two
conflicting rewards), ``forgetting`` (held-out accuracy and sample quality over training),
``ratio_noise`` (the single-sample log-ratio against the exact per-step KL) and ``compare``.

Layout: ``jobs`` (options, cache keys, the process-pool runner), ``suites`` (what each suite runs
and reports), ``ratio_noise`` (the log-ratio probe), ``harness`` (``run_suite`` and the command line).

How it works
------------
* A run is one resolved Hydra config (``configs/``, composed with the suite's overrides) and a seed;
  its cache key is the SHA-256 of that config (plus the job kind and its parameters). Finished
  runs live in ``--cache`` (``bench_cache/`` by default, git-ignored) as
  ``<key>/{job.json, metrics.jsonl, done.json}``; a run whose ``done.json`` exists and whose
  metrics reach the configured last iteration is never run again (``--fresh`` ignores the cache).
  Runs shared between suites (the default settings appear in several) are run once.
* Missing runs go to a ``ProcessPoolExecutor`` of ``--jobs`` spawned workers, one torch thread each,
  longest first; each calls ``algos.trainer.Trainer(cfg, run_dir, progress=False).train()``.
* Every suite then writes ``<out>/<suite>.md`` (tables, mean +- std over seeds), ``<out>/<suite>.json``
  (the same numbers, machine-readable) and ``<out>/<suite>_*.png`` plots. ``--quick`` shrinks
  every suite (and writes under ``<out>/quick/``) so it never overwrites full results.
Every method is evaluated identically (``Trainer.evaluate``: ODE sampling on the train and the
held-out prompts, the same samples per prompt and the same evaluation iterations).
"""

from algos.bench.jobs import BenchOptions, Job, RunResult, compose_config, is_complete, job_key, machine_info, run_jobs
from algos.bench.harness import main, run_suite

__all__ = [
    "BenchOptions",
    "Job",
    "RunResult",
    "compose_config",
    "is_complete",
    "job_key",
    "machine_info",
    "main",
    "run_jobs",
    "run_suite",
]
