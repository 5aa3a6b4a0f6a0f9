"""Benchmark jobs: options, cache keys, the cached process-pool runner and the Hydra config a job runs.

See ``algos.bench`` for how the harness uses them.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from algos.atomic_io import write_text_atomic

__all__ = ["BenchOptions", "Job", "RunResult", "compose_config", "execute_job", "is_complete", "job_key", "load_result", "machine_info", "run_jobs"]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
#: bump when the meaning of a cached result changes (invalidates every cached run)
CACHE_VERSION = 1


# --------------------------------------------------------------------------- options and jobs
@dataclass
class BenchOptions:
    """What a suite is built from: seeds, size, the methods of ``compare`` and extra overrides."""

    seeds: int = 3
    quick: bool = False
    algos: tuple[str, ...] = ("flow_dppo", "grpo")
    overrides: tuple[str, ...] = ()  # applied to every run, after the suite's own
    device: str = "cpu"
    full: bool = False  # the paper suites' full version (every sweep, 100 iterations) instead of the reduced one
    methods: tuple[str, ...] | None = None  # paper suites: only these methods (loss names or labels); None = all
    sweep_all: bool = False  # paper table: sweep every method's knob at the reduced size (the full version always does)

    def __post_init__(self) -> None:
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive integer; got {self.seeds!r}")
        if not self.algos:
            raise ValueError("algos must name at least one registered loss (e.g. flow_dppo,grpo)")


@dataclass
class Job:
    """One unit of work: ``kind`` "train" (a Trainer run) or "ratio_noise" (the ratio probe)."""

    kind: str
    config: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return job_key(self)

    def cost(self) -> float:
        """A rough relative cost (for scheduling the longest jobs first)."""
        from algos.config import env_arguments, load_config
        from flowgym.registration import env_arguments_with_defaults

        cfg = load_config(self.config)
        t = self.config["trainer"]
        # the env's sizes as the run will see them: a config may leave them to the family's defaults
        e = env_arguments_with_defaults(cfg.env.name, env_arguments(cfg.env))
        per_iteration = (1.0 + 0.6 * (t["inner_epochs"] - 1)) * e["num_prompts"] * e["group_size"]
        iterations = t["iterations"] if self.kind == "train" else self.params.get("warmup", 1) + 1
        return per_iteration * iterations * e["num_steps"]


@dataclass
class RunResult:
    """A finished job: ``rows`` (metric rows of a training run) or ``result`` (a probe's output)."""

    key: str
    seed: int
    wall_s: float
    cached: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


def compose_config(algo: str, overrides: Sequence[str] = (), seed: int = 0) -> dict[str, Any]:
    """The resolved config dict of ``configs/config.yaml`` with ``algo=<algo>``, ``overrides`` and ``seed``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import algos.config  # noqa: F401  (registers the schema configs/config.yaml builds on)

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"algo={algo}", *overrides, f"seed={seed}"])
    return OmegaConf.to_container(cfg, resolve=True)


#: settings added after runs were cached, each at the value that reproduces the behaviour from before
#: it existed: a config holding that value hashes as if the setting were absent, so that adding a
#: setting does not invalidate every cached run (any other value changes the key)
KEY_NEUTRAL_SETTINGS: dict[tuple[str, ...], Any] = {
    ("trainer", "compile"): False,
    ("trainer", "compile_mode"): None,
}


def _key_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the settings of ``KEY_NEUTRAL_SETTINGS`` that hold their neutral value."""
    trimmed = json.loads(json.dumps(config, default=str))
    for path, neutral in KEY_NEUTRAL_SETTINGS.items():
        parent = trimmed
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and path[-1] in parent and parent[path[-1]] == neutral:
            del parent[path[-1]]
    return trimmed


def job_key(job: Job) -> str:
    """SHA-256 (first 16 hex digits) of the job's kind, resolved config (less the neutral settings of
    ``KEY_NEUTRAL_SETTINGS``) and parameters."""
    payload = json.dumps(
        {"version": CACHE_VERSION, "kind": job.kind, "config": _key_config(job.config), "params": job.params},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the cache
def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def is_complete(run_dir: Path, job: Job) -> bool:
    """True when ``run_dir`` holds the finished result of ``job`` (marker, same job, all iterations)."""
    done, spec = run_dir / "done.json", run_dir / "job.json"
    if not (done.exists() and spec.exists()):
        return False
    try:
        stored = json.loads(spec.read_text())
    except json.JSONDecodeError:
        return False
    same_config = _key_config(stored.get("config") or {}) == _key_config(job.config)
    if stored.get("kind") != job.kind or not same_config or stored.get("params") != json.loads(json.dumps(job.params)):
        return False
    if job.kind == "train":
        metrics = run_dir / "metrics.jsonl"
        if not metrics.exists():
            return False
        rows = _read_rows(metrics)
        t = job.config["trainer"]
        if not rows or rows[-1]["iteration"] != t["iterations"]:
            return False
        if t.get("eval_every") and "eval/train/reward" not in rows[-1]:
            return False
        return True
    return (run_dir / "result.json").exists()


def load_result(run_dir: Path, job: Job, cached: bool) -> RunResult:
    done = json.loads((run_dir / "done.json").read_text())
    result = RunResult(key=job.key, seed=int(job.config["seed"]), wall_s=float(done["wall_s"]), cached=cached)
    if job.kind == "train":
        result.rows = _read_rows(run_dir / "metrics.jsonl")
    else:
        result.result = json.loads((run_dir / "result.json").read_text())
    return result


# --------------------------------------------------------------------------- workers
def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def execute_job(kind: str, config: dict[str, Any], params: dict[str, Any], run_dir: str) -> float:
    """Run one job into ``run_dir`` (cleared first) and write its ``done.json``; returns its wall time."""
    directory = Path(run_dir)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    write_text_atomic(directory / "job.json", json.dumps({"kind": kind, "config": config, "params": params}, sort_keys=True, indent=1))
    start = time.perf_counter()
    if kind == "train":
        from algos.trainer import Trainer

        Trainer(config, directory, progress=False).train()
    elif kind == "ratio_noise":
        from algos.bench.ratio_noise import ratio_noise_probe

        result = ratio_noise_probe(config, directory / "work", **params)
        write_text_atomic(directory / "result.json", json.dumps(result))
        shutil.rmtree(directory / "work", ignore_errors=True)
    else:
        raise ValueError(f"unknown job kind {kind!r}; accepted: train, ratio_noise")
    wall = time.perf_counter() - start
    write_text_atomic(directory / "done.json", json.dumps({"wall_s": wall, "finished": time.time()}))
    return wall


def run_jobs(
    jobs: Sequence[Job],
    cache: Path,
    *,
    num_workers: int = 2,
    fresh: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, RunResult]:
    """Run every job not already complete in ``cache`` (``num_workers`` processes); results by key.

    Jobs with equal keys are run once. ``num_workers=1`` runs in this process (one torch thread).
    Raises ``RuntimeError`` listing the failed jobs after all the others finished.
    """
    if num_workers < 1:
        raise ValueError(f"jobs must be >= 1; got {num_workers}")
    cache.mkdir(parents=True, exist_ok=True)
    unique: dict[str, Job] = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    results: dict[str, RunResult] = {}
    todo = []
    for key, job in unique.items():
        if not fresh and is_complete(cache / key, job):
            results[key] = load_result(cache / key, job, cached=True)
        else:
            todo.append(job)
    todo.sort(key=lambda j: -j.cost())
    log(f"[bench] {len(unique)} runs: {len(results)} cached, {len(todo)} to run on {num_workers} worker(s)")
    failures: list[str] = []
    start = time.perf_counter()

    def finished(job: Job, error: BaseException | None) -> None:
        if error is not None:
            failures.append(f"{_describe(job)}: {type(error).__name__}: {error}")
            log(f"[bench] FAILED {_describe(job)}: {error}")
            return
        results[job.key] = load_result(cache / job.key, job, cached=False)
        done = sum(1 for r in results.values() if not r.cached)
        log(f"[bench] {done}/{len(todo)} {_describe(job)} {results[job.key].wall_s:.1f} s (elapsed {time.perf_counter() - start:.0f} s)")

    if num_workers == 1 or len(todo) <= 1:
        _worker_init()
        for job in todo:
            try:
                execute_job(job.kind, job.config, job.params, str(cache / job.key))
                finished(job, None)
            except Exception as error:  # noqa: BLE001 - reported with the others
                finished(job, error)
    elif todo:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=num_workers, mp_context=context, initializer=_worker_init) as pool:
            pending = {pool.submit(execute_job, j.kind, j.config, j.params, str(cache / j.key)): j for j in todo}
            for future in futures.as_completed(pending):
                finished(pending[future], future.exception())
    if failures:
        raise RuntimeError(f"{len(failures)} benchmark run(s) failed:\n" + "\n".join(failures))
    return results


def _describe(job: Job) -> str:
    a, t = job.config["algo"], job.config["trainer"]
    loss = ",".join(f"{k}={v}" for k, v in sorted((a.get("loss") or {}).items()) if k in ("clip_range", "delta"))
    return (
        f"{job.kind} {a['name']}[{loss}] adv={a.get('advantage')} epochs={t['inner_epochs']} "
        f"P={job.config['env']['num_prompts']} seed={job.config['seed']} ({job.key})"
    )


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, str]:
    """The machine the numbers were measured on (CPU, cores, torch, python)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


