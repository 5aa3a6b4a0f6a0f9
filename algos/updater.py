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

import math
from typing import Iterable

import torch
from tensordict import TensorDict
from torch import nn

from algos.config import TrainerConfig
from algos.ema import ParameterEMA
from algos.health import check_update
from algos.losses.sample_base import SAMPLES, batch_kind
from algos.strategy import Strategy

__all__ = ["Updater", "fused_adamw_supported", "summarise"]


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
    tensors = [v for values in sums.values() for v in values if isinstance(v, torch.Tensor)]
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

    def minibatches(self, pairs: TensorDict, conditioning: TensorDict, epoch: int) -> list[list[TensorDict]]:
        """The epoch's shuffled mini-batches, each a list of micro-batches carrying their conditioning."""
        t = self.config
        order = torch.randperm(pairs.batch_size[0], generator=self.shuffle_generator).to(pairs.device)
        micro = t.micro_batch_size or pairs.batch_size[0]
        batches = []
        for chunk in order.chunk(t.num_minibatches):
            pieces = []
            for piece in chunk.split(micro):
                batch = pairs[piece]
                batch.set("conditioning", conditioning[batch.get("sample_index")])
                if epoch == 0 and t.refresh_old_policy:
                    # matrix kernels round differently per batch size: recompute the old policy on
                    # exactly these batches, before any update, so the first ratios are exactly 1
                    with torch.no_grad(), self.strategy.autocast():
                        self.loss_module.refresh_old_policy(batch)
                pieces.append(batch)
            batches.append(pieces)
        return batches

    def step(self, pieces: list[TensorDict], sums: dict[str, list], *, iteration: int = 0, epoch: int = 0,
             minibatch: int = 0) -> None:
        """One optimizer step over the micro-batches of one mini-batch; diagnostics appended to ``sums``.

        A non-finite loss or gradient norm raises ``algos.health.NumericalError`` (naming ``iteration``,
        ``epoch`` and ``minibatch``) before the weights move."""
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(piece.batch_size[0] for piece in pieces)
        minibatch_loss = None
        for batch in pieces:
            with self.strategy.autocast():
                out = self.loss_module(batch)
            loss = sum(v for k, v in out.items() if k.startswith("loss_"))
            # each micro-batch's mean loss weighted by its share: the mini-batch mean
            share = loss * (batch.batch_size[0] / total)
            self.strategy.backward(share)
            minibatch_loss = share.detach() if minibatch_loss is None else minibatch_loss + share.detach()
            for key, value in out.items():
                if value.numel() == 1:
                    sums.setdefault(key, []).append(value.detach())  # read back once, in summarise
        self.strategy.reduce_gradients(self.parameters())
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

    def update(self, pairs: TensorDict, conditioning: TensorDict, iteration: int = 0) -> dict[str, float]:
        """``inner_epochs`` passes of mini-batch updates; the diagnostics' summary, ``num_updates``, ``num_pairs``.

        ``pairs``: the (sample, step) pairs, or for a ``batch_kind == "samples"`` loss the samples.
        ``iteration``: the training iteration, named in a ``NumericalError``.
        """
        sums: dict[str, list] = {}
        num_updates = 0
        samples = self.batch_kind == SAMPLES
        if samples and pairs.batch_size[0] > 0:
            pairs = self.prepare_samples(pairs, conditioning)
        for epoch in range(self.config.inner_epochs):
            if pairs.batch_size[0] == 0:
                break
            for index, pieces in enumerate(self.minibatches(pairs, conditioning, epoch)):
                self.step(pieces, sums, iteration=iteration, epoch=epoch, minibatch=index)
                num_updates += 1
        stats = self.strategy.reduce_metrics(summarise(sums))
        stats["num_updates"] = num_updates
        stats["num_pairs"] = int(pairs.batch_size[0])
        if samples:
            # the old / EMA copies move once per rollout, after its optimiser steps
            stats.update(self.loss_module.after_update(num_updates))
            sigma = self.loss_module.tensor_keys.sigma
            stats["num_samples"] = stats["num_pairs"]
            stats["num_pairs"] = int(pairs.get(sigma).numel()) if sigma in pairs.keys() else 0
        return stats
