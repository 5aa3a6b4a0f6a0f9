"""Where the trainer meets the hardware: device placement, backward, gradient and metric reduction,
mixed precision and checkpoint saving go through a ``Strategy``.

``SingleDevice`` is one process on one device (CPU or one GPU). The distributed strategies (DDP and
FSDP2 over ``torch.distributed``, ``algos.distributed``) override what differs: the training forward
(through the DDP wrapper), gradient accumulation without synchronisation (``accumulating``), the
reduction of gradients and metrics, the gathered state dicts of a checkpoint, and that only the main
process writes. Every method here has the single-process behaviour.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Iterable, Mapping

import torch
from torch import nn

from algos.checkpoint import save_checkpoint
from flowgym.hub import resolve_device

__all__ = ["STRATEGIES", "SingleDevice", "Strategy", "make_strategy"]


class Strategy:
    """The interface; every method but ``__init__`` has the single-process behaviour by default."""

    #: the device the models and the rollout live on
    device: torch.device
    #: whether this process writes metrics, logs and checkpoints
    is_main: bool = True
    world_size: int = 1
    rank: int = 0
    #: the loss is multiplied by this before backward: the world size for strategies whose gradient
    #: reduction averages over processes (DDP, FSDP), so that the reduced gradient is the global sum
    gradient_scale: float = 1.0
    #: every process must run the same number of model forwards (FSDP all-gathers in each)
    lockstep_forwards: bool = False

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

    def prepare(self, loss_module: nn.Module) -> None:
        """Called once the loss module (holding every trained parameter) is built, before training."""

    def forward(self, loss_module: nn.Module, batch: Any) -> Any:
        """The training forward of ``loss_module`` on ``batch`` (through a DDP wrapper where there is one)."""
        return loss_module(batch)

    def accumulating(self, active: bool) -> ContextManager[Any]:
        """The context of a micro-batch's forward and backward that is not the mini-batch's last:
        gradients accumulate locally, without synchronisation (DDP's ``no_sync``)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Make every process hold the same (global) gradient; nothing to do on one process."""

    def reduce_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The global value of each metric (the mean over processes); the metrics themselves here."""
        return dict(metrics)

    def trainable_state_dict(self, backend: Any) -> dict[str, torch.Tensor]:
        """The trained weights as full tensors (gathered from the shards under FSDP; every process calls it)."""
        return backend.trainable_state_dict()

    def load_trainable_state_dict(self, backend: Any, weights: dict[str, torch.Tensor]) -> None:
        backend.load_trainable_state_dict(weights)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer, loss_module: nn.Module) -> dict[str, Any]:
        """The optimizer's state as a checkpoint stores it (every process calls it)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, loss_module: nn.Module, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    # collectives: the identity on one process (``algos.distributed`` runs them over the process group)
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced (``"sum"``, ``"max"``, ``"min"``) over processes."""
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (one shape on every process) concatenated along dim 0 in rank order."""
        return tensor

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every process's picklable ``obj`` in rank order."""
        return [obj]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every process's picklable ``obj`` in rank order on the main process, None on the others."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for on one)."""

    def close(self) -> None:
        """Release the process group (nothing to release on one process)."""

    def save_checkpoint(self, directory: Path, iteration: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path | None:
        """Write an atomic checkpoint (on the main process only)."""
        if not self.is_main:
            return None
        return save_checkpoint(directory, iteration, weights, state)


class SingleDevice(Strategy):
    """One process on one device."""


#: strategies by name (``trainer.distributed.strategy``); ``algos.distributed`` adds "ddp" and "fsdp"
STRATEGIES: dict[str, type[Strategy]] = {"single": SingleDevice}


def make_strategy(name: str = "single", **kwargs: Any) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; accepted: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)
