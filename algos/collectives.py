"""Collectives over ``torch.distributed`` that are the identity in a world of one.

Everything the trainer, the updater and the evaluator exchange between processes goes through these
few functions, so the single-process path never touches ``torch.distributed`` (no process group is
made by ``python -m algos.run``) and a multi-process run computes the same global quantities:

* ``all_gather_cat``: the rank-major concatenation of every rank's tensor (one shape on every rank),
  on every rank: the global batch of rewards a group-relative advantage needs;
* ``all_gather_objects``: the same for picklable Python objects (prompts, RNG states), and
  ``gather_objects`` to one rank only (evaluation images);
* ``all_reduce``: sum / max / min of a tensor over ranks, in place;
* ``rank_seed``: the seed of a per-rank random stream.

Gloo (CPU) and NCCL (CUDA) both run these; NCCL needs the tensors on the rank's CUDA device, which
``all_gather_cat`` and ``all_reduce`` take care of.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["all_gather_cat", "all_gather_objects", "all_reduce", "collective_device", "gather_objects", "rank", "rank_seed", "world_size"]

#: 2**61 - 1, a Mersenne prime: seeds mixed modulo it stay distinct for distinct (seed, rank)
_SEED_MODULUS = 2**61 - 1
_SEED_MULTIPLIER = 0x9E3779B97F4A7C15 % _SEED_MODULUS


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """The seed of rank ``rank``'s own random stream (initial and step noise).

    ``seed`` itself in a world of one (a single process draws exactly what it always drew); otherwise
    ``(seed * m + rank + 1) mod (2^61 - 1)`` with a fixed odd multiplier ``m``: distinct for the
    ranks of one run (up to 2^61 - 1 of them) and the same for the same (seed, rank).
    """
    if world_size == 1:
        return int(seed)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    return int((int(seed) * _SEED_MULTIPLIER + rank + 1) % _SEED_MODULUS)


def collective_device(like: torch.device | None = None) -> torch.device:
    """Where a collective's tensors must live: the rank's CUDA device under NCCL, else ``like`` or CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like if like is not None else torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """``tensor`` reduced over ranks (a new tensor on ``tensor``'s device; ``tensor`` itself in a world of one)."""
    if world_size() == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}; got {op!r}")
    work = tensor.detach().to(collective_device(tensor.device)).clone()
    dist.all_reduce(work, op=ops[op])
    return work.to(tensor.device)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (the same shape on every rank) concatenated along dim 0 in rank order,
    on every rank, on ``tensor``'s device; ``tensor`` itself in a world of one."""
    n = world_size()
    if n == 1:
        return tensor
    local = tensor.detach().to(collective_device(tensor.device)).contiguous()
    pieces = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(pieces, local)
    return torch.cat(pieces).to(tensor.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank; ``[obj]`` in a world of one."""
    n = world_size()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable ``obj`` in rank order on rank ``dst`` (None elsewhere): large things
    (evaluation images) that only the writing process needs; ``[obj]`` in a world of one."""
    n = world_size()
    if n == 1:
        return [obj]
    out: list[Any] | None = [None] * n if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out
