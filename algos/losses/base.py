"""The shared base of the flow-policy losses, and the loss registry.

Input contract (what the trainer passes to ``loss(td)``)
-------------------------------------------------------
A tensordict of N (sample, step) pairs, batch ``[N]`` (any batch shape is flattened), holding
ONLY stochastic (trained) steps, with the rollout's entries

    latent, sigma, sigma_next, stochastic, conditioning (or prompt),
    action, sample_log_prob (old log-prob), loc (old mean), scale (shared std),
    velocity (old velocity), advantage (N,) or (N, 1)

Key names follow TorchRL's ``LossModule`` conventions: they are the fields of
``FlowPolicyLoss._AcceptedKeys`` and can be renamed with ``loss.set_keys(advantage="adv", ...)``.

Output
------
A ``TensorDict`` (no batch dimensions) of

* ``loss_*`` terms, whose sum the trainer backpropagates: ``loss_objective`` always,
  ``loss_kl`` always (``beta * KL(new || reference)``; a detached 0 when ``beta == 0``), and
  whatever a subclass adds (``loss_value`` for PPO-clip with a value baseline);
* detached scalar diagnostics, the same keys for every loss (``DIAGNOSTIC_KEYS``; NaN where a
  key does not apply to the loss):

  ``ratio_mean/min/max``     the importance ratio ``exp(logp_new - logp_old)``;
  ``approx_kl``              ``0.5 * mean((logp_new - logp_old)^2)``;
  ``kl_old_new_mean/max``    exact Gaussian KL between old and new step policy, mean over dims;
  ``clip_frac_high/low``     ratio-clipping losses: fraction with ``ratio > 1 + eps`` / ``< 1 - eps``;
  ``mask_frac_pos/neg``      Flow-DPPO: fraction masked among ``A > 0`` / among ``A < 0``
                             (0 when there is no such element);
  ``frac_over_threshold``    fraction of steps whose divergence is ``>= delta`` (the exact KL
                             against the loss's ``delta`` argument, 1e-5 by default, for every
                             loss; Flow-DPPO uses its own divergence and threshold);
  ``kl_ref``                 exact KL to the reference (pretrained) policy, mean over dims and
                             steps; computed when ``beta > 0`` or ``log_kl_ref=True``, else NaN.

Per-step weighting of the policy term
-------------------------------------
``step_weighting`` (every loss that supports it: PPO-clip, Flow-GRPO, Flow-CPS, Flow-DPPO,
GRPO-Guard) multiplies each (sample, step) element of the policy term by a weight ``w_i`` before
the loss's reduction; the KL-to-reference and value terms are never weighted:

* ``"none"`` (default except GRPO-Guard): no weight, the loss is computed exactly as without it;
* ``"tempflow"``: TempFlow-GRPO's noise-aware ``w = 2.25 * s_t``, ``s_t`` the step's std (the
  ``scale`` entry, ``sigma_t * sqrt(-dt)`` for Flow-SDE);
* ``"guard"``: GRPO-Guard's ``w = 1 / mean(sqrt(-dt))^2 = 1 / (sigma - sigma_next)``, the mean over
  the rows of the same step (GRPO-Guard's own default).

The weights are ``functional.step_weights`` (detached, ``PolicyEvaluation.step_weight``; ``None``
for "none"), so a benchmark can separate a method's weighting from its trust region
(``algo.loss.step_weighting=tempflow`` on the command line).

Ratio exactly 1 before the first update
---------------------------------------
With unchanged parameters the recomputed log-probability equals the rollout's bitwise when the
loss sees the batch the policy sampled (measured on CPU for the ToyBackend, also for the whole
flattened rollout). Matrix kernels can round differently for other batch sizes (CPU BLAS
remainder rows; cuBLAS for small batches), giving ratios of ``1 +- 1e-7``;
``loss.refresh_old_policy(minibatch)`` before a rollout's first optimiser step removes that.

Writing a new loss
------------------
Subclass ``FlowPolicyLoss``, set ``default_advantage`` (a name in ``algos.advantages.ADVANTAGES``)
and, if the method needs a particular step kernel, ``required_kernel``; implement
``objective(batch) -> dict`` returning ``"loss_objective"`` (and optionally other ``loss_*`` terms
and diagnostics); decorate the class with ``@register_loss("name")``. The base class recomputes the
new policy, the ratios, the shared diagnostics and the optional KL-to-reference term. A loss that
applies ``batch.step_weight`` to its policy term sets ``supports_step_weighting = True`` (the others
reject any ``step_weighting`` but ``"none"``); diagnostics beyond ``DIAGNOSTIC_KEYS`` are declared
in ``extra_diagnostic_keys``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping, TypeVar

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torchrl.objectives import LossModule

from algos.losses.functional import (
    StepWeighting,
    approx_kl,
    check_nonnegative,
    check_step_weighting,
    ratio_from_log_probs,
    step_divergence,
    step_weights,
)
from flowgym.kernels import flow_grpo_reference_kl, gaussian_kl
from flowgym.registry import Registry

__all__ = [
    "DIAGNOSTIC_KEYS",
    "LOSSES",
    "FlowPolicyLoss",
    "PolicyEvaluation",
    "make_loss",
    "register_loss",
    "get_loss_class",
]

#: diagnostics every loss reports (NaN where not applicable), in a stable order for CSV columns
DIAGNOSTIC_KEYS: tuple[str, ...] = (
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "approx_kl",
    "kl_old_new_mean",
    "kl_old_new_max",
    "clip_frac_high",
    "clip_frac_low",
    "mask_frac_pos",
    "mask_frac_neg",
    "frac_over_threshold",
    "kl_ref",
)


@dataclass
class PolicyEvaluation:
    """Everything ``objective`` needs about one batch of N (sample, step) pairs.

    Tensors with gradient (w.r.t. the policy parameters): ``logp_new``, ``log_ratio``, ``loc_new``,
    ``velocity_new``. ``ratio`` is ``exp(log_ratio)`` with gradient; objectives that mask or
    clip should rebuild it with ``functional.importance_ratio(batch.log_ratio, keep)`` to stay
    NaN-free under overflow. ``kl_old_new`` (exact KL, mean over dims) is detached.
    ``step_weight`` multiplies the per-element policy loss (``functional.weighted_mean``).
    """

    td: TensorDictBase  # the flattened input
    advantage: Tensor  # (N,) float32, detached
    logp_new: Tensor  # (N,)
    logp_old: Tensor  # (N,)
    log_ratio: Tensor  # (N,)
    ratio: Tensor  # (N,)
    loc_new: Tensor  # (N, ...)
    loc_old: Tensor  # (N, ...)
    scale: Tensor  # (N, 1, ..., 1), the rollout's std (parameter-free, shared by old and new)
    velocity_new: Tensor  # (N, ...)
    velocity_old: Tensor | None  # (N, ...) or None when the input has no old velocity
    kl_old_new: Tensor  # (N,), detached
    #: (N,) detached weights of the policy term (``step_weighting``), None for "none"
    step_weight: Tensor | None = None


class FlowPolicyLoss(LossModule):
    """Base class of the policy-gradient losses over a ``flowgym.policy.FlowPolicy``.

    Args:
        policy: the ``FlowPolicy`` being trained (a submodule of the loss).
        beta: weight of the KL-to-reference penalty ``beta * mean(KL(new || ref))`` (0: off).
        kl_convention: ``"exact"`` (default): exact Gaussian KL, mean over dims; ``"flow_grpo"``:
            Flow-GRPO's term, exact KL times ``|dt| = sigma - sigma_next`` (its published betas,
            e.g. 0.04, are on that scale; see ``flowgym.kernels.flow_grpo_reference_kl``).
        delta: divergence threshold for the ``frac_over_threshold`` diagnostic (Flow-DPPO: the
            mask threshold itself). Default 1e-5, on the mean-over-dims scale.
        step_weighting: per-step weight of the policy term, ``"none"``, ``"tempflow"`` or
            ``"guard"`` (see the module docstring); ``None``: the class's
            ``default_step_weighting``. Only losses with ``supports_step_weighting`` accept
            anything but ``"none"``.
        log_kl_ref: compute the ``kl_ref`` diagnostic even when ``beta == 0`` (one extra
            no-grad forward of the reference model per call).
        allow_kernel_mismatch: accept a policy whose kernel differs from ``required_kernel``.

    Class attributes subclasses set:
        default_advantage: name of the advantage estimator the method uses by default.
        required_kernel: the policy kernel the method is defined with (None: any).
        policy_defaults: ``FlowPolicy`` keyword arguments the method recommends (a trainer
            building the policy merges them under the user's overrides).
        default_step_weighting: the ``step_weighting`` used when none is given ("none").
        supports_step_weighting: whether ``objective`` applies ``batch.step_weight``.
        extra_diagnostic_keys: diagnostics the loss reports besides ``DIAGNOSTIC_KEYS``.
    """

    default_advantage: ClassVar[str] = "group"
    required_kernel: ClassVar[str | None] = None
    policy_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: True when ``forward`` reads the ``reward`` entry (PPO-clip with a value baseline)
    requires_reward: bool = False
    default_step_weighting: ClassVar[str] = "none"
    supports_step_weighting: ClassVar[bool] = False
    extra_diagnostic_keys: ClassVar[tuple[str, ...]] = ()

    @dataclass
    class _AcceptedKeys:
        """Configurable tensordict keys (rename with ``loss.set_keys(...)``)."""

        latent: str = "latent"
        sigma: str = "sigma"
        sigma_next: str = "sigma_next"
        stochastic: str = "stochastic"
        conditioning: str = "conditioning"
        prompt: str = "prompt"
        action: str = "action"
        sample_log_prob: str = "sample_log_prob"
        loc: str = "loc"
        scale: str = "scale"
        velocity: str = "velocity"
        advantage: str = "advantage"
        reward: str = "reward"

    default_keys = _AcceptedKeys

    def __init__(
        self,
        policy: nn.Module,
        *,
        beta: float = 0.0,
        kl_convention: Literal["exact", "flow_grpo"] = "exact",
        delta: float = 1e-5,
        log_kl_ref: bool = False,
        allow_kernel_mismatch: bool = False,
        step_weighting: StepWeighting | None = None,
    ) -> None:
        super().__init__()
        for attr in ("distribution", "log_prob", "reference", "trainable_parameters"):
            if not hasattr(policy, attr):
                raise ValueError(
                    f"{type(self).__name__} needs a flowgym.policy.FlowPolicy (with distribution, log_prob, "
                    f"reference, trainable_parameters); got {type(policy).__name__} without {attr!r}"
                )
        kernel = getattr(policy, "kernel_name", None)
        if self.required_kernel is not None and kernel != self.required_kernel and not allow_kernel_mismatch:
            raise ValueError(
                f"{type(self).__name__} is defined with the {self.required_kernel!r} step kernel but the policy "
                f"uses {kernel!r}; build the policy with kernel={self.required_kernel!r} "
                f"(e.g. FlowPolicy(backend, kernel={self.required_kernel!r})) or pass allow_kernel_mismatch=True"
            )
        if kernel == "ode":
            raise ValueError("the policy uses the deterministic 'ode' kernel, which has no density to train")
        if kl_convention not in ("exact", "flow_grpo"):
            raise ValueError(f"kl_convention must be 'exact' or 'flow_grpo'; got {kl_convention!r}")
        self.policy = policy
        self.beta = check_nonnegative("beta", beta, allow_inf=False)
        self.kl_convention = kl_convention
        self.delta = check_nonnegative("delta", delta)
        self.log_kl_ref = bool(log_kl_ref)
        self.step_weighting = check_step_weighting(self.default_step_weighting if step_weighting is None else step_weighting)
        if self.step_weighting != "none" and not self.supports_step_weighting:
            # a silently ignored weighting would make a benchmark compare the wrong thing
            raise ValueError(
                f"{type(self).__name__} does not apply per-step weights to its objective; "
                f"step_weighting must be 'none' for it; got {self.step_weighting!r}"
            )

    # ------------------------------------------------------------------ keys
    @property
    def in_keys(self) -> list[str]:
        k = self.tensor_keys
        keys = [k.latent, k.sigma, k.sigma_next, k.stochastic, k.conditioning, k.action, k.sample_log_prob, k.loc, k.scale, k.velocity, k.advantage]
        if self.requires_reward:
            keys.append(k.reward)
        return keys

    @property
    def out_keys(self) -> list[str]:
        return [*self.loss_keys, *DIAGNOSTIC_KEYS, *self.extra_diagnostic_keys]

    @property
    def loss_keys(self) -> list[str]:
        """The ``loss_*`` entries ``forward`` returns."""
        return ["loss_objective", "loss_kl"]

    def _forward_value_estimator_keys(self, **kwargs) -> None:  # no value estimator: nothing to forward
        pass

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimiser updates: the policy's trainable parameters, then the loss's own (if any)."""
        yield from self.policy.trainable_parameters()
        policy_ids = {id(p) for p in self.policy.parameters()}
        for p in self.parameters():
            if p.requires_grad and id(p) not in policy_ids:
                yield p

    # ------------------------------------------------------------------ evaluation
    def policy_input(self, td: TensorDictBase) -> TensorDict:
        """The policy's view of ``td`` under the policy's own key names."""
        k = self.tensor_keys
        view = TensorDict({}, batch_size=td.batch_size, device=td.device)
        for policy_key, key in (("latent", k.latent), ("sigma", k.sigma), ("sigma_next", k.sigma_next), ("stochastic", k.stochastic)):
            view.set(policy_key, td.get(key))
        if k.conditioning in td.keys(include_nested=True):
            view.set("conditioning", td.get(k.conditioning))
        elif k.prompt in td.keys(include_nested=True):
            view.set("prompt", td.get(k.prompt))
        else:
            raise KeyError(f"the loss input needs {k.conditioning!r} or {k.prompt!r} for the policy")
        return view

    def _flat_input(self, td: TensorDictBase) -> TensorDictBase:
        if td.batch_dims != 1:
            td = td.reshape(-1)
        if not self.__dict__.get("_inputs_checked", False):
            self.check_input(td)
        return td

    @contextlib.contextmanager
    def checked_inputs(self) -> Iterator[None]:
        """Inside the context the loss trusts its inputs: ``check_input`` is not run on every call.
        The updater checks a rollout's pairs once (``check_input``), then runs all its mini-batches
        here: no key checks and no host sync (the all-stochastic test) per micro-batch."""
        previous = self.__dict__.get("_inputs_checked", False)
        self.__dict__["_inputs_checked"] = True
        try:
            yield
        finally:
            self.__dict__["_inputs_checked"] = previous

    def check_input(self, td: TensorDictBase) -> None:
        """What a loss input must be: the rollout's entries (``in_keys``), at least one row, only
        stochastic steps; ``KeyError`` / ``ValueError`` saying what is wrong."""
        k = self.tensor_keys
        missing = [key for key in (k.latent, k.sigma, k.sigma_next, k.stochastic, k.action, k.sample_log_prob, k.loc, k.scale, k.advantage) if key not in td.keys(include_nested=True)]
        if missing:
            raise KeyError(f"{type(self).__name__} input lacks {missing}; expected keys {self.in_keys}")
        if td.batch_size[0] == 0:
            raise ValueError("the loss got an empty batch (no stochastic steps to train on)")
        stochastic = td.get(k.stochastic).reshape(-1)
        if not bool(stochastic.all()):
            raise ValueError(
                f"the loss input holds {int((~stochastic.bool()).sum())} deterministic (ODE) steps; only stochastic "
                f"steps have a density: select them first, e.g. td = td[td[{k.stochastic!r}]]"
            )

    def _advantage(self, td: TensorDictBase, n: int, device: torch.device) -> Tensor:
        key = self.tensor_keys.advantage
        advantage = td.get(key)
        if advantage.numel() != n:
            raise ValueError(f"{key!r} must hold one value per (sample, step), shape ({n},); got {tuple(advantage.shape)}")
        return advantage.detach().reshape(n).to(device=device, dtype=torch.float32)

    def step_weights(self, td: TensorDictBase, scale: Tensor) -> Tensor | None:
        """The ``(N,)`` detached weights of the policy term under ``self.step_weighting`` (None for "none")."""
        if self.step_weighting == "none":
            return None
        k = self.tensor_keys
        sigma = td.get(k.sigma).to(scale.device)
        sigma_next = td.get(k.sigma_next).to(scale.device)
        return step_weights(self.step_weighting, scale, sigma, sigma_next)

    def evaluate(self, td: TensorDictBase) -> PolicyEvaluation:
        """Recompute the new policy on the (flattened) input and gather what ``objective`` needs."""
        k = self.tensor_keys
        velocity_new, loc_new, scale_new = self.policy.distribution(self.policy_input(td))
        stochastic = td.get(k.stochastic).reshape(-1)
        logp_new = self.policy.log_prob(td.get(k.action), loc_new, scale_new, stochastic)
        logp_old = td.get(k.sample_log_prob).reshape(-1).detach().to(logp_new.device)
        log_ratio, ratio = ratio_from_log_probs(logp_new, logp_old)
        loc_old = td.get(k.loc).detach().to(loc_new.device)
        scale = td.get(k.scale).detach().to(loc_new.device)
        with torch.no_grad():
            kl_old_new = step_divergence(loc_new.detach(), loc_old, scale)
        velocity_old = td.get(k.velocity).detach() if k.velocity in td.keys(include_nested=True) else None
        return PolicyEvaluation(
            td=td,
            advantage=self._advantage(td, logp_new.shape[0], logp_new.device),
            logp_new=logp_new,
            logp_old=logp_old,
            log_ratio=log_ratio,
            ratio=ratio,
            loc_new=loc_new,
            loc_old=loc_old,
            scale=scale,
            velocity_new=velocity_new,
            velocity_old=velocity_old,
            kl_old_new=kl_old_new,
            step_weight=self.step_weights(td, scale),
        )

    @torch.no_grad()
    def refresh_old_policy(self, td: TensorDictBase) -> TensorDictBase:
        """Overwrite the old-policy entries of ``td`` (``sample_log_prob``, ``loc``, ``velocity``) in place
        with the current policy's values, computed on exactly this batch; returns ``td``.

        The sampling path and the loss's recomputation are the same code, but matrix kernels may
        round differently for different batch sizes / layouts (CPU BLAS remainder rows, cuBLAS
        algorithm choice), so a mini-batch other than the rollout's batch can see ratios of
        ``1 +- 1e-7`` before any update. Calling this on each mini-batch before the first optimiser
        step of a rollout (one extra forward without gradient) makes the first update's ratios
        exactly 1. The action and the scale are left unchanged. Needs a flat ``[N]`` batch.
        """
        if td.batch_dims != 1:
            raise ValueError(f"refresh_old_policy needs a flat [N] batch; got batch size {tuple(td.batch_size)}")
        k = self.tensor_keys
        velocity, loc, scale = self.policy.distribution(self.policy_input(td))
        logp = self.policy.log_prob(td.get(k.action), loc, scale, td.get(k.stochastic).reshape(-1))
        td.set(k.sample_log_prob, logp.to(td.get(k.sample_log_prob).dtype).reshape(td.get(k.sample_log_prob).shape))
        td.set(k.loc, loc)
        td.set(k.velocity, velocity)
        return td

    def reference_kl(self, td: TensorDictBase, loc_new: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """``(penalty_per_step, exact_kl_per_step)`` between the new and the reference step policy.

        The reference mean is computed without gradient inside ``policy.reference()``; the penalty
        keeps the gradient through ``loc_new``. ``penalty`` follows ``kl_convention``.
        """
        with torch.no_grad(), self.policy.reference():
            _, loc_ref, _ = self.policy.distribution(self.policy_input(td))
        exact = gaussian_kl(loc_new, loc_ref.detach(), scale, reduce="mean")
        if self.kl_convention == "exact":
            return exact, exact.detach()
        k = self.tensor_keys
        penalty = flow_grpo_reference_kl(loc_new, loc_ref.detach(), scale, td.get(k.sigma), td.get(k.sigma_next), reduce="mean")
        return penalty, exact.detach()

    # ------------------------------------------------------------------ the objective
    def objective(self, batch: PolicyEvaluation) -> dict[str, Tensor]:
        """Return ``{"loss_objective": scalar, ...}``: more ``loss_*`` terms and diagnostics may follow."""
        raise NotImplementedError

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        td = self._flat_input(tensordict)
        batch = self.evaluate(td)
        terms = self.objective(batch)
        if "loss_objective" not in terms:
            raise RuntimeError(f"{type(self).__name__}.objective must return 'loss_objective'")
        device = batch.logp_new.device
        nan = torch.full((), math.nan, device=device)
        with torch.no_grad():
            ratio = batch.ratio.detach()
            diagnostics = {
                "ratio_mean": ratio.mean(),
                "ratio_min": ratio.min(),
                "ratio_max": ratio.max(),
                "approx_kl": approx_kl(batch.log_ratio.detach()),
                "kl_old_new_mean": batch.kl_old_new.mean(),
                "kl_old_new_max": batch.kl_old_new.max(),
                "clip_frac_high": nan,
                "clip_frac_low": nan,
                "mask_frac_pos": nan,
                "mask_frac_neg": nan,
                "frac_over_threshold": (batch.kl_old_new >= self.delta).float().mean(),
                "kl_ref": nan,
            }
        losses: dict[str, Tensor] = {}
        for key, value in terms.items():
            if key.startswith("loss_"):
                losses[key] = value
            else:
                diagnostics[key] = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value, device=device)
        if self.beta > 0 or self.log_kl_ref:
            penalty, exact = self.reference_kl(td, batch.loc_new, batch.scale)
            diagnostics["kl_ref"] = exact.mean()
            losses["loss_kl"] = self.beta * penalty.mean() if self.beta > 0 else torch.zeros((), device=device)
        else:
            losses["loss_kl"] = torch.zeros((), device=device)
        out = {**losses, **{key: diagnostics[key] for key in DIAGNOSTIC_KEYS}}
        out.update({key: value for key, value in diagnostics.items() if key not in out})
        return TensorDict(out, batch_size=[], device=device)


# --------------------------------------------------------------------------- registry
def _check_loss(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, FlowPolicyLoss)):
        raise ValueError(f"register_loss({name!r}) expects a FlowPolicyLoss subclass; got {cls!r}")


#: losses by name; ``@register_loss("name")`` adds one
LOSSES: Registry[type[FlowPolicyLoss]] = Registry("loss", check=_check_loss)

_L = TypeVar("_L", bound=type)


def register_loss(name: str) -> Callable[[_L], _L]:
    """Class decorator adding a ``FlowPolicyLoss`` subclass to ``LOSSES`` under ``name``.

    ``@register_loss("drpo")`` on a class in a new file is all a new method needs; importing that
    file makes ``make_loss("drpo", policy)`` work.
    """
    add = LOSSES.register(name)

    def decorator(cls: _L) -> _L:
        add(cls)
        cls.registered_name = name
        return cls

    return decorator


def get_loss_class(name: str) -> type[FlowPolicyLoss]:
    """The loss class registered as ``name``; ``ValueError`` listing the accepted names otherwise."""
    return LOSSES.lookup(name)


def make_loss(name: str, policy: nn.Module, **kwargs: Any) -> FlowPolicyLoss:
    """Build the loss registered as ``name`` around ``policy`` with its keyword arguments."""
    return get_loss_class(name)(policy, **kwargs)
