"""The update step: (sample, step) pairs -> shuffled mini-batches -> optimizer steps.

``Updater.update(pairs, conditioning)`` runs ``trainer.inner_epochs`` passes; each pass shuffles the
pairs with the updater's own generator, splits them into ``trainer.num_minibatches`` mini-batches
(one optimizer step each) and each mini-batch into micro-batches of ``trainer.micro_batch_size``
(gradient accumulation: each micro-batch's mean loss weighted by its share of the mini-batch),
clips the gradient norm, steps AdamW and updates the EMA. ``Updater.step(batch)`` is one optimizer
step on one batch (what the ratio-noise probe drives). Backward and gradient reduction go through
the strategy; the returned statistics are means over updates (``*_max`` / ``*_min``: extremes).

A loss whose ``batch_kind`` is ``"samples"`` (``algos.losses.sample_base``) gets one row per sample
instead of pairs: before the first epoch ``loss.prepare`` draws its trained timesteps and fresh noise
(from the shuffle generator, so a checkpoint restores them) and precomputes what needs the pre-update
policy; after the last, ``loss.after_update`` moves its old / EMA parameter copies. Shuffling,
mini- and micro-batches are the same, over samples.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from tensordict import TensorDict
from torch import nn

from algos.config import TrainerConfig
from algos.ema import ParameterEMA
from algos.health import check_update
from algos.losses.sample_base import SAMPLES, batch_kind
from algos.strategy import Strategy

__all__ = ["MicroBatch", "Updater", "fused_adamw_supported", "summarise"]


@dataclass
class MicroBatch:
    """One forward + backward of an optimizer step: its rows, its weight in the step's loss (its share
    of the global mini-batch's rows; 0 for a placeholder) and whether its rows are real training rows."""

    batch: TensorDict
    weight: float
    real: bool = True


#: dtypes torch's fused AdamW kernels take (CPU and CUDA)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_adamw_supported(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused AdamW (one kernel for all parameters; several times faster than the
    per-tensor loop) takes ``params``: floating parameters on one CPU or CUDA device."""
    devices = {p.device.type for p in params}
    return bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.dtype in _FUSED_DTYPES for p in params)


def summarise(sums: dict[str, list]) -> dict[str, float]:
    """Mean of each diagnostic over updates (NaNs ignored), max / min for ``*_max`` / ``*_min``.

    Values may be floats or 0-d tensors: tensors stay on the device during the updates and are
    read back here, in one transfer (one host sync per iteration instead of one per value)."""
    # a sharded model's gradient norm is a replicated DTensor: its local value is the global one
    tensors = [getattr(v, "_local_tensor", v) for values in sums.values() for v in values if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else None
    host = iter(torch.stack([t.detach().float().reshape(()).to(device) for t in tensors]).tolist()) if tensors else iter(())
    sums = {key: [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values] for key, values in sums.items()}
    stats = {}
    for key, values in sums.items():
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            stats[key] = float("nan")
        elif key.endswith("_max"):
            stats[key] = max(finite)
        elif key.endswith("_min"):
            stats[key] = min(finite)
        else:
            stats[key] = sum(finite) / len(finite)
    return stats


@contextlib.contextmanager
def minibatch_totals_set(loss_module: nn.Module, totals: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """``loss_module.minibatch_totals`` = ``totals`` inside the context (what a loss with
    ``minibatch_statistics`` normalises by), None again after it."""
    previous = getattr(loss_module, "minibatch_totals", None)
    loss_module.minibatch_totals = totals
    try:
        yield
    finally:
        loss_module.minibatch_totals = previous


class Updater:
    """Optimizer steps of ``loss_module`` over a rollout's pairs (see the module docstring)."""

    def __init__(
        self,
        loss_module: nn.Module,
        parameters: Iterable[nn.Parameter],
        config: TrainerConfig,
        strategy: Strategy,
        *,
        seed: int,
        ema: ParameterEMA | None = None,
    ) -> None:
        self.loss_module = loss_module
        self.config = config
        self.strategy = strategy
        params = list(parameters)
        fused = fused_adamw_supported(params) if config.fused_optimizer is None else bool(config.fused_optimizer)
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
        self.ema = ema
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.batch_kind = batch_kind(loss_module)

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _chunk_plan(self, rows: int, extra: float) -> list[float]:
        """One process's chunk sizes and micro-batch counts per mini-batch, and ``extra``."""
        t = self.config
        micro = t.micro_batch_size or max(rows, 1)
        chunks = list(torch.arange(rows).chunk(t.num_minibatches)) if rows else []
        sizes = [c.numel() for c in chunks] + [0] * (t.num_minibatches - len(chunks))
        return [*sizes, *(-(-size // micro) for size in sizes), float(extra)]

    def plan(self, rows: int, extra: float = 0.0,
             rows_per_process: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The mini-batch structure every process follows: the global rows of each of the
        ``trainer.num_minibatches`` mini-batches, the most micro-batches any process has in each, and
        the sum of ``extra`` over processes. Shuffling never changes a process's chunk sizes, so one
        plan serves every epoch of an update. ``rows_per_process`` (every process's row count, which
        the trainer knows from the gathered advantages) computes it without a collective (``extra`` is
        then 0)."""
        m = self.config.num_minibatches
        if rows_per_process is not None:
            if rows_per_process[self.strategy.rank] != rows:
                raise RuntimeError(f"this process has {rows} rows, the plan says {rows_per_process[self.strategy.rank]}")
            everything = torch.tensor([self._chunk_plan(r, 0.0) for r in rows_per_process], dtype=torch.float64)
        else:
            local = torch.tensor([self._chunk_plan(rows, extra)], dtype=torch.float64)
            everything = self.strategy.all_gather_cat(local)
        return everything[:, :m].sum(0), everything[:, m : 2 * m].amax(0), float(everything[:, -1].sum())

    def minibatches(self, pairs: TensorDict, conditioning: TensorDict, epoch: int,
                    placeholder: TensorDict | None = None,
                    plan: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> list[list[MicroBatch]]:
        """The epoch's shuffled mini-batches, each a list of weighted micro-batches carrying their conditioning.

        Each rank shuffles its own pairs into ``trainer.num_minibatches`` chunks; mini-batch i of the
        run is the union of every rank's chunk i. A micro-batch's weight is its share of that global
        mini-batch's rows (times the strategy's ``gradient_scale``, the world size for strategies
        that average gradients), so the summed gradient is the global mini-batch's mean. Every rank
        runs the same number of micro-batches (the most any rank has, ``plan``): a rank with fewer
        runs ``placeholder`` rows (one row of its data) at weight 0, so collectives stay in step.
        """
        t = self.config
        n = pairs.batch_size[0]
        rows, counts, _ = plan if plan is not None else self.plan(n)
        order = torch.randperm(n, generator=self.shuffle_generator).to(pairs.device)
        micro = t.micro_batch_size or max(n, 1)
        chunks = list(order.chunk(t.num_minibatches)) if n else []
        chunks += [order[:0]] * (t.num_minibatches - len(chunks))  # an empty chunk on a rank short of rows
        splits = [list(chunk.split(micro)) if chunk.numel() else [] for chunk in chunks]
        if placeholder is None and n:
            placeholder = pairs[:1]
        batches = []
        for index, pieces in enumerate(splits):
            if rows[index] == 0:
                batches.append([])  # no rank has a row: every rank skips this optimizer step
                continue
            planned = []
            for slot in range(int(counts[index])):
                real = slot < len(pieces)
                if not real and placeholder is None:
                    raise RuntimeError("a rank without any training row needs a placeholder batch to keep in step")
                batch = pairs[pieces[slot]] if real else placeholder.clone()
                batch.set("conditioning", conditioning[batch.get("sample_index")])
                weight = batch.batch_size[0] / float(rows[index]) * self.strategy.gradient_scale if real else 0.0
                planned.append(MicroBatch(batch, weight, real))
            if epoch == 0 and t.refresh_old_policy:
                # matrix kernels round differently per batch size: recompute the old policy on
                # exactly these batches, before any update, so the first ratios are exactly 1
                with torch.no_grad(), self.strategy.autocast():
                    for piece in planned:
                        self.loss_module.refresh_old_policy(piece.batch)
            batches.append(planned)
        return batches

    def _weighted(self, pieces: list[TensorDict | MicroBatch]) -> list[MicroBatch]:
        """Plain micro-batches weighted by their share of the (global) mini-batch."""
        if all(isinstance(p, MicroBatch) for p in pieces):
            return list(pieces)  # type: ignore[arg-type]
        local = sum(p.batch_size[0] for p in pieces)
        total = float(self.strategy.all_reduce(torch.tensor(float(local), dtype=torch.float64), "sum"))
        return [MicroBatch(p, p.batch_size[0] / total * self.strategy.gradient_scale, True) for p in pieces]

    def _minibatch_totals(self, pieces: list[MicroBatch]) -> dict[str, torch.Tensor] | None:
        """The sums a loss normalises by over the whole global mini-batch (``loss.minibatch_statistics``,
        Flow-DPPO's kept count for ``normalize="kept"``); None when the loss needs none or when this
        process's single micro-batch is the whole mini-batch (the loss's own count is then exact)."""
        statistics = getattr(self.loss_module, "minibatch_statistics", None)
        if statistics is None or (self.strategy.world_size == 1 and len(pieces) == 1):
            return None
        totals: dict[str, torch.Tensor] = {}
        with torch.no_grad(), self.strategy.autocast():
            for piece in pieces:
                counts = statistics(piece.batch)  # run for placeholders too: every rank forwards alike
                if counts is None:
                    return None
                for key, value in counts.items():
                    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu() * (1.0 if piece.real else 0.0)
                    totals[key] = totals.get(key, torch.zeros((), dtype=torch.float64)) + value
        keys = sorted(totals)
        reduced = self.strategy.all_reduce(torch.stack([totals[k] for k in keys]), "sum")
        return {key: reduced[i] for i, key in enumerate(keys)}

    def gradients(self, pieces: list[TensorDict | MicroBatch], sums: dict[str, list]) -> torch.Tensor | None:
        """Zero the gradients, then accumulate the weighted micro-batches' gradients (reduced over
        ranks by the strategy: the global mini-batch's gradient); diagnostics of the real micro-batches
        appended to ``sums``. Returns this process's share of the mini-batch loss (None: no micro-batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        planned = self._weighted(pieces)
        totals = self._minibatch_totals(planned)
        minibatch_loss = None
        with minibatch_totals_set(self.loss_module, totals):
            for index, piece in enumerate(planned):
                last = index == len(planned) - 1
                with self.strategy.accumulating(not last), self.strategy.autocast():
                    out = self.strategy.forward(self.loss_module, piece.batch)
                loss = sum(v for k, v in out.items() if k.startswith("loss_"))
                # each micro-batch's mean loss weighted by its share: the global mini-batch mean
                share = loss * piece.weight
                with self.strategy.accumulating(not last):
                    self.strategy.backward(share)
                if piece.real:
                    minibatch_loss = share.detach() if minibatch_loss is None else minibatch_loss + share.detach()
                for key, value in out.items():
                    if value.numel() == 1:
                        # read back once, in summarise; a placeholder's as NaN (ignored), so that every
                        # process reports the same keys
                        sums.setdefault(key, []).append(value.detach() if piece.real else math.nan)
        self.strategy.reduce_gradients(self.parameters())
        return minibatch_loss

    def step(self, pieces: list[TensorDict | MicroBatch], sums: dict[str, list], *, iteration: int = 0, epoch: int = 0,
             minibatch: int = 0) -> None:
        """One optimizer step over the micro-batches of one mini-batch; diagnostics appended to ``sums``.

        A non-finite loss or gradient norm raises ``algos.health.NumericalError`` (naming ``iteration``,
        ``epoch`` and ``minibatch``) before the weights move."""
        minibatch_loss = self.gradients(pieces, sums)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if self.config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.config.max_grad_norm)
            sums.setdefault("grad_norm", []).append(grad_norm.detach())
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if minibatch_loss is not None:
            check_update(minibatch_loss, grad_norm, epoch, minibatch, iteration)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()

    def prepare_samples(self, samples: TensorDict, conditioning: TensorDict) -> TensorDict:
        """A per-sample loss's training batch: its timesteps, fresh noise and pre-update quantities."""
        samples.set("conditioning", conditioning[samples.get("sample_index")])
        return self.loss_module.prepare(
            samples, generator=self.shuffle_generator, chunk_size=self.config.micro_batch_size, autocast=self.strategy.autocast
        )

    def update(self, pairs: TensorDict, conditioning: TensorDict, iteration: int = 0,
               placeholder: TensorDict | None = None, rows_per_process: list[int] | None = None) -> dict[str, float]:
        """``inner_epochs`` passes of mini-batch updates; the diagnostics' summary, ``num_updates``, ``num_pairs``.

        ``pairs``: the (sample, step) pairs, or for a ``batch_kind == "samples"`` loss the samples.
        ``iteration``: the training iteration, named in a ``NumericalError``.
        ``placeholder``: one row this process runs at weight 0 when it has no row of a mini-batch that
        another process has (several processes only; see ``minibatches``). ``rows_per_process``: every
        process's row count when the caller knows it (saves a collective, ``plan``). With several processes
        ``num_pairs`` is the global count and the diagnostics are reduced over processes.
        """
        sums: dict[str, list] = {}
        num_updates = 0
        samples = self.batch_kind == SAMPLES
        if samples:
            if pairs.batch_size[0] > 0:
                pairs = self.prepare_samples(pairs, conditioning)
            elif placeholder is not None and self.strategy.world_size > 1:
                placeholder = self.prepare_samples(placeholder.clone(), conditioning)
            if placeholder is not None and pairs.batch_size[0] > 0:
                placeholder = pairs[:1]
        n = pairs.batch_size[0]
        sigma = getattr(getattr(self.loss_module, "tensor_keys", None), "sigma", None)
        local_pairs = float(pairs.get(sigma).numel()) if samples and n and sigma in pairs.keys() else 0.0
        if samples:
            rows_per_process = None  # the trained pairs per sample are the loss's: counted by a collective
        plan = self.plan(n, extra=local_pairs, rows_per_process=rows_per_process)
        global_rows = int(plan[0].sum())
        checked = contextlib.nullcontext()
        if not samples and n and hasattr(self.loss_module, "checked_inputs"):
            self.loss_module.check_input(pairs)  # once per rollout, not once per micro-batch
            checked = self.loss_module.checked_inputs()
        with checked:
            for epoch in range(self.config.inner_epochs):
                if global_rows == 0:
                    break
                for index, pieces in enumerate(self.minibatches(pairs, conditioning, epoch, placeholder, plan)):
                    if not pieces:
                        continue
                    self.step(pieces, sums, iteration=iteration, epoch=epoch, minibatch=index)
                    num_updates += 1
        stats = self.strategy.reduce_metrics(summarise(sums))
        stats["num_updates"] = num_updates
        stats["num_pairs"] = global_rows
        if samples:
            # the old / EMA copies move once per rollout, after its optimiser steps
            stats.update(self.loss_module.after_update(num_updates))
            sigma = self.loss_module.tensor_keys.sigma
            stats["num_samples"] = stats["num_pairs"]
            stats["num_pairs"] = int(plan[2])
        return stats
