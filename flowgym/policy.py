"""The policy module: (latent, sigma, sigma_next, prompt) -> Gaussian next-latent step.

``FlowPolicy`` is a tensordict module in TorchRL's ``ProbabilisticActor`` conventions: it reads
the environment's observation keys and writes

* ``velocity`` - the backend's (guided) velocity prediction, float32;
* ``loc``, ``scale`` - mean and std of the next latent (``scale`` has shape ``(B, 1, ..., 1)``;
  it is 0 on deterministic ODE steps);
* ``action`` - the sampled next latent (``loc`` on ODE steps, or everywhere when TorchRL's
  exploration type is ``DETERMINISTIC``/``MODE``/``MEAN``);
* ``sample_log_prob`` - float32 log-density of the action, reduced over latent dimensions
  (``"mean"`` by default); 0 on ODE steps, which are never trained (``stochastic`` is False).

The env's ``stochastic`` flag says where noise is to be injected; the ``"ode"`` kernel injects none.
A ``FlowPolicy(kernel="ode")`` runs on any env, whatever its ``stochastic_steps``: every step is the
Euler step (``scale`` 0, ``action = loc``, ``sample_log_prob`` 0, also where ``stochastic`` is True).
Such a trajectory has no density to train a per-step loss on (the losses reject an ``"ode"`` policy,
and ``log_prob`` raises on rows flagged stochastic); it is a sampler (evaluation, DiffusionNFT / AWM
rollouts). With a stochastic kernel and ``noise_level=0`` the std is 0 on stochastic steps, which
``log_prob`` rejects: use ``kernel="ode"`` for deterministic sampling.

Losses call ``distribution(td)`` to recompute ``velocity, loc, scale`` with gradients and
``log_prob(action, loc, scale, stochastic)`` for the new log-probability.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor
from torchrl.envs.utils import ExplorationType, exploration_type

from flowgym.backends.base import FlowBackend
from flowgym.td_utils import as_string_list
from flowgym.kernels import (
    apply_step_coefficients,
    gaussian_log_prob,
    get_kernel,
    get_kernel_coefficients,
    isotropic_log_prob,
    log_prob_coefficients,
    ode_coefficients,
    ode_step,
)

__all__ = ["EpisodePlan", "FlowPolicy", "POLICY_IN_KEYS", "POLICY_OUT_KEYS", "PlannedStep"]

POLICY_IN_KEYS = ["latent", "sigma", "sigma_next", "stochastic", "conditioning"]
POLICY_OUT_KEYS = ["velocity", "loc", "scale", "action", "sample_log_prob"]


@dataclass(frozen=True)
class PlannedStep:
    """One denoising step of an episode in which the whole batch sits at the same step.

    ``mean = c_x * x + c_v * v`` with the kernel's coefficients (the Euler ODE step's on
    deterministic steps) and, on stochastic steps, ``x_next = mean + std * noise``. The floats are
    the exact float32 values ``forward`` computes per sample; ``sigma`` is the ``(B,)`` noise
    level given to the model.
    """

    sigma: Tensor
    stochastic: bool
    c_x: float
    c_v: float
    std: float


@dataclass(frozen=True)
class EpisodePlan:
    """The planned steps of one episode and the per-step tensors of its trajectory.

    ``stochastic``: the env's ``(K,)`` flags, as the trajectory records them (under the ODE kernel
    every ``PlannedStep`` is deterministic all the same); ``scale``: ``(K, 1, ..., 1)`` std per step
    (0 on deterministic steps), as ``forward`` outputs it; ``quadratic`` and ``constant``: ``(K,)`` log-density terms
    (``flowgym.kernels.log_prob_coefficients``; 0 on deterministic steps, whose log-prob is 0).
    """

    steps: list[PlannedStep]
    stochastic: Tensor
    scale: Tensor
    quadratic: Tensor
    constant: Tensor


def _deterministic_exploration() -> bool:
    return exploration_type() in (ExplorationType.DETERMINISTIC, ExplorationType.MODE, ExplorationType.MEAN)


class _NoiseStream:
    """A seeded noise generator created lazily on the device the noise is drawn on (shareable)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator: torch.Generator | None = None

    def on(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator


class FlowPolicy(TensorDictModuleBase):
    """Gaussian denoising policy around a backend and a step kernel.

    Args:
        backend: the model family (its velocity model carries the trainable parameters).
        kernel: ``"flow_sde"`` (Flow-GRPO, default), ``"cps"``, ``"dance_sde"`` or ``"ode"``
            (deterministic Euler steps on every step of any env, see the module docstring).
        noise_level: the kernel's noise level (a for Flow-SDE, eta for CPS / Dance-SDE).
        guidance_scale: classifier-free guidance scale (1.0 = no CFG).
        reduce: log-prob reduction over latent dimensions, ``"mean"`` (default) or ``"sum"``.
        log_prob_convention: ``"exact"`` (default) or ``"cps_legacy"`` (constant-free, see
            ``flowgym.kernels.gaussian_log_prob``).
        seed: seeds the policy's own noise generator (None: a random seed).
    """

    in_keys = POLICY_IN_KEYS
    out_keys = POLICY_OUT_KEYS

    def __init__(
        self,
        backend: FlowBackend,
        kernel: str = "flow_sde",
        noise_level: float = 0.7,
        guidance_scale: float = 1.0,
        reduce: Literal["mean", "sum"] = "mean",
        log_prob_convention: Literal["exact", "cps_legacy"] = "exact",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")
        if log_prob_convention not in ("exact", "cps_legacy"):
            raise ValueError(f"log_prob_convention must be 'exact' or 'cps_legacy'; got {log_prob_convention!r}")
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0; got {noise_level}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0; got {guidance_scale}")
        self.backend = backend
        self.kernel_name = kernel
        self.kernel = get_kernel(kernel)
        self.kernel_coefficients = get_kernel_coefficients(kernel)
        self.noise_level = float(noise_level)
        self.guidance_scale = float(guidance_scale)
        self.reduce = reduce
        self.log_prob_convention = log_prob_convention
        self._stream = _NoiseStream(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))

    # ------------------------------------------------------------------ randomness
    def set_seed(self, seed: int) -> None:
        """Re-seed the noise generator (created lazily on the backend's device)."""
        self._stream.seed, self._stream.generator = int(seed), None

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        return self._stream.on(device)

    def with_guidance(self, guidance_scale: float) -> "FlowPolicy":
        """This policy with another classifier-free guidance scale (for evaluation), sharing the backend
        and the noise stream: sampling with either advances the same generator. ``self`` is unchanged."""
        if float(guidance_scale) == self.guidance_scale:
            return self
        other = FlowPolicy(
            self.backend, self.kernel_name, self.noise_level, guidance_scale, self.reduce, self.log_prob_convention,
            seed=self._stream.seed,
        )
        other._stream = self._stream
        return other

    def generator_state(self) -> Tensor:
        return self._noise_generator(self.backend.device).get_state()

    def set_generator_state(self, state: Tensor) -> None:
        self._noise_generator(self.backend.device).set_state(state)

    # ------------------------------------------------------------------ maths
    def conditioning(self, td: TensorDictBase):
        """The conditioning of ``td``: its ``conditioning`` entry, else the cached prompt encoding."""
        if "conditioning" in td.keys():
            return td.get("conditioning")
        if "prompt" not in td.keys():
            raise KeyError("the tensordict needs 'conditioning' or 'prompt' for the policy")
        prompts = td.get("prompt")
        prompts = as_string_list(prompts)
        return self.backend.encode_prompts(prompts).to(td.device or self.backend.device)

    def velocity(self, latent: Tensor, sigma: Tensor, cond) -> Tensor:
        """The backend's (guided) velocity in float32, the latent cast to the model's dtype."""
        return self.backend.velocity(latent.to(self.backend.dtype), sigma, cond, self.guidance_scale).float()

    def distribution(self, td: TensorDictBase) -> tuple[Tensor, Tensor, Tensor]:
        """``(velocity, loc, scale)`` for the states in ``td`` (differentiable w.r.t. the model)."""
        latent = td.get("latent")
        sigma, sigma_next = td.get("sigma"), td.get("sigma_next")
        stochastic = td.get("stochastic").reshape(-1)
        velocity = self.velocity(latent, sigma, self.conditioning(td))
        return (velocity, *self.step(latent, velocity, sigma, sigma_next, stochastic))

    def step(
        self, latent: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor, stochastic: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Kernel ``(loc, scale)`` on stochastic rows, the Euler ODE step (scale 0) elsewhere."""
        latent = latent.float()
        shape = (-1,) + (1,) * (latent.dim() - 1)
        mask = stochastic.reshape(shape).bool()
        num_stochastic = int(mask.sum()) if self.kernel_name != "ode" else 0  # one device sync
        if num_stochastic == 0:
            loc_ode, _ = ode_step(latent, velocity, sigma, sigma_next)
            return loc_ode, latent.new_zeros((latent.shape[0],) + (1,) * (latent.dim() - 1))
        loc_sde, std = self.kernel(latent, velocity, sigma, sigma_next, self.noise_level)
        std = std.expand(latent.shape[0], *([1] * (latent.dim() - 1)))
        if num_stochastic == latent.shape[0]:  # the usual case: the whole batch sits at the same stochastic step
            return loc_sde, std
        loc_ode, _ = ode_step(latent, velocity, sigma, sigma_next)
        return torch.where(mask, loc_sde, loc_ode), torch.where(mask, std, torch.zeros_like(std))

    @property
    def deterministic(self) -> bool:
        """Whether this policy never draws noise (the ``"ode"`` kernel): all its steps are Euler steps."""
        return self.kernel_name == "ode"

    def noisy_steps(self, stochastic: Tensor) -> Tensor:
        """The rows this policy draws noise at: the env's ``stochastic`` flags, none for the ODE kernel."""
        stochastic = stochastic.reshape(-1).bool()
        return torch.zeros_like(stochastic) if self.deterministic else stochastic

    def log_prob(self, action: Tensor, loc: Tensor, scale: Tensor, stochastic: Tensor) -> Tensor:
        """Float32 log-density per sample (reduced by ``self.reduce``); 0 on ODE rows.

        A stochastic row whose scale is 0 (noise level 0) raises ``ValueError``, and so does any row
        flagged stochastic under the ``"ode"`` kernel, which has no density at all.
        """
        mask = stochastic.reshape(-1).bool()
        if self.deterministic:
            if bool(mask.any()):
                raise ValueError(
                    "FlowPolicy(kernel='ode') is deterministic: its steps have no log-probability, so it cannot be "
                    "trained with a per-step loss; train with a stochastic kernel (kernel='flow_sde', 'cps' or "
                    "'dance_sde'). Its rollouts record sample_log_prob = 0 on every step."
                )
            return torch.zeros(mask.shape[0], dtype=torch.float32, device=loc.device)
        shape = (-1,) + (1,) * (loc.dim() - 1)
        safe_scale = torch.where(mask.reshape(shape), scale, torch.ones_like(scale))
        logp = gaussian_log_prob(action, loc, safe_scale, self.reduce, convention=self.log_prob_convention)
        return torch.where(mask, logp, torch.zeros_like(logp))

    # ------------------------------------------------------------------ module API
    def _noise(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self._noise_generator(like.device), device=like.device)

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        latent, sigma, sigma_next = td.get("latent"), td.get("sigma"), td.get("sigma_next")
        stochastic = td.get("stochastic").reshape(-1)
        velocity = self.velocity(latent, sigma, self.conditioning(td))
        loc, scale = self.step(latent, velocity, sigma, sigma_next, stochastic)
        # noise is drawn at deterministic steps too (scale 0 there): the draw for step k is then the
        # k-th whatever the stochastic window, and ``sample_planned`` consumes the generator alike
        action = loc if _deterministic_exploration() else loc + scale * self._noise(loc)
        td.set("velocity", velocity)
        td.set("loc", loc)
        td.set("scale", scale)
        td.set("action", action)
        td.set("sample_log_prob", self.log_prob(action, loc, scale, self.noisy_steps(stochastic)))
        return td

    # ------------------------------------------------------------------ fused rollouts
    def plan_episode(self, sigmas: Tensor, stochastic_mask: Tensor, latent_shape: tuple[int, ...]) -> EpisodePlan | None:
        """The plan of a whole episode for a batch of latents of shape ``latent_shape`` (``(B, ...)``)
        that step together: ``sigmas`` is the K + 1 schedule, ``stochastic_mask`` the K flags.
        Computed once per distinct episode (the coefficients of every step in one call) and cached.
        ``None`` when the episode cannot be sampled step-wise like ``forward`` does: a zero std on a
        stochastic step (noise level 0), which ``forward`` rejects with its own error. Under the ODE
        kernel every step is planned deterministic, whatever ``stochastic_mask`` says.
        """
        stochastic = tuple(bool(f) for f in stochastic_mask.tolist())
        key = (tuple(sigmas.tolist()), stochastic, tuple(latent_shape), str(sigmas.device), self.kernel_name,
               self.noise_level, self.reduce, self.log_prob_convention)
        cache = self.__dict__.setdefault("_plans", {})
        if key not in cache:
            if len(cache) >= 64:  # windows give a handful of distinct episodes; bound it anyway
                cache.clear()
            cache[key] = self._plan(sigmas.float(), stochastic, tuple(latent_shape))
        return cache[key]

    def _plan(self, sigmas: Tensor, stochastic: tuple[bool, ...], latent_shape: tuple[int, ...]) -> EpisodePlan | None:
        flags = torch.tensor(stochastic, dtype=torch.bool, device=sigmas.device)  # the env's, kept in the trajectory
        if self.deterministic:
            stochastic = (False,) * len(stochastic)  # the ODE kernel draws no noise anywhere
        s, s_next = sigmas[:-1], sigmas[1:]
        c_x, c_v, std = (t.expand_as(s) for t in self.kernel_coefficients(s, s_next, self.noise_level))
        mask = torch.tensor(stochastic, dtype=torch.bool, device=sigmas.device)
        if not bool((std > 0)[mask].all()):
            return None
        ode_x, ode_v, _ = ode_coefficients(s, s_next)
        c_x, c_v, std = torch.where(mask, c_x, ode_x), torch.where(mask, c_v, ode_v), torch.where(mask, std, 0.0)
        quadratic, constant = log_prob_coefficients(torch.where(mask, std, 1.0), self.reduce, math.prod(latent_shape[1:]))
        steps = [
            PlannedStep(sigma=s[k].expand(latent_shape[0]), stochastic=flag, c_x=cx, c_v=cv, std=sd)
            for k, (flag, cx, cv, sd) in enumerate(zip(stochastic, c_x.tolist(), c_v.tolist(), std.tolist()))
        ]
        return EpisodePlan(
            steps=steps,
            stochastic=flags,
            scale=std.reshape(-1, *([1] * (len(latent_shape) - 1))),
            quadratic=torch.where(mask, quadratic, 0.0),
            constant=torch.where(mask, constant, 0.0),
        )

    def sample_planned(self, latent: Tensor, velocity: Tensor, step: PlannedStep) -> tuple[Tensor, Tensor]:
        """``(loc, action)`` of one planned step: bit for bit what ``forward`` gives for the same
        state and generator, without re-validating the schedule at every step."""
        loc = apply_step_coefficients(latent.float(), velocity, step.c_x, step.c_v)
        if _deterministic_exploration():
            return loc, loc
        noise = self._noise(loc)  # drawn at deterministic steps too, as ``forward`` does
        if not step.stochastic:
            return loc, loc
        return loc, noise.mul_(step.std).add_(loc)  # loc + std * noise, in place on the fresh noise

    def planned_log_prob(self, action: Tensor, loc: Tensor, plan: EpisodePlan) -> Tensor:
        """``sample_log_prob`` of a whole planned episode, ``(B, K)`` from ``(B, K, ...)`` actions and
        means, in one pass (a pass per step costs more): per step the value ``forward`` gives, up to
        the last bit of ``log(std)``. On deterministic steps (action = mean) it is 0, and it is
        NaN or inf wherever an action or a mean is."""
        B, K = action.shape[:2]
        action, loc = action.flatten(0, 1), loc.flatten(0, 1)
        if self.log_prob_convention == "exact":
            flat = isotropic_log_prob(action, loc, plan.quadratic.repeat(B), plan.constant.repeat(B), self.reduce)
        else:  # -(action - loc)^2: -0.0 on deterministic steps
            flat = gaussian_log_prob(action, loc, 1.0, self.reduce, convention=self.log_prob_convention)
        return flat.view(B, K)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Evaluate the reference (pretrained) policy inside this context."""
        with self.backend.reference():
            yield

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.backend.trainable_parameters()
