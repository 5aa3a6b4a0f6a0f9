"""The sigma schedule a diffusers model samples with, read from its own ``scheduler_config.json``.

``FlowMatchSchedule(config, sigma_inputs=..., mu=...)`` wraps a ``FlowMatchEulerDiscreteScheduler``
config and gives, for a step count and a resolution, exactly the K + 1 sigmas the family's diffusers
pipeline steps through (``sigmas(num_steps, image_seq_len)``) and what its transformer is fed as the
timestep (``model_timestep(sigma)``). The values come from diffusers' own ``set_timesteps``, called
the way the pipeline calls it, so every setting of the scheduler is honoured by construction:

* ``shift`` (static shift, applied at construction and in ``set_timesteps``, as diffusers does);
* ``use_dynamic_shifting`` with the family's ``mu`` (FLUX.1 / Qwen-Image / SD3.5 with dynamic
  shifting: linear in the image token count between ``base_image_seq_len`` / ``base_shift`` and
  ``max_image_seq_len`` / ``max_shift``; FLUX.2: the pipeline's empirical mu), ``time_shift_type``;
* ``shift_terminal`` (the schedule stretched to end at that sigma), ``invert_sigmas`` (Mochi's
  convention: the model sees ``1 - sigma`` and predicts the negated velocity; flowgym's sigmas stay
  noise levels decreasing to 0), ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
  ``use_beta_sigmas``, ``num_train_timesteps``.

Conventions: a schedule is a float32 CPU tensor ``s_0 > ... > s_K = 0`` of noise levels (flowgym's
``x_s = (1 - s) x_data + s eps``). ``sigma_inputs`` says what the pipeline passes to
``set_timesteps``: ``"scheduler"`` (nothing: the scheduler's own spacing, SD3) or ``"linspace"``
(``np.linspace(1, 1 / K, K)``, FLUX / Qwen-Image; a config with ``use_flow_sigmas`` falls back to
the scheduler's spacing, as those pipelines do). ``timestep`` is ``"t"`` (the transformer takes
``sigma * num_train_timesteps``, SD3) or ``"t/1000"`` (it takes ``sigma * num_train_timesteps / 1000``
— the pipeline's ``timestep / 1000`` — FLUX, FLUX.2, Qwen-Image).

What flowgym cannot reproduce fails loudly (``ValueError`` naming the key): another scheduler class,
``stochastic_sampling=True`` (the scheduler's own noise injection; flowgym's kernels own the
noise), and any key that ``FlowMatchEulerDiscreteScheduler`` does not know.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["FlowMatchSchedule", "calculate_shift", "SCHEDULER_CLASS"]

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
#: keys of a saved scheduler config that are not constructor arguments but known and harmless
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
#: read by the FLUX / Qwen-Image pipelines (``hasattr(scheduler.config, "use_flow_sigmas")``), not by the scheduler
_PIPELINE_KEYS = {"use_flow_sigmas"}

MuFunction = Callable[[int, int, Mapping[str, Any]], float]


def calculate_shift(image_seq_len: int, config: Mapping[str, Any], max_shift_default: float = 1.15) -> float:
    """FLUX's resolution-dependent ``mu``: linear in ``image_seq_len`` through
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` of ``config``
    (diffusers' ``calculate_shift``; the SD3 pipeline's default ``max_shift`` is 1.16, FLUX's 1.15)."""
    base_seq = config.get("base_image_seq_len", 256)
    max_seq = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", max_shift_default)
    # None in a config means "the default" to the pipelines too (they call config.get(key, default))
    base_seq = 256 if base_seq is None else base_seq
    max_seq = 4096 if max_seq is None else max_seq
    base_shift = 0.5 if base_shift is None else base_shift
    max_shift = max_shift_default if max_shift is None else max_shift
    m = (max_shift - base_shift) / (max_seq - base_seq)
    b = base_shift - m * base_seq
    return image_seq_len * m + b


def _scheduler_keys() -> set[str]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    params = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    return {name for name in params if name != "self"}


class FlowMatchSchedule:
    """The model's own sigma schedule (see the module docstring).

    Args:
        config: the scheduler config (``scheduler_config.json`` as a dict); ``{}`` = the defaults.
        sigma_inputs: ``"scheduler"`` or ``"linspace"``: what the family's pipeline passes to ``set_timesteps``.
        mu: ``mu(image_seq_len, num_steps, config)`` of the family's pipeline; called only when the
            config uses dynamic shifting (FLUX.2's pipeline passes its mu always; so do we, and the
            scheduler ignores it without dynamic shifting, exactly as there).
        timestep: ``"t"`` or ``"t/1000"``, the transformer's timestep convention.
        where: names the model in error messages.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        sigma_inputs: Literal["scheduler", "linspace"] = "scheduler",
        mu: MuFunction | None = None,
        timestep: Literal["t", "t/1000"] = "t",
        where: str = "the model",
    ) -> None:
        config = dict(config or {})
        name = config.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise ValueError(
                f"{where}: scheduler {name!r} is not supported; flowgym reproduces {SCHEDULER_CLASS} schedules only"
            )
        known = _scheduler_keys()
        unknown = sorted(k for k in config if k not in known and k not in _BOOKKEEPING and k not in _PIPELINE_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: scheduler config keys {unknown} are not supported (unknown to {SCHEDULER_CLASS} "
                f"and to flowgym); supported: {sorted(known | _PIPELINE_KEYS)}"
            )
        if config.get("stochastic_sampling"):
            raise ValueError(
                f"{where}: scheduler config has stochastic_sampling=true; flowgym's kernels (flow_sde, cps, "
                "dance_sde, ode) own the noise of every step, so the scheduler's own stochastic sampling is not "
                "reproduced. Set it to false in scheduler_config.json"
            )
        if sigma_inputs not in ("scheduler", "linspace"):
            raise ValueError(f"sigma_inputs must be 'scheduler' or 'linspace'; got {sigma_inputs!r}")
        if timestep not in ("t", "t/1000"):
            raise ValueError(f"timestep must be 't' or 't/1000'; got {timestep!r}")
        if config.get("use_dynamic_shifting") and mu is None:
            raise ValueError(f"{where}: the scheduler uses dynamic shifting but the family gives no mu function")
        self.config = {k: v for k, v in config.items() if k in known}
        self.use_flow_sigmas = bool(config.get("use_flow_sigmas", False))
        self.sigma_inputs = sigma_inputs
        self.mu_function = mu
        self.timestep_convention = timestep
        self.where = where
        self._cache: dict[tuple[int, int], Tensor] = {}

    # ------------------------------------------------------------------ properties
    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    @property
    def shift(self) -> float:
        """The static ``shift`` of the config (1.0 when absent, the scheduler's default)."""
        return float(self.config.get("shift", 1.0))

    @property
    def dynamic(self) -> bool:
        return bool(self.config.get("use_dynamic_shifting", False))

    @property
    def inverted(self) -> bool:
        return bool(self.config.get("invert_sigmas", False))

    @property
    def static_shift(self) -> float | None:
        """The shift when this schedule is exactly ``flowgym.schedules.static_shift_sigmas(K, shift)`` for every K
        (SD3: a static shift and nothing else), else None."""
        plain = not any(
            self.config.get(key)
            for key in ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                        "use_exponential_sigmas", "use_beta_sigmas")
        )
        if plain and self.sigma_inputs == "scheduler" and self.num_train_timesteps == 1000:
            return self.shift
        return None

    # ------------------------------------------------------------------ the schedule
    def mu(self, image_seq_len: int, num_steps: int) -> float | None:
        """The ``mu`` the pipeline passes to ``set_timesteps`` (None when it passes none)."""
        if self.mu_function is None:
            return None
        return float(self.mu_function(int(image_seq_len), int(num_steps), self.config))

    def sigmas(self, num_steps: int, image_seq_len: int = 0) -> Tensor:
        """The K + 1 noise levels (float32, CPU) the pipeline samples with at ``image_seq_len`` image tokens."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
        key = (num_steps, int(image_seq_len) if self.dynamic else 0)
        if key not in self._cache:
            self._cache[key] = self._compute(num_steps, int(image_seq_len))
        return self._cache[key].clone()

    def _compute(self, num_steps: int, image_seq_len: int) -> Tensor:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        kwargs: dict[str, Any] = {}
        if self.sigma_inputs == "linspace" and not self.use_flow_sigmas:
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = self.mu(image_seq_len, num_steps) if (self.dynamic or self.sigma_inputs == "linspace") else None
        if mu is not None:
            kwargs["mu"] = mu
        if self.dynamic and not math.isfinite(float(kwargs.get("mu", float("nan")))):
            raise ValueError(f"{self.where}: dynamic shifting needs a finite mu; got {kwargs.get('mu')!r}")
        if "sigmas" in kwargs:
            scheduler.set_timesteps(sigmas=kwargs.pop("sigmas"), **kwargs)
        else:
            scheduler.set_timesteps(num_steps, **kwargs)
        sigmas = scheduler.sigmas.to(torch.float32).clone()
        if self.inverted:
            sigmas = 1.0 - sigmas  # back to noise levels: the scheduler's are 1 - s, ending at 1
        if not (sigmas[:-1] > sigmas[1:]).all() or sigmas[-1] != 0:
            raise ValueError(
                f"{self.where}: the scheduler config gives a schedule that does not decrease to 0 "
                f"({sigmas.tolist()}); flowgym needs s_0 > ... > s_K = 0"
            )
        return sigmas

    # ------------------------------------------------------------------ the transformer's timestep
    def model_timestep(self, sigma: Tensor) -> Tensor:
        """What the transformer receives for noise level ``sigma`` (the pipeline's exact float ops)."""
        s = 1.0 - sigma if self.inverted else sigma
        t = s * float(self.num_train_timesteps) if self.num_train_timesteps != 1000 else s * 1000.0
        return t / 1000 if self.timestep_convention == "t/1000" else t

    def describe(self) -> str:
        parts = [f"shift={self.shift:g}"]
        if self.dynamic:
            parts.append(f"dynamic ({self.config.get('time_shift_type', 'exponential')})")
        for key in ("shift_terminal", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if self.config.get(key):
                parts.append(f"{key}={self.config[key]}")
        return ", ".join(parts)
