"""The run's record: ``metrics.jsonl`` (one JSON row per logged iteration) and torchrl's loggers.

``RunLogger.log(row)`` appends the row (NaN diagnostics written as JSON null) and sends every
number to the configured torchrl loggers (``csv``, ``tensorboard``, ``wandb``) at step
``row["iteration"]``; ``log_image`` sends the sample grids to those that take images. ``RunLogger.read(iteration)`` returns the rows already logged up to a
resumed iteration and rewrites the file without the rows of a crashed run's later iterations.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

from algos.config import LoggerConfig

__all__ = ["LOGGER_BACKENDS", "RunLogger"]

LOGGER_BACKENDS = ("csv", "tensorboard", "wandb")
_log = logging.getLogger(__name__)


class RunLogger:
    """``metrics.jsonl`` in ``run_dir`` plus torchrl loggers under ``run_dir/logs`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path, config: LoggerConfig, *, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.loggers = self._make_loggers(config) if enabled else []

    def _make_loggers(self, config: LoggerConfig) -> list:
        from torchrl.record.loggers import CSVLogger, TensorboardLogger

        loggers = []
        for name in config.backends:
            if name == "csv":
                loggers.append(CSVLogger(exp_name="csv", log_dir=str(self.run_dir / "logs")))
            elif name == "tensorboard":
                loggers.append(TensorboardLogger(exp_name="tensorboard", log_dir=str(self.run_dir / "logs")))
            elif name == "wandb":
                if importlib.util.find_spec("wandb") is None:
                    raise ValueError("logger backend 'wandb' needs the wandb package: pip install wandb")
                from torchrl.record.loggers import WandbLogger

                loggers.append(WandbLogger(exp_name=config.wandb_name, project=config.wandb_project, save_dir=str(self.run_dir)))
            else:
                raise ValueError(f"unknown logger backend {name!r}; accepted: {', '.join(LOGGER_BACKENDS)}")
        return loggers

    def log(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append ``row`` and send its numbers to the loggers; returns the row as written."""
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        if not self.enabled:
            return row
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    logger.log_scalar(key, value, step=int(row["iteration"]))
        return row

    def log_image(self, name: str, image, iteration: int) -> None:
        """Send an ``(H, W, 3)`` float image in [0, 1] to the loggers that take images (tensorboard, wandb)."""
        if not self.enabled:
            return
        for logger in self.loggers:
            kind = type(logger).__name__
            if kind == "TensorboardLogger":
                logger.experiment.add_image(name, image, global_step=int(iteration), dataformats="HWC")
                logger.experiment.flush()
            elif kind == "WandbLogger":
                import wandb

                logger.experiment.log({name: wandb.Image(image), "trainer/step": int(iteration)})

    def read(self, iteration: int) -> list[dict[str, Any]]:
        """Rows already logged up to ``iteration`` (later rows of a crashed run are dropped from the file).

        A torn last line (a crash in the middle of a write) is dropped with a warning; any other line
        that is not a JSON row is a ``ValueError`` naming the file and the line.
        """
        if not self.metrics_path.exists():
            return []
        rows = self._parse() if iteration > 0 else []
        rows = [r for r in rows if r["iteration"] <= iteration]
        if self.enabled:
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _parse(self) -> list[dict[str, Any]]:
        lines = [(number, line) for number, line in enumerate(self.metrics_path.read_text().splitlines(), 1) if line.strip()]
        rows = []
        for index, (number, line) in enumerate(lines):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                    raise ValueError("not a row with an integer 'iteration'")
            except ValueError as error:
                if index == len(lines) - 1:
                    _log.warning("%s: dropping its torn last line %d (a write cut short by a crash): %.80s", self.metrics_path, number, line)
                    break
                raise ValueError(
                    f"{self.metrics_path}:{number} is not a metrics row ({error}); only a torn last line is "
                    "dropped on resume: repair or delete that line"
                ) from None
            rows.append(row)
        return rows
