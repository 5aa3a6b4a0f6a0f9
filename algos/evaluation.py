"""Evaluation and the drift diagnostic, measured identically for every algorithm.

* ``drift_kl(backend, policy, td, autocast)``: the mean exact KL between the current and the
  reference (pretrained) policy's step Gaussians at ``td``'s states: both velocities go through the
  Flow-SDE kernel at noise level 0.7 (``DRIFT_KERNEL_NOISE``, whatever kernel the algorithm trains
  with), KL averaged over dimensions and samples. ``td`` must hold the current policy's ``velocity``.
* ``Evaluator.evaluate()``: the deterministic ODE sampler on each eval prompt set (the training
  prompts, and the held-out set when the config names one) in chunks of ``trainer.eval_batch_size``:
  the reward terms, the drift KL along the ODE trajectory and the model family's prior-capability
  metrics (``backend.prior_capability_metrics``). The evaluation's guidance scale is given to the
  evaluator (``trainer.eval_guidance_scale``); the training policy is never changed. The last
  evaluation's images and prompts stay in ``Evaluator.samples`` (the trainer's sample grids).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from tensordict import NonTensorStack, TensorDict

from algos.ema import ParameterEMA
from algos.strategy import SingleDevice, Strategy
from flowgym.backends.base import FlowBackend
from flowgym.env import FlowDenoiseEnv
from flowgym.kernels import flow_sde_step, gaussian_kl
from flowgym.policy import FlowPolicy
from flowgym.rewards import RewardComposer

__all__ = ["DRIFT_KERNEL_NOISE", "Evaluator", "drift_kl", "drift_sample_indices", "final_rewards", "trajectory_drift"]

#: the kernel noise level at which drift KL is measured, the same for every algorithm
DRIFT_KERNEL_NOISE = 0.7


def final_rewards(traj: TensorDict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The terminal reward ``(B,)`` and reward terms of a ``[B, K]`` trajectory, as contiguous copies:
    reductions over the strided last-step view would sum in another order."""
    reward = traj.get(("next", "reward"))[:, -1].reshape(-1).contiguous()
    terms = {name: value[:, -1].reshape(-1).contiguous() for name, value in traj.get(("next", "reward_terms")).items()}
    return reward, terms


def drift_kl(backend: FlowBackend, policy: FlowPolicy, td: TensorDict, autocast: Callable[[], ContextManager[Any]]) -> torch.Tensor:
    """Mean exact KL between the current and the reference policy's step Gaussians at ``td``'s states
    (see the module docstring); the reference velocity uses ``policy``'s guidance scale."""
    with autocast(), policy.reference():
        v_ref = backend.velocity(td.get("latent").to(backend.dtype), td.get("sigma"), td.get("conditioning"), policy.guidance_scale).float()
    args = (td.get("sigma"), td.get("sigma_next"), DRIFT_KERNEL_NOISE)
    loc_now, std = flow_sde_step(td.get("latent"), td.get("velocity"), *args)
    loc_ref, _ = flow_sde_step(td.get("latent"), v_ref, *args)
    return gaussian_kl(loc_now, loc_ref, std).mean()


def drift_sample_indices(batch: int, samples: int | None) -> torch.Tensor | None:
    """The rows of a ``batch``-sample rollout that the drift estimate reads: ``samples`` evenly spaced
    indices ``floor(i * batch / samples)`` (groups are contiguous, so ``samples`` = the number of
    groups takes one sample of each), or None (every sample) when ``samples`` is None or >= ``batch``."""
    if samples is None or samples >= batch:
        return None
    if samples < 1:
        raise ValueError(f"trainer.drift_samples must be >= 1 or null (every sample); got {samples}")
    return torch.div(torch.arange(samples) * batch, samples, rounding_mode="floor")


def trajectory_drift(
    backend: FlowBackend,
    policy: FlowPolicy,
    traj: TensorDict,
    autocast: Callable[[], ContextManager[Any]],
    *,
    samples: torch.Tensor | None = None,
    rows_per_forward: int | None = None,
) -> torch.Tensor:
    """The drift KL of a ``[B, K]`` trajectory: ``drift_kl`` over every (sample, step) state but the
    last step's, as one mean over all those rows (each step has the same B rows, so it equals the
    mean of the per-step means).

    The states of all steps go through the reference model together, ``rows_per_forward`` rows per
    forward (None: all at once; bound it for large models), instead of one small forward per step.
    ``samples`` (indices into B) restricts the estimate to those samples: an unbiased estimate of the
    full-batch mean over the sampled trajectories; its standard error is the spread of the per-sample
    mean KL over sqrt(len(samples)), larger than the row-level spread suggests because the steps of
    one trajectory are correlated.
    """
    B, K = traj.batch_size
    chosen = torch.arange(B) if samples is None else samples.cpu()
    # (sample, step) pairs, gathered one chunk at a time: the expanded conditioning is never copied K times
    sample_of_row = chosen.repeat_interleave(K - 1).to(traj.device)
    step_of_row = torch.arange(K - 1).repeat(len(chosen)).to(traj.device)
    num_rows = sample_of_row.numel()
    chunk = num_rows if rows_per_forward is None else int(rows_per_forward)
    if chunk < 1:
        raise ValueError(f"trainer.drift_rows_per_forward must be >= 1 or null (all at once); got {rows_per_forward}")
    states = traj.select("latent", "sigma", "sigma_next", "velocity", "conditioning")
    total = torch.zeros((), device=traj.device)
    for start in range(0, num_rows, chunk):
        rows = states[sample_of_row[start : start + chunk], step_of_row[start : start + chunk]]
        total = total + drift_kl(backend, policy, rows, autocast) * rows.batch_size[0]
    return total / max(num_rows, 1)


class Evaluator:
    """ODE evaluation of ``policy`` on named prompt lists (see the module docstring).

    Args:
        policy: the training policy; evaluated with ``guidance_scale`` (None: its own) on its noise stream.
        rewards: the composer the training env scores with.
        eval_sets: ``{split: prompts}``, each prompt repeated once per sample.
        num_steps, shift: the ODE schedule.
        batch_size: samples per evaluation episode (None: a whole split at once).
        seed: the evaluation envs' seeds are ``seed + 1000 + chunk start``.
        autocast: the strategy's context for model forwards.
        drift_rows_per_forward: states per reference forward of the drift KL (None: a chunk's all at once).
    """

    def __init__(
        self,
        policy: FlowPolicy,
        rewards: RewardComposer,
        eval_sets: Mapping[str, Sequence[str]],
        *,
        num_steps: int,
        shift: float | str,
        device: torch.device,
        seed: int,
        autocast: Callable[[], ContextManager[Any]],
        batch_size: int | None = None,
        guidance_scale: float | None = None,
        drift_rows_per_forward: int | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.strategy = strategy if strategy is not None else SingleDevice(device)
        self.policy = policy if guidance_scale is None else policy.with_guidance(guidance_scale)
        self.backend = policy.backend
        self.rewards = rewards
        self.eval_sets = {name: list(prompts) for name, prompts in eval_sets.items()}
        self.num_steps, self.shift, self.device, self.seed = int(num_steps), shift, device, int(seed)
        self.batch_size, self.drift_rows_per_forward = batch_size, drift_rows_per_forward
        self.autocast = autocast
        #: ``{split: (images (N, C, H, W) in [0, 1], prompts)}`` of the last evaluation (for sample grids)
        self.samples: dict[str, tuple[torch.Tensor, list[str]]] = {}

    @torch.no_grad()
    def evaluate(self, ema: ParameterEMA | None = None) -> dict[str, float]:
        """Metrics of every eval split, with the EMA weights swapped in when there is an EMA."""
        results: dict[str, float] = {}
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            for split, prompts in self.eval_sets.items():
                results.update(self.evaluate_prompts(split, prompts))
        return results

    def rollout(self, env: FlowDenoiseEnv, request: TensorDict | None = None) -> TensorDict:
        """One whole episode of ``env`` with the evaluation policy (the fused ``env.rollout``)."""
        with self.autocast():
            return env.rollout(env.num_steps, self.policy, tensordict=request)

    def evaluate_prompts(self, split: str, prompts: list[str]) -> dict[str, float]:
        """ODE samples for ``prompts`` in chunks; metrics over all of them, named ``eval/<split>/<metric>``.

        With several processes the chunks are dealt out round-robin (chunk size
        ``trainer.eval_batch_size``, or the split over the processes when it is None) and their results
        gathered: a chunk's noise depends on its start only, so the metrics are those of one process
        evaluating in the same chunks. The images (prior-capability metrics, sample grids) go to the
        main process only, which alone returns those metrics."""
        rank, world = self.strategy.rank, self.strategy.world_size
        chunk = int(self.batch_size or -(-len(prompts) // world))
        starts = list(range(0, len(prompts), chunk))
        mine = starts[rank::world]
        if self.strategy.lockstep_forwards:  # FSDP: every process runs as many forwards (extra ones discarded)
            mine += [None] * (-(-len(starts) // world) - len(mine))
        results = []
        for start in mine:
            result = self._evaluate_chunk(prompts, start if start is not None else 0, chunk)
            if start is not None:
                if world > 1:  # gathered through pickles: host copies
                    reward, reward_terms, drift, images = result
                    result = (reward.cpu(), {k: v.cpu() for k, v in reward_terms.items()}, drift.cpu(), images.cpu())
                results.append((start, *result))
        reduced = [r for part in self.strategy.all_gather_objects([r[:4] for r in results]) for r in part]
        reduced.sort(key=lambda r: r[0])
        images = self.strategy.gather_objects([(r[0], r[4]) for r in results])
        rewards = [r[1] for r in reduced]
        terms = {name: [r[2][name] for r in reduced] for name in (reduced[0][2] if reduced else {})}
        drift = [r[3] for r in reduced]
        out = {f"eval/{split}/reward": float(torch.cat(rewards).mean())}
        for name, values in terms.items():
            out[f"eval/{split}/{name}"] = float(torch.cat(values).mean())
        out[f"eval/{split}/drift_kl"] = float(torch.stack(drift).mean()) if drift else 0.0
        if images is None:
            return out  # not the main process
        all_images = torch.cat([image for _, image in sorted((i for part in images for i in part), key=lambda i: i[0])])
        all_images = all_images.to(self.device) if world > 1 else all_images
        self.samples[split] = (all_images.detach().cpu(), list(prompts))
        for name, value in self.backend.prior_capability_metrics(all_images, prompts).items():
            out[f"eval/{split}/{name}"] = float(value)
        return out

    def _evaluate_chunk(self, prompts: list[str], start: int, chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One chunk's rewards, reward terms, drift KL and images."""
        part = prompts[start : start + chunk]
        env = FlowDenoiseEnv(
            self.backend, num_prompts=1, group_size=len(part), num_steps=self.num_steps,
            shift=self.shift, prompts=part, rewards=self.rewards, stochastic_steps="none",
            device=self.device, seed=self.seed + 1000 + start,
        )
        request = TensorDict({}, batch_size=env.batch_size, device=self.device)
        request.set("prompt", NonTensorStack(*part, batch_size=env.batch_size))
        traj = self.rollout(env, request)
        drift = trajectory_drift(self.backend, self.policy, traj, self.autocast, rows_per_forward=self.drift_rows_per_forward)
        reward, reward_terms = final_rewards(traj)
        return reward, reward_terms, drift, env.last_images.detach()
