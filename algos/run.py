"""Hydra entry point: ``python -m algos.run algo=flow_dppo`` (see ``configs/config.yaml``), and
``torchrun --nproc_per_node=N -m algos.run ...`` for N processes (``algos.distributed``)."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from algos.checkpoint import latest_checkpoint
from algos.config import check_overrides, load_config
from algos.distributed import strategy_from_config
from algos.strategy import Strategy
from algos.trainer import Trainer


def find_resume_dir(resume: Any, run_dir: Path) -> Path | None:
    """The run folder to continue: ``resume=true`` takes the newest sibling run with a checkpoint."""
    if resume in (False, None, "false", "False"):
        return None
    if resume in (True, "true", "True"):
        candidates = sorted((p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir), reverse=True)
        for candidate in candidates:
            if latest_checkpoint(candidate / "checkpoints") is not None:
                return candidate
        raise ValueError(f"resume=true but no earlier run with a checkpoint under {run_dir.parent}")
    path = Path(str(resume))
    if latest_checkpoint(path / "checkpoints") is None and latest_checkpoint(path) is None:
        raise ValueError(f"resume={resume!r}: no complete checkpoint in that folder (expected <run>/checkpoints/iter-*)")
    return path.parent if path.name == "checkpoints" else path


def summary_table(rows: list[dict[str, float]]) -> str:
    """First and last evaluation side by side, one metric a line."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        return "(no evaluation ran)"
    first, last = evals[0], evals[-1]
    keys = sorted(k for k in last if k.startswith("eval/"))
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  {'iter ' + str(first['iteration']):>12}  {'iter ' + str(last['iteration']):>12}"]
    for key in keys:
        a, b = first.get(key, math.nan), last.get(key, math.nan)
        lines.append(f"{key:<{width}}  {a:>12.4g}  {b:>12.4g}")
    return "\n".join(lines)


def check_same_run(resume_dir: Path, cfg: DictConfig) -> None:
    """A resumed folder must hold a run of the same algo and env: one ``metrics.jsonl`` never mixes two."""
    saved_file = resume_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        return  # a folder written without hydra (a Trainer used directly): nothing to compare
    saved = OmegaConf.load(saved_file)
    for key in ("algo.name", "env.name"):
        was, now = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        if was != now:
            raise ValueError(
                f"resume={cfg.resume!r}: {resume_dir} is a run with {key}={was}, this command asks for {key}={now}; "
                f"resume it with {key}={was}, or start a new run (resume=false)"
            )


def is_bare_hydra_folder(run_dir: Path) -> bool:
    """True when ``run_dir`` holds nothing but what hydra writes at start-up (its ``.hydra`` and log)."""
    return run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())


def remove_bare_folder(run_dir: Path, keep_log_in: Path | None = None) -> None:
    """Delete a run folder that holds only hydra's start-up files (after a failed start or a resume);
    with ``keep_log_in``, its log is appended to that folder's ``resume.log`` first."""
    if not is_bare_hydra_folder(run_dir):
        return
    if keep_log_in is not None:
        for log in run_dir.glob("*.log"):
            with open(keep_log_in / "resume.log", "a") as handle:
                handle.write(f"--- {run_dir.name}\n{log.read_text()}")
    shutil.rmtree(run_dir, ignore_errors=True)


def shared_run_folders(strategy: Strategy, run_dir: Path, resume: Any) -> tuple[Path, Path | None]:
    """The run folder and the folder to resume, as the main process chose them, on every process
    (each process's hydra made its own timestamped folder; the others' are removed when bare)."""
    chosen = (run_dir, find_resume_dir(resume, run_dir)) if strategy.is_main else None
    if strategy.world_size == 1:
        return chosen  # type: ignore[return-value]
    main_dir, resume_dir = strategy.all_gather_objects(chosen)[0]
    if not strategy.is_main and Path(main_dir).resolve() != run_dir.resolve():
        remove_bare_folder(run_dir)
    return Path(main_dir), resume_dir


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    strategy = None
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        config = load_config(container)  # every value checked before a process group is made
        strategy = strategy_from_config(config.trainer.distributed, config.device, mixed_precision=config.trainer.mixed_precision)
        run_dir, resume_dir = shared_run_folders(strategy, run_dir, cfg.resume)
        if resume_dir is not None:
            check_same_run(resume_dir, cfg)
        trainer = Trainer(config, resume_dir or run_dir, strategy=strategy)
        if resume_dir is not None:
            trainer.resume()  # falls back past a broken checkpoint to the newest intact one, naming it
            if strategy.is_main:
                print(f"resumed {resume_dir} at iteration {trainer.iteration}")
    except Exception:
        if strategy is None or strategy.is_main:
            remove_bare_folder(run_dir)  # a run that never started leaves no empty folder behind
        raise
    rows = trainer.train()
    folder = trainer.run_dir
    del trainer  # the models and the DDP / FSDP state that hold the process group go before it
    strategy.close()
    if not strategy.is_main:
        return math.nan
    if resume_dir is not None:
        remove_bare_folder(run_dir, keep_log_in=resume_dir)
    print(summary_table(rows))
    print(f"run folder: {folder}")
    final = [r for r in rows if "eval/train/reward" in r]
    return final[-1]["eval/train/reward"] if final else math.nan


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except ValueError as error:
        sys.exit(f"error: {error}")
    main()
