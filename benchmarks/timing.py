"""Timing shared by the benchmark scripts: parts timed alternately, medians reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runs: Mapping[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each of ``runs``, the median of ``repeats``: every round calls each part
    once in turn, so that a slow spell of a shared machine falls on all parts alike. ``warmup`` rounds
    first (allocator, caches, lazy initialisation) are not timed."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
