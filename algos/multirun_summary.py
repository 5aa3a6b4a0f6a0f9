"""The overall summary of a ``python -m algos.run --multirun ...`` sweep (a Hydra callback).

After the last job, ``MultirunSummary`` prints one line per run (its overrides, final train and
held-out evaluation reward, final drift KL, wall time; failed jobs say so) and writes
``summary.md`` with the same table plus ``curves.png`` / ``report.md`` of all runs overlaid
(``algos.report``) into the sweep folder (``multirun/<date>/``). Registered in
``configs/config.yaml`` under ``hydra.callbacks``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from algos.atomic_io import write_text_atomic

__all__ = ["MultirunSummary", "sweep_table"]

COLUMNS = ("eval/train/reward", "eval/heldout/reward", "eval/train/drift_kl")


def _final(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else math.nan


def _rows(run: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return rows


def _overrides(run: Path) -> str:
    file = run / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return run.name
    from omegaconf import OmegaConf

    return " ".join(str(o) for o in OmegaConf.load(file)) or "(defaults)"


def sweep_table(sweep_dir: str | Path) -> tuple[list[str], list[Path]]:
    """The summary lines of every job folder under ``sweep_dir`` and the folders that hold metrics."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()) if sweep_dir.is_dir() else []
    header = f"| run | overrides | {' | '.join(COLUMNS)} | wall s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    finished = []
    for job in jobs:
        if not (job / "metrics.jsonl").is_file():
            lines.append(f"| {job.name} | {_overrides(job)} | " + " | ".join("failed" for _ in COLUMNS) + " | - |")
            continue
        rows = _rows(job)
        finished.append(job)
        wall = sum(r["time_s"] for r in rows if isinstance(r.get("time_s"), (int, float)))
        cells = " | ".join(f"{_final(rows, k):.4g}" for k in COLUMNS)
        lines.append(f"| {job.name} | {_overrides(job)} | {cells} | {wall:.1f} |")
    return lines, finished


class MultirunSummary(Callback):
    """Prints and writes the sweep's summary when every job has returned (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        lines, finished = sweep_table(sweep_dir)
        text = "\n".join(lines)
        print(f"\nsweep summary ({len(finished)} of {len(lines) - 2} runs finished), {sweep_dir}:\n{text}")
        if not sweep_dir.is_dir():
            return
        write_text_atomic(sweep_dir / "summary.md", f"# Sweep summary\n\n{text}\n")
        if finished:
            from algos.report import write_report

            write_report(finished, sweep_dir)
