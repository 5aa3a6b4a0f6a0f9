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

Losses call ``distribution(td)`` to recompute ``velocity, loc, scale`` with gradients and
``log_prob(action, loc, scale, stochastic)`` for the new log-probability.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor
from torchrl.envs.utils import ExplorationType, exploration_type

from flowgym.backends.base import FlowBackend
from flowgym.kernels import gaussian_log_prob, get_kernel, ode_step

__all__ = ["FlowPolicy", "POLICY_IN_KEYS", "POLICY_OUT_KEYS"]

POLICY_IN_KEYS = ["latent", "sigma", "sigma_next", "stochastic", "conditioning"]
POLICY_OUT_KEYS = ["velocity", "loc", "scale", "action", "sample_log_prob"]


class FlowPolicy(TensorDictModuleBase):
    """Gaussian denoising policy around a backend and a step kernel.

    Args:
        backend: the model family (its velocity model carries the trainable parameters).
        kernel: ``"flow_sde"`` (Flow-GRPO, default), ``"cps"``, ``"dance_sde"`` or ``"ode"``.
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
        self.noise_level = float(noise_level)
        self.guidance_scale = float(guidance_scale)
        self.reduce = reduce
        self.log_prob_convention = log_prob_convention
        self._generator: torch.Generator | None = None
        self._seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())

    # ------------------------------------------------------------------ randomness
    def set_seed(self, seed: int) -> None:
        """Re-seed the noise generator (created lazily on the backend's device)."""
        self._seed = int(seed)
        self._generator = None

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

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
        prompts = prompts.tolist() if hasattr(prompts, "tolist") else list(prompts)
        return self.backend.encode_prompts(prompts).to(td.device or self.backend.device)

    def distribution(self, td: TensorDictBase) -> tuple[Tensor, Tensor, Tensor]:
        """``(velocity, loc, scale)`` for the states in ``td`` (differentiable w.r.t. the model)."""
        latent = td.get("latent")
        sigma, sigma_next = td.get("sigma"), td.get("sigma_next")
        stochastic = td.get("stochastic").reshape(-1)
        cond = self.conditioning(td)
        model_dtype = self.backend.dtype
        velocity = self.backend.velocity(latent.to(model_dtype), sigma, cond, self.guidance_scale).float()
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

    def log_prob(self, action: Tensor, loc: Tensor, scale: Tensor, stochastic: Tensor) -> Tensor:
        """Float32 log-density per sample (reduced by ``self.reduce``); 0 on ODE rows.

        A stochastic row whose scale is 0 (noise level 0) raises ``ValueError``.
        """
        mask = stochastic.reshape(-1).bool()
        shape = (-1,) + (1,) * (loc.dim() - 1)
        safe_scale = torch.where(mask.reshape(shape), scale, torch.ones_like(scale))
        logp = gaussian_log_prob(action, loc, safe_scale, self.reduce, convention=self.log_prob_convention)
        return torch.where(mask, logp, torch.zeros_like(logp))

    # ------------------------------------------------------------------ module API
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        velocity, loc, scale = self.distribution(td)
        stochastic = td.get("stochastic").reshape(-1)
        deterministic = exploration_type() in (ExplorationType.DETERMINISTIC, ExplorationType.MODE, ExplorationType.MEAN)
        if deterministic:
            action = loc
        else:
            noise = torch.randn(loc.shape, generator=self._noise_generator(loc.device), device=loc.device)
            action = loc + scale * noise
        td.set("velocity", velocity)
        td.set("loc", loc)
        td.set("scale", scale)
        td.set("action", action)
        td.set("sample_log_prob", self.log_prob(action, loc, scale, stochastic))
        return td

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Evaluate the reference (pretrained) policy inside this context."""
        with self.backend.reference():
            yield

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.backend.trainable_parameters()
