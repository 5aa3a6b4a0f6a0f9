"""The ratio-noise diagnostic: how much of a single-sample log-ratio is noise, per denoising step.

For a Gaussian step policy with shared std ``s``, old mean ``mu_old``, new mean ``mu_new``,
``d = mu_new - mu_old`` and the rollout's action ``x = mu_old + s * eps``::

    log r = log N(x; mu_new, s^2) - log N(x; mu_old, s^2)
          = eps^T d / s  -  ||d||^2 / (2 s^2)          (sum over the n latent dimensions)

Averaged over the dimensions (the scale on which clip ranges and thresholds are published)::

    log r_mean = noise - D,   noise = mean(eps * d) / s ~ N(0, 2 D / n),   D = mean(d^2) / (2 s^2)

``D`` is the exact KL between the old and new step policy (the divergence Flow-DPPO's mask uses).
The noise term's standard deviation ``sqrt(2 D / n)`` dwarfs the signal ``D`` whenever
``D << 2 / n``: whether a sample's ratio leaves the clip band ``[1 - eps, 1 + eps]`` then says
almost nothing about whether the policy moved far at that state.

``ratio_noise_probe`` measures this on a real policy: it trains ``warmup`` iterations, collects a
rollout, takes optimiser steps on its mini-batches like the trainer does, and after each count in
``probe_steps`` records, for every trained (sample, step) pair, the sampled log-ratio, its noise
term, the exact ``D``, the advantage and the step index. The pure functions below turn those
arrays into the report's numbers.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "ratio_noise_probe",
    "log_ratio_decomposition",
    "decision_stats",
    "calibrated_clip_range",
    "spearman",
    "per_step_stats",
]


# --------------------------------------------------------------------------- pure maths
def log_ratio_decomposition(action, loc_old, loc_new, scale):
    """``(noise, signal)`` per element of the batch, both averaged over latent dimensions (torch tensors).

    ``noise = mean_dims(eps * d) / s`` with ``eps = (action - loc_old) / s``, ``d = loc_new - loc_old``;
    ``signal = -mean_dims(d^2) / (2 s^2) = -D``. Their sum is the mean-reduced exact log-ratio
    ``log N(action; loc_new, s^2) - log N(action; loc_old, s^2)``.
    """
    action, loc_old, loc_new, scale = (t.float() for t in (action, loc_old, loc_new, scale))
    eps = (action - loc_old) / scale
    d = loc_new - loc_old
    dims = tuple(range(1, d.dim()))
    noise = (eps * d / scale).mean(dim=dims)
    signal = -((d / scale) ** 2).mean(dim=dims) / 2.0
    return noise, signal


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (average ranks for ties); NaN if constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d sequences of equal length; got {a.shape} and {b.shape}")

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def calibrated_clip_range(log_ratio: Sequence[float], kl: Sequence[float], delta: float) -> float:
    """The clip range ``eps`` whose band ``|ratio - 1| > eps`` flags as many pairs as ``D >= delta``.

    With equal flag rates, any disagreement between the two rules comes from which pairs they
    flag, not from how many. NaN when ``D >= delta`` flags none or all pairs.
    """
    deviation = np.abs(np.expm1(np.asarray(log_ratio, dtype=np.float64)))
    flagged = float(np.mean(np.asarray(kl, dtype=np.float64) >= delta))
    if flagged <= 0.0 or flagged >= 1.0:
        return math.nan
    return float(np.quantile(deviation, 1.0 - flagged))


def decision_stats(log_ratio, kl, advantage, clip_range: float, delta: float) -> dict[str, float]:
    """Ratio-clipping decisions against divergence-based ones, over pairs (fractions in [0, 1]).

    Trust-region exit, per pair: the ratio rule says ``|ratio - 1| > clip_range`` (the sampled
    ratio left PPO's band), the divergence rule says ``D >= delta`` (the step policy moved).

    * ``ratio_outside``, ``kl_outside``: how often each rule fires;
    * ``disagree``: the rules differ; ``over_constrained``: ratio outside although ``D < delta``;
      ``under_constrained``: ``D >= delta`` although the ratio is inside the band;
    * gradient level, among pairs with ``A != 0``: ``clip_blocked`` (PPO-clip zeroes the gradient:
      ``A > 0, ratio > 1 + eps`` or ``A < 0, ratio < 1 - eps``), ``mask_blocked`` (Flow-DPPO's
      mask: ``A > 0, ratio > 1, D >= delta`` or ``A < 0, ratio < 1, D >= delta``) and
      ``blocked_disagree`` (one blocks, the other does not).
    """
    log_ratio = np.asarray(log_ratio, dtype=np.float64)
    kl = np.asarray(kl, dtype=np.float64)
    advantage = np.asarray(advantage, dtype=np.float64)
    if not (log_ratio.shape == kl.shape == advantage.shape) or log_ratio.size == 0:
        raise ValueError(f"log_ratio, kl and advantage must be non-empty and of equal shape; got {log_ratio.shape}, {kl.shape}, {advantage.shape}")
    if not (clip_range >= 0 and delta >= 0):
        raise ValueError(f"clip_range and delta must be >= 0; got {clip_range}, {delta}")
    ratio = np.exp(log_ratio)
    ratio_out = np.abs(ratio - 1.0) > clip_range
    kl_out = kl >= delta
    nonzero = advantage != 0
    pos, neg = advantage > 0, advantage < 0
    clip_blocked = (pos & (ratio > 1 + clip_range)) | (neg & (ratio < 1 - clip_range))
    mask_blocked = (pos & (ratio > 1) & kl_out) | (neg & (ratio < 1) & kl_out)
    denominator = max(int(nonzero.sum()), 1)
    return {
        "clip_range": float(clip_range),
        "delta": float(delta),
        "ratio_outside": float(ratio_out.mean()),
        "kl_outside": float(kl_out.mean()),
        "disagree": float((ratio_out != kl_out).mean()),
        "over_constrained": float((ratio_out & ~kl_out).mean()),
        "under_constrained": float((~ratio_out & kl_out).mean()),
        "clip_blocked": float((clip_blocked & nonzero).sum() / denominator),
        "mask_blocked": float((mask_blocked & nonzero).sum() / denominator),
        "blocked_disagree": float(((clip_blocked != mask_blocked) & nonzero).sum() / denominator),
    }


def per_step_stats(step, log_ratio, kl, noise, dim: int) -> list[dict[str, float]]:
    """Per denoising step: mean D, the log-ratio's mean and std, the noise std predicted from D
    (``sqrt(mean(2 D / n))``), and the share of the log-ratio's variance that the signal ``-D`` explains."""
    step, log_ratio, kl, noise = (np.asarray(x, dtype=np.float64) for x in (step, log_ratio, kl, noise))
    out = []
    for k in np.unique(step):
        sel = step == k
        lr, d = log_ratio[sel], kl[sel]
        var = lr.var()
        out.append({
            "step": int(k),
            "pairs": int(sel.sum()),
            "kl_mean": float(d.mean()),
            "log_ratio_mean": float(lr.mean()),
            "log_ratio_std": float(lr.std()),
            "noise_std_predicted": float(np.sqrt(np.mean(2.0 * d / dim))),
            "noise_std": float(noise[sel].std()),
            "signal_share": float(d.var() / var) if var > 0 else math.nan,
        })
    return out


# --------------------------------------------------------------------------- the probe
def ratio_noise_probe(
    config: Mapping[str, Any],
    work_dir: str | Path,
    *,
    warmup: int = 5,
    probe_steps: Sequence[int] = (1, 4),
) -> dict[str, Any]:
    """Measure sampled log-ratios against exact per-step KLs on a policy being trained.

    Trains ``warmup`` iterations of ``config`` (no evaluation, no checkpoints), collects one more
    rollout and splits its trained pairs into the trainer's mini-batches; then takes optimiser
    steps on them (cycling through the mini-batches, the algorithm's own loss) and, after each
    count in ``probe_steps``, evaluates every pair against the rollout's (old) policy.

    Returns ``{"dim", "num_steps", "warmup", "decomposition_max_abs_error", "probes": {count:
    {"step", "kl", "log_ratio", "noise", "advantage", "seen"}}}`` (lists; JSON-serialisable).
    ``seen`` marks the pairs the optimiser steps were taken on: for those, the action's noise
    ``eps`` helped choose the update, so ``eps^T d`` is biased towards ``sign(A)``; for the others
    (the next mini-batch, which is where a trainer's clip or mask decision is taken) it is pure
    noise given ``d``.
    """
    import torch

    from algos.trainer import Trainer

    if warmup < 0 or not probe_steps or min(probe_steps) < 1:
        raise ValueError(f"warmup must be >= 0 and probe_steps positive counts; got {warmup}, {list(probe_steps)}")
    cfg = copy.deepcopy(dict(config))
    cfg["trainer"] = {**cfg["trainer"], "iterations": max(int(warmup), 1), "eval_every": 0, "checkpoint_every": 0}
    cfg["logger"] = {**(cfg.get("logger") or {}), "backends": []}
    trainer = Trainer(cfg, work_dir, progress=False)
    if warmup > 0:
        trainer.train()
    rollout = trainer.collect()  # one more rollout of the warmed-up policy
    pairs = trainer.training_pairs(rollout)
    pairs.set("conditioning", rollout["conditioning"][pairs.get("sample_index")])
    generator = torch.Generator().manual_seed(int(cfg["seed"]) + 7)
    order = torch.randperm(pairs.batch_size[0], generator=generator)
    chunks = order.chunk(int(cfg["trainer"]["num_minibatches"]))
    loss_module = trainer.loss_module
    dim = int(np.prod(pairs.get("latent").shape[1:]))
    probes: dict[str, dict[str, list[float]]] = {}
    max_error = 0.0
    taken = 0
    seen = torch.zeros(pairs.batch_size[0], dtype=torch.bool)
    for target in sorted(set(int(s) for s in probe_steps)):
        while taken < target:
            chunk = chunks[taken % len(chunks)]
            seen[chunk] = True
            trainer.updater.step([pairs[chunk.to(pairs.device)]], {})  # the trainer's own optimizer step
            taken += 1
        with torch.no_grad():
            ev = loss_module.evaluate(pairs)
            noise, signal = log_ratio_decomposition(pairs.get("action"), ev.loc_old, ev.loc_new, ev.scale)
            max_error = max(max_error, float((ev.log_ratio - (noise + signal)).abs().max()))
        probes[str(target)] = {
            "step": pairs.get("step").reshape(-1).cpu().tolist(),
            "kl": ev.kl_old_new.double().cpu().tolist(),
            "log_ratio": ev.log_ratio.double().cpu().tolist(),
            "noise": noise.double().cpu().tolist(),
            "advantage": ev.advantage.double().cpu().tolist(),
            "seen": seen.tolist(),
        }
    return {
        "dim": dim,
        "num_steps": int(trainer.env.num_steps),  # the family fills in an unset env.num_steps
        "warmup": int(warmup),
        "decomposition_max_abs_error": max_error,
        "probes": probes,
    }
