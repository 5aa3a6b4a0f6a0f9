"""A residual action parameterisation of the gym view, for generic RL agents (Stable-Baselines3, ...).

The plain gym view (``gym.make("FlowDenoise-Digits-v0")``) takes the *absolute* next latent as its
action, so a generic agent whose policy starts near zero must re-learn the whole denoiser before it
earns any reward. ``ResidualActionWrapper`` re-parameterises the action around the pretrained
sampler's step::

    next_latent = mean(x_t, t) + std_t * clip(a, -bound, bound)          a in R^d, d = latent size

where ``(mean, std_t)`` is the step kernel's Gaussian (``env.make_policy()``: the env's kernel,
noise level and guidance) evaluated with the env backend's velocity model at the current state. The
zero action is the pretrained sampler's mean step, and ``a ~ N(0, I)`` (unclipped) is the
pretrained stochastic sampler itself, bit for bit.

* Action space: ``Box(-bound, bound, shape=latent_shape, float32)`` (``bound = 3`` by default);
  actions outside it are clipped before use. Observations, rewards and episode length are the
  wrapped env's, unchanged.
* Deterministic (ODE) steps, i.e. steps that are not stochastic this episode (the last step under
  the default ``stochastic_steps="all_but_last"``) and every step under ``kernel="ode"``, have
  ``std_t = 0``: the residual is ignored there (the next latent is the Euler step's mean), but the
  action keeps its full dimension so the space never changes within an episode. Such steps have no
  density in the MDP; ``info["stochastic_step"]`` says which steps they were.
* Log-probabilities: the map ``a -> next_latent`` is affine with Jacobian ``std_t I``, so by the
  change of variables ``log p(next_latent) = log pi(a) - sum_i log std_t`` (see
  ``latent_log_prob``); with ``pi = N(0, I)`` this is exactly the kernel's
  ``log N(next_latent; mean, std_t^2 I)``. The identity holds for actions inside the box (the clip
  puts the mass outside it on the boundary; with a small initial log-std that mass is negligible).
  ``info["step_std"]`` carries ``std_t`` so an agent's log-probs can be converted.

``make_residual_env("FlowDenoise-Digits-v0", rewards={"digit_alignment": 1.0, "ink": 1.0})`` builds
the env with ``gym.make`` and wraps it.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

__all__ = [
    "DEFAULT_ACTION_BOUND",
    "ResidualActionWrapper",
    "latent_log_prob",
    "latent_to_residual",
    "make_residual_env",
    "residual_to_latent",
    "standard_normal_log_prob",
]

#: default half-width of the residual action box, in units of the step's std
DEFAULT_ACTION_BOUND = 3.0

Reduce = Literal["sum", "mean"]


def _reduce(per_element: Tensor, reduce: Reduce) -> Tensor:
    dims = tuple(range(1, per_element.dim()))
    if reduce == "sum":
        return per_element.sum(dim=dims) if dims else per_element
    if reduce == "mean":
        return per_element.mean(dim=dims) if dims else per_element
    raise ValueError(f"reduce must be 'sum' or 'mean'; got {reduce!r}")


def residual_to_latent(mean: Tensor, std: Tensor | float, residual: Tensor) -> Tensor:
    """``mean + std * residual``: the next latent a residual action selects (``std`` broadcasts to ``mean``)."""
    return mean + std * residual


def latent_to_residual(next_latent: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """``(next_latent - mean) / std``: the residual action that selects ``next_latent`` (``std > 0``)."""
    return (next_latent - mean) / std


def standard_normal_log_prob(residual: Tensor, reduce: Reduce = "sum") -> Tensor:
    """``log N(residual; 0, I)`` per batch element (float32; the batch is the first dimension)."""
    residual = residual.float()
    per_element = -0.5 * residual.square() - 0.5 * float(np.log(2.0 * np.pi))
    return _reduce(per_element, reduce)


def latent_log_prob(residual_log_prob: Tensor, std: Tensor | float, like: Tensor, reduce: Reduce = "sum") -> Tensor:
    """The MDP's log-density of the next latent from the agent's log-density of its residual action.

    Convention: the action ``a`` (batch-first, shape ``like.shape``) selects
    ``next_latent = mean + std * a`` with ``std > 0`` broadcasting to ``like`` (per sample
    ``(B, 1, ..., 1)`` or per element). The map is affine with Jacobian ``diag(std)``, so by the
    change of variables, per batch element::

        log p(next_latent) = log pi(a) - sum_i log std_i                  reduce="sum"

    where ``residual_log_prob`` is ``log pi(a)`` summed over the latent's elements (any agent
    density, e.g. an SB3 diagonal Gaussian's ``log_prob``). With ``pi = N(0, I)`` the result is
    ``log N(next_latent; mean, std^2 I)``, the step kernel's density
    (``flowgym.kernels.gaussian_log_prob(..., reduce="sum")``). ``reduce="mean"`` is the
    per-element average of both sides (the kernels' default scale): ``residual_log_prob`` is then
    the per-element mean of ``log pi(a)`` and ``mean_i log std_i`` is subtracted.
    Deterministic steps (``std = 0``) have no density: this raises ``ValueError`` for them.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=like.device)
    if not bool(((std > 0) & torch.isfinite(std)).all()):
        raise ValueError("std must be finite and > 0: a deterministic (ODE) step has no log-density")
    log_std = torch.log(std).expand(like.shape)
    return residual_log_prob.float() - _reduce(log_std, reduce)


class ResidualActionWrapper(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """The gym view of a ``FlowDenoise-*`` env with residual actions around the pretrained step.

    ``env``: a single gym env (``gym.make("FlowDenoise-...")``, possibly wrapped) whose ``unwrapped``
    is a ``flowgym.gym.FlowDenoiseGymEnv``. ``action_bound``: the half-width of the action box in
    step-std units (``None``: no clip, an unbounded Box). ``policy_overrides``: ``FlowPolicy``
    arguments (``kernel``, ``noise_level``, ``guidance_scale``) on top of the env's policy
    defaults, defining the step's ``(mean, std)``. See the module docstring for the maths.

    ``step`` adds ``info["step_std"]`` (the std the action was scaled by, 0 on deterministic steps)
    and ``info["stochastic_step"]`` to the wrapped env's info.
    """

    def __init__(
        self,
        env: gym.Env,
        *,
        action_bound: float | None = DEFAULT_ACTION_BOUND,
        **policy_overrides: Any,
    ) -> None:
        # recorded so that gymnasium can rebuild the wrapper from ``env.spec`` (``gym.make(env.spec)``)
        gym.utils.RecordConstructorArgs.__init__(self, action_bound=action_bound, **policy_overrides)
        gym.ActionWrapper.__init__(self, env)
        core = getattr(env.unwrapped, "core", None)
        if core is None or not hasattr(env.unwrapped, "make_policy"):
            raise TypeError(
                f"ResidualActionWrapper needs a single FlowDenoise gym env (gym.make('FlowDenoise-...')); "
                f"got {type(env.unwrapped).__name__}"
            )
        if action_bound is not None and not (np.isfinite(action_bound) and action_bound > 0):
            raise ValueError(f"action_bound must be a finite number > 0 or None; got {action_bound!r}")
        self.core = core
        self.policy = env.unwrapped.make_policy(**policy_overrides)
        self.action_bound = None if action_bound is None else float(action_bound)
        bound = np.inf if action_bound is None else float(action_bound)
        self.action_space = spaces.Box(-bound, bound, shape=tuple(core.backend.latent_shape), dtype=np.float32)
        self._last_std = 0.0

    def step_distribution(self) -> tuple[Tensor, Tensor, bool]:
        """``(mean, std, stochastic)`` of the pretrained step from the current state: ``mean`` of shape
        ``(1, *latent_shape)`` float32, ``std`` of shape ``(1, 1, ..., 1)`` (0 on deterministic steps)."""
        state = self.core.episode  # RuntimeError before the first reset
        k = int(state.step)
        if k >= self.core.num_steps:
            raise RuntimeError(f"the episode finished after {self.core.num_steps} steps; call reset() before stepping again")
        sigmas = self.core.sigmas
        stochastic = self.core.episode_stochastic_mask[k].reshape(1).to(sigmas.device)
        sigma, sigma_next = sigmas[k].reshape(1), sigmas[k + 1].reshape(1)
        with torch.no_grad():
            velocity = self.policy.velocity(state.latent, sigma, state.conditioning)
            mean, std = self.policy.step(state.latent, velocity, sigma, sigma_next, stochastic)
        return mean, std, bool(float(std.reshape(-1)[0]) > 0)

    def action(self, action: Any) -> np.ndarray:
        """The next latent (float32 numpy, the wrapped env's action) that residual ``action`` selects."""
        array = np.asarray(action, dtype=np.float32)
        if array.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape} (a residual per latent element); got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("action holds NaN or inf; the residual must be finite")
        if self.action_bound is not None:
            array = np.clip(array, -self.action_bound, self.action_bound)
        mean, std, _ = self.step_distribution()
        residual = torch.as_tensor(array, device=mean.device).unsqueeze(0)
        self._last_std = float(std.reshape(-1)[0])
        next_latent = residual_to_latent(mean, std, residual)
        return next_latent[0].cpu().numpy().astype(np.float32, copy=False)

    def step(self, action: Any):
        next_latent = self.action(action)
        std = self._last_std
        observation, reward, terminated, truncated, info = self.env.step(next_latent)
        info = {**info, "step_std": std, "stochastic_step": std > 0}
        return observation, reward, terminated, truncated, info


def make_residual_env(
    env_id_or_env: str | gym.Env = "FlowDenoise-Digits-v0",
    *,
    action_bound: float | None = DEFAULT_ACTION_BOUND,
    policy_overrides: dict[str, Any] | None = None,
    **make_kwargs: Any,
) -> ResidualActionWrapper:
    """A ``ResidualActionWrapper`` around ``gym.make(env_id, **make_kwargs)`` (or around a given env).

    ``make_kwargs`` are ``gym.make``'s flat keyword arguments (backend options, policy defaults such
    as ``kernel`` / ``noise_level``, env arguments such as ``rewards`` or ``stochastic_steps``);
    they are an error with an already-built env. ``policy_overrides`` go to ``env.make_policy``.
    """
    if isinstance(env_id_or_env, str):
        import flowgym  # noqa: F401  (registers the FlowDenoise-* ids)

        env = gym.make(env_id_or_env, **make_kwargs)
    else:
        if make_kwargs:
            raise ValueError(f"keyword arguments {sorted(make_kwargs)} need an env id, not an already-built env")
        env = env_id_or_env
    return ResidualActionWrapper(env, action_bound=action_bound, **dict(policy_overrides or {}))
