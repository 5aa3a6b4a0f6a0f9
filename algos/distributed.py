"""Several processes over ``torch.distributed``: the DDP and FSDP2 strategies (``trainer.distributed``).

Launch with ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``); ``strategy_from_config`` makes the process group (NCCL on CUDA, gloo on CPU, or
``trainer.distributed.backend``) with ``trainer.distributed.timeout_s`` as the collectives' timeout,
so a rank that died makes the others fail instead of waiting forever. A plain ``python -m algos.run``
has no ``WORLD_SIZE`` and gets ``SingleDevice``: no process group at all.

* ``DDPStrategy``: the loss module (which holds every trained parameter: LoRA adapters or the whole
  model, and a loss's own parameters) is wrapped in ``torch.nn.parallel.DistributedDataParallel``;
  the training forward goes through the wrapper, micro-batches but the last run under ``no_sync``,
  and the backward of the last all-reduces (averages) the gradients in buckets.
* ``FSDPStrategy``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on each block of the velocity
  model's ``ModuleList``s, then on the model: parameters, gradients and optimizer state are sharded,
  forwards all-gather and backwards reduce-scatter. Every process therefore runs the same number of
  forwards (``lockstep_forwards``). Checkpoints hold the gathered (full) weights and optimizer state
  (``torch.distributed.checkpoint.state_dict``), written by rank 0, the same files as one process writes.

Both average gradients over processes; the updater multiplies each loss by ``gradient_scale`` (the
world size) and weighs it by its share of the global mini-batch, so the reduced gradient is the
gradient of the global mini-batch's mean loss, whatever the number of rows on each process.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import math
import os
import warnings
import zlib
from typing import Any, ContextManager, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from algos.collectives import all_gather_cat, all_gather_objects, all_reduce, gather_objects
from algos.config import DistributedConfig, check_distributed
from algos.strategy import STRATEGIES, SingleDevice, Strategy
from flowgym.hub import resolve_device

__all__ = ["DDPStrategy", "DistributedStrategy", "FSDPStrategy", "launch_environment", "strategy_from_config"]

_log = logging.getLogger(__name__)

#: what torchrun sets in every process it starts
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_environment() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun's environment variables, or None when
    the process was not started by torchrun (no ``WORLD_SIZE``)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} are not: launch with torchrun "
                         "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    return {
        "rank": int(os.environ.get("RANK", 0)),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
    }


class DistributedStrategy(Strategy):
    """The process group and the reductions every multi-process strategy shares (see the module docstring)."""

    def __init__(
        self,
        device: torch.device | str | None = "auto",
        *,
        mixed_precision: bool = True,
        backend: str = "auto",
        timeout_s: float = 600.0,
        find_unused_parameters: bool = False,
    ) -> None:
        launch = launch_environment()
        if launch is None and not dist.is_initialized():
            raise ValueError(f"trainer.distributed.strategy={self.name!r} needs several processes: launch with "
                             "torchrun --nproc_per_node=N -m algos.run ... (or strategy=single for one process)")
        local_rank = launch["local_rank"] if launch else 0
        wanted = str(device) if device is not None else "auto"
        if wanted in ("auto", "cuda") and torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        elif wanted == "auto":
            device = "cpu"
        super().__init__(device, mixed_precision=mixed_precision)
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = local_rank
        self.is_main = self.rank == 0
        self.gradient_scale = float(self.world_size)
        self.find_unused_parameters = bool(find_unused_parameters)

    name = "distributed"

    def reduce_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The global value of each metric: the mean over processes of their (finite) values, the max of
        ``*_max`` and the min of ``*_min``; NaN where no process has a finite value. One collective:
        every process reports the same keys (the updater records placeholders' diagnostics as NaN)."""
        keys = sorted(metrics)
        digest = zlib.crc32("\n".join(keys).encode())
        local = torch.tensor([[float(digest), *(float(metrics[k]) for k in keys)]], dtype=torch.float64)
        everything = all_gather_cat(local)
        if not bool((everything[:, 0] == digest).all()):
            raise RuntimeError(f"the processes report different metrics; this one: {keys}")
        values = everything[:, 1:]
        finite = torch.isfinite(values)
        count = finite.sum(0)
        total = torch.where(finite, values, 0.0).sum(0)
        high = torch.where(finite, values, -math.inf).amax(0)
        low = torch.where(finite, values, math.inf).amin(0)
        out = {}
        for i, key in enumerate(keys):
            if count[i] == 0:
                out[key] = math.nan
            elif key.endswith("_max"):
                out[key] = float(high[i])
            elif key.endswith("_min"):
                out[key] = float(low[i])
            else:
                out[key] = float(total[i] / count[i])
        return out

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(tensor, op)  # type: ignore[arg-type]

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(tensor)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        return all_gather_objects(obj)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        return gather_objects(obj)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Wait for every process, release what holds the process group (DDP's reducer), destroy it."""
        if not dist.is_initialized():
            return
        dist.barrier()
        self.wrapper = None
        gc.collect()  # the reducer must go before its process group, or its destructor can block at exit
        dist.destroy_process_group()


class DDPStrategy(DistributedStrategy):
    """Data parallel: every process holds the whole model, gradients are all-reduced by DDP."""

    name = "ddp"

    def prepare(self, loss_module: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        module = _LossForward(loss_module)
        # frozen weights (text encoders, VAE, the base under LoRA, a reference copy) are loaded alike on
        # every process: DDP neither broadcasts them at start nor registers them
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen + [name for name, _ in module.named_buffers()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers' rename; False is what is meant
            self.wrapper = DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # the models' buffers are constants (frozen statistics, caches)
                find_unused_parameters=self.find_unused_parameters,
            )

    def forward(self, loss_module: nn.Module, batch: Any) -> Any:
        total, out = self.wrapper(batch)
        return out

    def accumulating(self, active: bool) -> ContextManager[Any]:
        return self.wrapper.no_sync() if active else contextlib.nullcontext()


class FSDPStrategy(DistributedStrategy):
    """Fully sharded data parallel (FSDP2's ``fully_shard``) for full fine-tunes of large transformers."""

    name = "fsdp"
    lockstep_forwards = True

    def setup(self, model: nn.Module) -> None:
        """Shard ``model`` (call before the optimizer, the EMA and the loss copy its parameters)."""
        from torch.distributed.fsdp import fully_shard

        super().setup(model)
        # the outermost ModuleLists' blocks (a block's own ModuleLists, e.g. attention outputs, stay inside it)
        named = [(f"{name}.{i}", block) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
                 for i, block in enumerate(module)]
        outer = [(name, block) for name, block in named if not any(name.startswith(other + ".") for other, _ in named)]
        for _, block in outer:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block)
        fully_shard(model)
        self.model = model

    def prepare(self, loss_module: nn.Module) -> None:
        self.loss_module = loss_module
        # a loss's own parameters (outside the sharded model) are all-reduced by hand
        sharded = {id(p) for p in self.model.parameters()}
        self.replicated = [p for p in loss_module.parameters() if p.requires_grad and id(p) not in sharded]

    @contextlib.contextmanager
    def _sync(self, active: bool):
        self.model.set_requires_gradient_sync(not active)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def accumulating(self, active: bool) -> ContextManager[Any]:
        return self._sync(active) if active else contextlib.nullcontext()

    def reduce_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        for p in getattr(self, "replicated", []):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(all_reduce(p.grad, "sum") / self.world_size)

    def trainable_state_dict(self, backend: Any) -> dict[str, torch.Tensor]:
        """The backend's trained weights with each shard gathered (a collective per tensor, in the same
        order on every process)."""
        return {name: _full(value).cpu() for name, value in backend.trainable_state_dict().items()}

    def load_trainable_state_dict(self, backend: Any, weights: dict[str, torch.Tensor]) -> None:
        """Full weights sharded like the parameters they go to, then loaded by the backend."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(backend.velocity_model().named_parameters())
        sharded = {}
        for name, value in weights.items():
            p = params.get(name)
            if isinstance(p, DTensor):
                value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
            sharded[name] = value
        backend.load_trainable_state_dict(sharded)  # names the unknown parameters, if any

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer, loss_module: nn.Module) -> dict[str, Any]:
        """The optimizer state with every sharded tensor gathered: the same index-keyed format as one
        process saves (so a checkpoint resumes under any strategy and world size)."""
        state = optimizer.state_dict()
        state["state"] = {index: {key: _full(value).detach().cpu() if isinstance(value, torch.Tensor) else value
                                  for key, value in entry.items()} for index, entry in state["state"].items()}
        return state

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, loss_module: nn.Module, state: dict[str, Any]) -> None:
        """Load a full optimizer state, then shard each per-parameter tensor like its parameter."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = optimizer.state.get(p, {})
                for key, value in entry.items():
                    if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor) \
                            and value.shape == p.shape:
                        entry[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as one full tensor (a sharded ``DTensor`` gathered; collective on every process)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


class _LossForward(nn.Module):
    """The loss module as DDP wants it: ``forward`` returns the summed loss beside the loss's output,
    so that DDP finds the tensor its backward starts from."""

    def __init__(self, loss_module: nn.Module) -> None:
        super().__init__()
        self.loss_module = loss_module

    def forward(self, batch: Any) -> tuple[torch.Tensor, Any]:
        out = self.loss_module(batch)
        total = sum(v for k, v in out.items() if k.startswith("loss_"))
        return total, out


STRATEGIES.update({"ddp": DDPStrategy, "fsdp": FSDPStrategy})


def strategy_from_config(config: DistributedConfig, device: str = "auto", *, mixed_precision: bool = True) -> Strategy:
    """The strategy ``trainer.distributed`` asks for, its values checked before any process group is made.

    ``auto``: DDP when torchrun started several processes, else one process (``SingleDevice``)."""
    check_distributed(config)
    launch = launch_environment()
    world = launch["world_size"] if launch else 1
    name = config.strategy
    if name == "auto":
        name = "ddp" if world > 1 else "single"
    if name == "single":
        if world > 1:
            raise ValueError(f"trainer.distributed.strategy=single, but torchrun started {world} processes: each would "
                             "train alone; use strategy=ddp or fsdp (or auto), or launch one process with python")
        return SingleDevice(device, mixed_precision=mixed_precision)
    kwargs = dict(mixed_precision=mixed_precision, backend=config.backend, timeout_s=config.timeout_s,
                  find_unused_parameters=config.find_unused_parameters)
    return STRATEGIES[name](resolve_device(device) if device not in ("auto", "cuda") else device, **kwargs)
