"""Where the trainer meets the hardware: device placement, backward, gradient and metric reduction,
mixed precision and checkpoint saving go through a ``Strategy``.

``SingleDevice`` is one process on one device (CPU or one GPU), the only strategy today. A
distributed strategy (DDP, FSDP2 over ``torch.distributed``) is one more class here that overrides
what differs: it all-reduces gradients in ``reduce_gradients`` (or lets DDP do it in ``backward``),
all-reduces the metrics in ``reduce_metrics``, and saves only on the main process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Iterable, Mapping

import torch
from torch import nn

from algos.checkpoint import save_checkpoint
from flowgym.hub import resolve_device

__all__ = ["SingleDevice", "Strategy", "make_strategy"]


class Strategy:
    """The interface; every method but ``__init__`` has the single-process behaviour by default."""

    #: the device the models and the rollout live on
    device: torch.device
    #: whether this process writes metrics, logs and checkpoints
    is_main: bool = True
    world_size: int = 1

    def __init__(self, device: torch.device | str | None = "auto", *, mixed_precision: bool = True) -> None:
        self.device = resolve_device(device)
        self.mixed_precision = bool(mixed_precision)
        self._autocast_enabled = False

    def setup(self, model: nn.Module) -> None:
        """Called once the trained model is built: bf16 autocast on CUDA for a float32 model when mixed
        precision is on (log-probs and kernels stay float32)."""
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        self._autocast_enabled = self.device.type == "cuda" and self.mixed_precision and dtype == torch.float32

    def autocast(self) -> ContextManager[Any]:
        """The context the model's forwards run in."""
        if self._autocast_enabled:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Make every process hold the same (global) gradient; nothing to do on one process."""

    def reduce_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The global value of each metric (the mean over processes); the metrics themselves here."""
        return dict(metrics)

    def save_checkpoint(self, directory: Path, iteration: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path | None:
        """Write an atomic checkpoint (on the main process only)."""
        if not self.is_main:
            return None
        return save_checkpoint(directory, iteration, weights, state)


class SingleDevice(Strategy):
    """One process on one device."""


#: strategies by name (``trainer.strategy`` in a later config); one class each
STRATEGIES: dict[str, type[Strategy]] = {"single": SingleDevice}


def make_strategy(name: str = "single", **kwargs: Any) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; accepted: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)
