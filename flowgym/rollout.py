"""Fused rollouts: a whole ``FlowDenoiseEnv`` episode with a ``FlowPolicy`` in one loop.

TorchRL's generic ``EnvBase.rollout`` calls ``policy(td)`` and ``env.step(td)`` at every step. For a
small model that bookkeeping costs about as much as the model: per step some 0.3 ms of tensordict
work in ``EnvBase.step`` and 0.4 ms of per-step validation in the policy and the kernel, against a
1.7 ms digits forward at batch 256 on two CPU cores. In this environment the whole batch always
sits at the same step, so the schedule can be checked, and the kernel's coefficients computed, once
per episode (``FlowPolicy.plan_episode``); the loop then touches bare tensors only and writes each
step into the ``[B, K]`` trajectory as it is produced, log-probs and the finiteness check are one
pass over the whole episode, and the TensorDict is built once at the end.

``FlowDenoiseEnv.rollout`` takes this path for the usual call, a whole episode with a
``FlowPolicy`` (``env.rollout(env.num_steps, policy)``); any other call goes through TorchRL's
loop. Both give the same trajectory, key for key: ``tests/test_rollout.py`` checks they are equal
bit for bit (``sample_log_prob`` to 1e-6: ``log(std)`` may differ in its last bit between a
vectorised and a scalar ``log``), with the same generators. One difference in layout, not in
values: the trajectory's ``conditioning`` entries are expanded (read-only) views of the episode's
conditioning rather than K copies, which matters for SD3's text embeddings (flatten with
``reshape``, not ``view``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from flowgym.kernels import all_finite
from flowgym.policy import EpisodePlan, FlowPolicy
from flowgym.td_utils import stack_non_tensors, tensordict_unchecked

__all__ = ["fused_rollout", "fused_rollout_applies"]

# rollout() keyword arguments the fused path accepts, with the values it reproduces
_NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "actions": (None,),
    "auto_cast_to_device": (False,),
    "break_when_any_done": (None, True),
    "break_when_all_done": (None, False),
    "return_contiguous": (None, True, False),  # a dense stack either way for this env
    "set_truncated": (False,),
    "out": (None,),
    "trust_policy": (False, True),
    "set_state": (None, False),
}


def fused_rollout_applies(
    env,
    max_steps: int,
    policy: object,
    callback: object,
    auto_reset: bool,
    tensordict: TensorDictBase | None,
    options: Mapping[str, Any],
) -> bool:
    """Whether ``env.rollout(max_steps, policy, callback, auto_reset=..., tensordict=..., **options)``
    is one whole episode that the fused loop reproduces exactly."""
    if not isinstance(policy, FlowPolicy) or callback is not None or not auto_reset:
        return False
    if not isinstance(max_steps, int) or max_steps < env.num_steps:
        return False
    if tensordict is not None and set(tensordict.keys()) - {"prompt"}:
        return False  # anything but the prompts of a reset request is carried along by torchrl's loop
    storing = options.get("storing_device")
    if storing is not None and torch.device(storing) != env.device:
        return False
    for name, value in options.items():
        if name == "storing_device":
            continue
        if name not in _NEUTRAL_OPTIONS or not any(value is v or value == v for v in _NEUTRAL_OPTIONS[name]):
            return False
    return True


# the (B, K, *latent_shape) entries of a trajectory ("next_latent" is next/latent)
_LATENT_KEYS = ("latent", "velocity", "loc", "action", "next_latent")


def fused_rollout(env, policy: FlowPolicy, request: TensorDictBase | None = None) -> TensorDict | None:
    """Reset ``env`` (with the prompts of ``request`` if it has them) and run one whole episode.

    Returns the ``[B, K]`` trajectory torchrl's ``EnvBase.rollout`` returns, or ``None`` right
    after the reset when the policy cannot plan this episode (a zero std on a stochastic step, i.e.
    a stochastic kernel at noise level 0: the generic loop then raises the policy's own error). The
    ODE kernel plans every step as a deterministic Euler step, on any env.
    """
    state = env.start_episode(env.prompts_from_request(request))
    latent = state.latent
    plan: EpisodePlan | None = policy.plan_episode(env.sigmas, state.stochastic_mask, tuple(latent.shape))
    if plan is None:
        return None
    cond = state.conditioning
    B, K = env.batch_size[0], env.num_steps
    # each step writes into the trajectory's buffers while its tensors are still in cache:
    # stacking K tensors at the end reads them back from memory, which costs twice as much here
    buffers = {key: latent.new_empty((B, K, *latent.shape[1:])) for key in _LATENT_KEYS}
    for k, step in enumerate(plan.steps):
        buffers["latent"][:, k] = latent
        velocity = policy.velocity(latent, step.sigma, cond)
        loc, latent = policy.sample_planned(latent, velocity, step)
        buffers["velocity"][:, k] = velocity
        buffers["loc"][:, k] = loc
        buffers["action"][:, k] = latent
        buffers["next_latent"][:, k] = latent
    buffers["sample_log_prob"] = log_prob = policy.planned_log_prob(buffers["action"], buffers["loc"], plan)
    # the log-prob reads every action and mean ((action - loc)^2 with finite stds): a NaN or inf in
    # either makes it non-finite, so checking the small (B, K) result checks the whole trajectory
    if not all_finite(log_prob):  # one check (one sync) per episode instead of one per step
        bad_actions = (~torch.isfinite(buffers["action"])).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
        if bad_actions:
            raise ValueError(f"the policy's action at step {bad_actions[0]} holds NaN or inf; the next latent must be finite")
        step = int((~torch.isfinite(log_prob)).any(0).nonzero()[0])
        raise ValueError(f"the log-probability at step {step} overflows (finite but huge latents); the latents must stay finite")
    reward, reward_terms = env.finish_episode(latent)
    state.latent, state.step, state.reward_terms = latent, env.num_steps, reward_terms
    # like TorchRL, the trajectory takes the device of a reset request that has none
    device = None if request is not None and request.device is None else env.device
    return _assemble(env, plan, buffers, reward, reward_terms, device)


def _assemble(
    env, plan: EpisodePlan, buffers: dict[str, Tensor], reward: Tensor, reward_terms: TensorDict, device: torch.device | None
) -> TensorDict:
    """The ``[B, K]`` trajectory in the layout of torchrl's rollout (root: the state at each step and
    the policy's outputs; ``next``: the state after it, the reward and the done flags).

    The small per-step entries are carved out of one tensor per dtype (disjoint, contiguous
    ``[B, K]`` slices): a few large writes instead of some thirty small ones.
    """
    state = env.episode
    B, K, dev = env.batch_size[0], env.num_steps, env.device
    sigmas, stochastic = env.sigmas, plan.stochastic.to(dev)
    steps = torch.arange(K + 1, device=dev)
    # after the last step the observation repeats the final sigma and is not stochastic
    per_step_floats = torch.stack([sigmas[:K], sigmas[1:], sigmas[1:], torch.cat([sigmas[2:], sigmas[K:]])])
    floats = per_step_floats.unsqueeze(1).expand(4, B, K).contiguous()
    ints = torch.empty(6, B, K, dtype=torch.int64, device=dev)
    ints[0:2] = torch.stack([steps[:K], steps[1:]]).unsqueeze(1)
    ints[2:4] = state.prompt_index.unsqueeze(1)
    ints[4:6] = state.group_id.unsqueeze(1)
    flags = torch.zeros(8, B, K, dtype=torch.bool, device=dev)
    flags[0] = stochastic
    flags[1, :, :-1] = stochastic[1:]
    flags[5:7, :, -1] = True  # next done and terminated at the last step
    names = list(reward_terms.keys())
    rewards = torch.zeros(1 + 2 * len(names), B, K, 1, device=dev)  # next reward, root terms, next terms
    rewards[0, :, -1] = reward
    for i, name in enumerate(names):
        rewards[1 + len(names) + i, :, -1] = reward_terms.get(name)
    prompts = stack_non_tensors([state.prompt_stack] * K, stack_dim=1)
    conditioning = state.conditioning
    root = {
        "latent": buffers["latent"],
        "step": ints[0],
        "sigma": floats[0],
        "sigma_next": floats[1],
        "stochastic": flags[0],
        "prompt": prompts,
        "prompt_index": ints[2],
        "group_id": ints[4],
        "conditioning": conditioning.unsqueeze(1).expand(B, K),
        "reward_terms": {name: rewards[1 + i] for i, name in enumerate(names)},
        "done": flags[2].unsqueeze(-1),
        "terminated": flags[3].unsqueeze(-1),
        "truncated": flags[4].unsqueeze(-1),
        "velocity": buffers["velocity"],
        "loc": buffers["loc"],
        "scale": plan.scale.unsqueeze(0).expand(B, *plan.scale.shape).contiguous(),
        "action": buffers["action"],
        "sample_log_prob": buffers["sample_log_prob"],
    }
    root["next"] = {
        "latent": buffers["next_latent"],
        "step": ints[1],
        "sigma": floats[2],
        "sigma_next": floats[3],
        "stochastic": flags[1],
        "prompt": prompts,
        "prompt_index": ints[3],
        "group_id": ints[5],
        "conditioning": conditioning.unsqueeze(1).expand(B, K),
        "reward_terms": {name: rewards[1 + len(names) + i] for i, name in enumerate(names)},
        "reward": rewards[0],
        "done": flags[5].unsqueeze(-1),
        "terminated": flags[6].unsqueeze(-1),
        "truncated": flags[7].unsqueeze(-1),
    }
    return tensordict_unchecked(root, batch_size=(B, K), device=device)
