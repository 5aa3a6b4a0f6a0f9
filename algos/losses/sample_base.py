"""The second loss contract: losses on the rollout's final clean samples (forward-process methods).

DiffusionNFT and AWM never read the MDP's per-step log-probabilities. They keep only each sample's
clean latent ``x0``, draw noise levels and FRESH noise themselves, and regress the velocity on the
forward process ``x_t = (1 - t) x0 + t eps``. ``SampleLoss`` is their base; the per-step losses stay
``FlowPolicyLoss`` (``algos.losses.base``) unchanged.

Which batch a loss needs: ``batch_kind``
----------------------------------------
Every loss class carries ``batch_kind``: ``"transitions"`` (``TRANSITIONS``, the (sample, step)
pairs of ``FlowPolicyLoss``; also what ``batch_kind(cls)`` returns for a class that does not set it)
or ``"samples"`` (``SAMPLES``, this file). The trainer and the updater dispatch on it
(``algos.trainer.Trainer.training_batch``, ``algos.updater.Updater.update``); nothing else in them
depends on the method. ``SampleLoss`` subclasses ``FlowPolicyLoss`` only so that ``register_loss``
and the one loss registry take it (``make_loss("awm", policy)``, ``algo=awm``); it overrides the
whole per-step surface (``evaluate`` and ``refresh_old_policy`` raise).

Input contract
--------------
The trainer builds one row per rollout sample (``Trainer.training_samples``), batch ``[N]``:

    sample (N, ...)        the final clean latent x0 (the last step's action)
    sigmas (N, K)          the rollout's noise level at each of its K steps (the sampling schedule)
    advantage (N,)         one advantage per sample
    conditioning [N]       (or prompt) what the policy conditions on
    sample_index (N,)      the trainer's bookkeeping, not read by the loss

``prepare(samples, generator=...)`` runs once per rollout, without gradient, before any update: it
draws T trained noise levels per sample from the rollout's schedule (``timestep_indices``, the
method's choice) and fresh noise per (sample, timestep), and lets the method precompute what must
come from the pre-update policy (``precompute``; AWM's old surrogate log-prob). It adds

    sigma (N, T)           the trained noise levels t
    noise (N, T, ...)      eps, fixed for the whole rollout (every epoch sees the same x_t)
    ...                    the method's own entries (AWM: log_prob_old (N, T))

The updater then shuffles and splits the ``[N]`` rows into mini- and micro-batches as for pairs;
a micro-batch of n samples is n * T model rows, sample-major (row ``i * T + j``).

``forward(td)`` returns a ``TensorDict`` of ``loss_*`` terms (``loss_objective``, ``loss_kl``, and
e.g. AWM's ``loss_ema``), the shared ``DIAGNOSTIC_KEYS`` (NaN where they do not apply, so metric
columns stay the same for every method) and the class's ``extra_diagnostic_keys``.

Frozen policies: old, EMA and reference
---------------------------------------
A method names the frozen velocities it needs (``frozen_velocities``): ``"ref"`` (the pretrained
policy: ``policy.reference()``, LoRA adapters off or the backend's frozen copy) and the names of its
soft parameter copies (``PolicyCopy``: DiffusionNFT's ``"old"``, AWM's ``"ema"``). They are computed
without gradient BEFORE the trained forward of each micro-batch: a copy is evaluated by copying its
values into the live trained parameters and back, which must not happen while an autograd graph
holds them. Copies are of the trained parameters only (LoRA adapters, or every weight of a full
fine-tune). ``after_update(num_updates)`` (the updater calls it once per rollout, after the
optimiser steps) moves each copy: ``copy = d * copy + (1 - d) * live`` with ``d`` from its schedule
(``sample_functional.soft_update_decay``) on the count of optimiser steps so far.
``sampling()`` is the context the trainer collects rollouts in (DiffusionNFT samples with the old
policy). ``training_state()`` / ``load_training_state()`` hold the copies and the step count for
checkpoints (``Trainer.state`` / ``Trainer.resume``).

Writing a new per-sample loss
-----------------------------
Subclass ``SampleLoss``; implement ``timestep_indices`` and ``objective(batch: SampleBatch)``
returning ``"loss_objective"`` (more ``loss_*`` terms and diagnostics may follow); add copies with
``self.add_copy(name, rate, maximum, flat)`` and name what ``objective`` reads in
``frozen_velocities``; override ``precompute`` / ``sampling`` if needed; ``@register_loss("name")``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Iterator, Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torchrl.objectives import LossModule

from algos.losses.base import DIAGNOSTIC_KEYS, FlowPolicyLoss
from algos.losses.functional import check_nonnegative
from algos.losses.sample_functional import mean_dims, noisy_sample, soft_update_decay
from flowgym.td_utils import as_string_list

__all__ = ["SAMPLES", "TRANSITIONS", "PolicyCopy", "SampleBatch", "SampleLoss", "batch_kind"]

#: the batch a ``FlowPolicyLoss`` trains on: (sample, stochastic step) pairs of the rollout
TRANSITIONS = "transitions"
#: the batch a ``SampleLoss`` trains on: one row per sample (its clean x0), noised by the loss
SAMPLES = "samples"


def batch_kind(loss: type | object) -> str:
    """The batch a loss class (or instance) trains on: ``TRANSITIONS`` unless it says ``SAMPLES``."""
    return getattr(loss, "batch_kind", TRANSITIONS)


# --------------------------------------------------------------------------- soft parameter copies
class PolicyCopy:
    """A soft copy of the trained parameters: ``copy = decay * copy + (1 - decay) * live``.

    It starts equal to the live parameters. ``swapped_in()`` evaluates the copy by copying it into
    the live parameters and restoring them afterwards (no second model: LoRA adapters or the full
    set of trained weights). Use it without gradient and outside any live autograd graph.
    """

    def __init__(self, parameters: Iterable[nn.Parameter]) -> None:
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``copy = decay * copy + (1 - decay) * live`` (the official codes' order of operations)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1]; got {decay}")
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.mul_(decay).add_(param.detach().to(shadow.dtype), alpha=1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for param, shadow in zip(self.parameters, self.shadow):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.parameters, live):
                    param.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": [s.detach().cpu() for s in self.shadow]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = state["shadow"]
        if len(values) != len(self.shadow):
            raise ValueError(f"the saved copy holds {len(values)} tensors; this policy trains {len(self.shadow)}")
        with torch.no_grad():
            for shadow, value in zip(self.shadow, values):
                shadow.copy_(value)


@dataclass
class _CopySchedule:
    copy: PolicyCopy
    rate: float
    maximum: float
    flat: int


# --------------------------------------------------------------------------- what objective() sees
@dataclass
class SampleBatch:
    """One micro-batch of n samples x T timesteps, flattened to R = n * T rows (sample-major).

    ``velocity`` has gradient; everything else is detached. ``frozen`` maps each name of
    ``frozen_velocities`` to its (R, ...) velocity.
    """

    td: TensorDictBase  # the [n] input rows
    num_samples: int
    num_timesteps: int
    x0: Tensor  # (R, ...)
    noise: Tensor  # (R, ...)
    sigma: Tensor  # (R,) float32
    x_t: Tensor  # (R, ...)
    advantage: Tensor  # (R,) float32, each sample's advantage repeated over its timesteps
    sample_advantage: Tensor  # (n,) float32
    velocity: Tensor  # (R, ...) float32, with gradient
    frozen: dict[str, Tensor] = field(default_factory=dict)


class SampleLoss(FlowPolicyLoss):
    """Base class of the losses on final clean samples (see the module docstring for the contract).

    Args:
        policy: the ``FlowPolicy`` being trained. Its kernel is the rollout's sampler; these methods
            default to ``"ode"`` (``policy_defaults``; the trainer then makes no rollout step
            stochastic), any other kernel injects noise at the env's ``stochastic_steps``.
        beta: weight of the velocity penalty to the reference policy,
            ``beta * mean_rows(mean_dims((v - v_ref)^2))`` (0: off).
        log_ref: compute the ``ref_velocity_mse`` diagnostic even when ``beta == 0`` (one extra
            no-grad forward of the reference per micro-batch).
    """

    batch_kind: ClassVar[str] = SAMPLES
    default_advantage: ClassVar[str] = "group"
    policy_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({"kernel": "ode"})
    extra_diagnostic_keys: ClassVar[tuple[str, ...]] = ("ref_velocity_mse",)

    @dataclass
    class _AcceptedKeys:
        """Configurable tensordict keys (rename with ``loss.set_keys(...)``)."""

        sample: str = "sample"
        sigmas: str = "sigmas"
        advantage: str = "advantage"
        conditioning: str = "conditioning"
        prompt: str = "prompt"
        sigma: str = "sigma"
        noise: str = "noise"

    default_keys = _AcceptedKeys

    def __init__(self, policy: nn.Module, *, beta: float = 0.0, log_ref: bool = False) -> None:
        # FlowPolicyLoss.__init__ validates a per-step Gaussian policy (and rejects the ODE kernel these
        # methods sample with); only the LossModule set-up is shared
        LossModule.__init__(self)
        for attr in ("velocity", "reference", "trainable_parameters", "backend"):
            if not hasattr(policy, attr):
                raise ValueError(
                    f"{type(self).__name__} needs a flowgym.policy.FlowPolicy (with velocity, reference, "
                    f"trainable_parameters, backend); got {type(policy).__name__} without {attr!r}"
                )
        self.policy = policy
        self.beta = check_nonnegative("beta", beta, allow_inf=False)
        self.log_ref = bool(log_ref)
        self.step_weighting = "none"  # the per-step weighting option of FlowPolicyLoss does not apply here
        self.num_updates = 0  # optimiser steps taken so far: the clock of the copies' decay schedules
        # plain attributes, not buffers: a checkpoint stores them through training_state()
        self._copies: dict[str, _CopySchedule] = {}

    # ------------------------------------------------------------------ keys
    @property
    def in_keys(self) -> list[str]:
        k = self.tensor_keys
        return [k.sample, k.sigmas, k.advantage, k.conditioning]

    @property
    def loss_keys(self) -> list[str]:
        return ["loss_objective", "loss_kl"]

    @property
    def out_keys(self) -> list[str]:
        return [*self.loss_keys, *DIAGNOSTIC_KEYS, *self.extra_diagnostic_keys]

    # ------------------------------------------------------------------ the per-step surface does not apply
    def evaluate(self, td: TensorDictBase):  # type: ignore[override]
        raise TypeError(f"{type(self).__name__} trains on clean samples (batch_kind 'samples'), not on per-step log-probs")

    def refresh_old_policy(self, td: TensorDictBase) -> TensorDictBase:
        raise TypeError(
            f"{type(self).__name__} has no per-step old policy to refresh; its old / EMA policies are "
            "parameter copies (trainer.refresh_old_policy must be false)"
        )

    # ------------------------------------------------------------------ copies
    def add_copy(self, name: str, rate: float, maximum: float, flat: int = 0) -> PolicyCopy:
        """A soft copy of the trained parameters, moved after each rollout with decay
        ``soft_update_decay(num_updates, rate, maximum, flat)``."""
        rate = check_nonnegative(f"{name}_decay_rate", rate, allow_inf=False)
        if not 0.0 <= maximum <= 1.0:
            raise ValueError(f"{name}_decay_max must lie in [0, 1]; got {maximum!r}")
        if isinstance(flat, bool) or not isinstance(flat, int) or flat < 0:
            raise ValueError(f"{name}_decay_flat must be an integer >= 0; got {flat!r}")
        copy = PolicyCopy(self.policy.trainable_parameters())
        self._copies[name] = _CopySchedule(copy, rate, float(maximum), flat)
        return copy

    def copy(self, name: str) -> PolicyCopy:
        return self._copies[name].copy

    @torch.no_grad()
    def after_update(self, num_updates: int) -> dict[str, float]:
        """Once per rollout, after its ``num_updates`` optimiser steps: advance the step count and move
        every copy toward the live weights. Returns ``{"<name>_decay": d}`` for the metrics."""
        self.num_updates += int(num_updates)
        decays = {}
        for name, schedule in self._copies.items():
            decay = soft_update_decay(self.num_updates, schedule.rate, schedule.maximum, schedule.flat)
            schedule.copy.update(decay)
            decays[f"{name}_decay"] = decay
        return decays

    def sampling(self) -> ContextManager[Any]:
        """The context the trainer collects rollouts in (default: the live policy)."""
        return contextlib.nullcontext()

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint needs besides the trained weights: the copies and the step count."""
        return {"num_updates": self.num_updates, "copies": {name: s.copy.state_dict() for name, s in self._copies.items()}}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        copies = state["copies"]
        if set(copies) != set(self._copies):
            raise ValueError(f"the checkpoint holds policy copies {sorted(copies)}; {type(self).__name__} keeps {sorted(self._copies)}")
        self.num_updates = int(state["num_updates"])
        for name, value in copies.items():
            self._copies[name].copy.load_state_dict(value)

    # ------------------------------------------------------------------ the training batch
    def timestep_indices(self, num_samples: int, num_steps: int, generator: torch.Generator) -> Tensor:
        """``(num_samples, T)`` long indices into each sample's K-step schedule: the trained timesteps."""
        raise NotImplementedError

    def frozen_velocities(self) -> tuple[str, ...]:
        """The frozen velocities ``objective`` reads: ``"ref"`` and / or names of copies."""
        return ("ref",) if (self.beta > 0 or self.log_ref) else ()

    @torch.no_grad()
    def prepare(
        self,
        samples: TensorDictBase,
        *,
        generator: torch.Generator,
        chunk_size: int | None = None,
        autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ) -> TensorDictBase:
        """Once per rollout, before any update: add the trained ``sigma`` (N, T) and ``noise`` (N, T, ...)
        to ``samples`` (in place; also returned), then ``precompute``. Indices and noise come from
        ``generator`` (CPU; the updater's, so a checkpoint restores them) whatever the device."""
        k = self.tensor_keys
        x0, sigmas = samples.get(k.sample), samples.get(k.sigmas)
        n, num_steps = sigmas.shape[0], sigmas.shape[-1]
        index = self.timestep_indices(n, num_steps, generator)
        sigma = torch.gather(sigmas.reshape(n, num_steps).float(), 1, index.to(sigmas.device))
        noise = torch.randn((n, index.shape[1], *x0.shape[1:]), generator=generator)
        samples.set(k.sigma, sigma)
        samples.set(k.noise, noise.to(device=x0.device, dtype=torch.float32))
        self.precompute(samples, chunk_size or n, autocast)
        return samples

    def precompute(self, samples: TensorDictBase, chunk_size: int, autocast: Callable[[], ContextManager[Any]]) -> None:
        """Entries computed once per rollout with the pre-update policy (default: none)."""

    # ------------------------------------------------------------------ evaluation
    def _conditioning(self, td: TensorDictBase, rows: Tensor):
        k = self.tensor_keys
        keys = td.keys(include_nested=True)
        if k.conditioning in keys:
            return td.get(k.conditioning)[rows]
        if k.prompt in keys:
            prompts = as_string_list(td.get(k.prompt))
            return self.policy.backend.encode_prompts([prompts[i] for i in rows.tolist()]).to(td.device or self.policy.backend.device)
        raise KeyError(f"the loss input needs {k.conditioning!r} or {k.prompt!r} for the policy")

    def rows(self, td: TensorDictBase) -> tuple[Tensor, Tensor, Tensor, Tensor, Any, int, int]:
        """``(x0, noise, sigma, x_t, conditioning, n, T)`` of the R = n * T rows of ``td`` (sample-major)."""
        k = self.tensor_keys
        missing = [key for key in (k.sample, k.advantage, k.sigma, k.noise) if key not in td.keys(include_nested=True)]
        if missing:
            raise KeyError(f"{type(self).__name__} input lacks {missing}; build it with loss.prepare(samples, generator=...)")
        if td.batch_dims != 1:
            raise ValueError(f"{type(self).__name__} takes a flat [N] batch of samples; got batch size {tuple(td.batch_size)}")
        n = td.batch_size[0]
        if n == 0:
            raise ValueError("the loss got an empty batch (no samples to train on)")
        sigma = td.get(k.sigma).float()
        T = sigma.shape[1]
        x0 = td.get(k.sample).float()
        x0 = x0[:, None].expand(n, T, *x0.shape[1:]).reshape(n * T, *x0.shape[1:])
        noise = td.get(k.noise).reshape(n * T, *x0.shape[1:]).float()
        sigma = sigma.reshape(n * T)
        rows = torch.arange(n, device=sigma.device).repeat_interleave(T)
        cond = self._conditioning(td, rows.to(td.device) if td.device is not None else rows)
        return x0, noise, sigma, noisy_sample(x0, noise, sigma), cond, n, T

    def _velocity(self, x_t: Tensor, sigma: Tensor, cond) -> Tensor:
        return self.policy.velocity(x_t, sigma, cond)

    @torch.no_grad()
    def frozen_velocity(self, name: str, x_t: Tensor, sigma: Tensor, cond) -> Tensor:
        """The velocity of the reference (``"ref"``) or of a copy at the rows, without gradient."""
        context = self.policy.reference() if name == "ref" else self.copy(name).swapped_in()
        with context:
            return self._velocity(x_t, sigma, cond).detach()

    def objective(self, batch: SampleBatch) -> dict[str, Tensor]:  # type: ignore[override]
        """Return ``{"loss_objective": scalar, ...}``: more ``loss_*`` terms and diagnostics may follow."""
        raise NotImplementedError

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        k = self.tensor_keys
        td = tensordict
        x0, noise, sigma, x_t, cond, n, T = self.rows(td)
        advantage = td.get(k.advantage).detach()
        if advantage.numel() != n:
            raise ValueError(f"{k.advantage!r} must hold one value per sample, shape ({n},); got {tuple(advantage.shape)}")
        sample_advantage = advantage.reshape(n).to(device=sigma.device, dtype=torch.float32)
        # frozen policies first: evaluating a copy writes into the live parameters, which must not
        # happen once the trained forward below has recorded them in its graph
        frozen = {name: self.frozen_velocity(name, x_t, sigma, cond) for name in self.frozen_velocities()}
        velocity = self._velocity(x_t, sigma, cond)
        batch = SampleBatch(
            td=td, num_samples=n, num_timesteps=T, x0=x0, noise=noise, sigma=sigma, x_t=x_t,
            advantage=sample_advantage.repeat_interleave(T), sample_advantage=sample_advantage,
            velocity=velocity, frozen=frozen,
        )
        terms = self.objective(batch)
        if "loss_objective" not in terms:
            raise RuntimeError(f"{type(self).__name__}.objective must return 'loss_objective'")
        device = velocity.device
        nan = torch.full((), math.nan, device=device)
        losses: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {key: nan for key in (*DIAGNOSTIC_KEYS, *self.extra_diagnostic_keys)}
        for key, value in terms.items():
            if key.startswith("loss_"):
                losses[key] = value
            else:
                diagnostics[key] = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value, device=device)
        if "ref" in frozen:
            # the reference penalty of both official codes: squared velocity distance, mean over dims and rows
            ref_mse = mean_dims((velocity - frozen["ref"]) ** 2)
            losses["loss_kl"] = self.beta * ref_mse.mean() if self.beta > 0 else torch.zeros((), device=device)
            diagnostics["ref_velocity_mse"] = ref_mse.detach().mean()
        else:
            losses["loss_kl"] = torch.zeros((), device=device)
        out = {**losses, **{key: diagnostics[key].float() for key in diagnostics}}
        return TensorDict(out, batch_size=[], device=device)
