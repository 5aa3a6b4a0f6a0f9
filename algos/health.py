"""Numerical health: a NaN or inf stops the run at once, saying where it appeared.

A non-finite reward, advantage, log-probability, loss or gradient would otherwise flow on silently
(``exp(nan)`` ratios, NaN weights) and corrupt every later checkpoint. The trainer checks:

* once per rollout: the final rewards and reward terms, each stochastic step's ``sample_log_prob``
  (the old log-probs every ratio divides by) and the final latents (``check_rollout``), then the
  advantages (``check_finite``); each check reduces on the device and syncs with the host once, the
  per-quantity diagnosis runs only when something is not finite;
* once per optimiser step, in the updater: the mini-batch loss and the gradient norm, BEFORE the
  optimiser moves the weights (``check_update``, one sync for both).

Each failure raises ``NumericalError`` naming the iteration, the quantity, the denoising step (or
the epoch and mini-batch) and how many samples are affected. The failing iteration is never
checkpointed, so the newest checkpoint is the last good state and ``resume=true`` continues from it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from tensordict import TensorDictBase
from torch import Tensor

__all__ = ["NumericalError", "all_finite", "check_finite", "check_rollout", "check_update", "describe_non_finite"]


class NumericalError(RuntimeError):
    """A NaN or inf in a training quantity; the message says which, where, and what to do."""


def describe_non_finite(values: Tensor) -> str | None:
    """``"NaN"``, ``"inf"`` or ``"NaN and inf"`` for the non-finite entries of ``values``, None if all are finite."""
    values = values.detach()
    if not values.is_floating_point():
        return None
    nan, inf = bool(torch.isnan(values).any()), bool(torch.isinf(values).any())
    if not (nan or inf):
        return None
    return " and ".join(word for word, present in (("NaN", nan), ("inf", inf)) if present)


def all_finite(*tensors: Tensor | None, flags: tuple[Tensor, ...] = ()) -> bool:
    """True when every floating tensor given is free of NaN and inf and every boolean ``flags`` tensor
    (a reduction already on the device) is true: one host sync for all of them."""
    checks = [torch.isfinite(t.detach()).all() for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    checks += list(flags)
    if not checks:
        return True
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all())


def _stop(iteration: int, what: str) -> NumericalError:
    return NumericalError(
        f"iteration {iteration}: {what}. The run stops here; this iteration was not checkpointed, so the "
        "newest checkpoint in checkpoints/ is the last good state (resume=true continues from it)."
    )


def check_finite(values: Tensor, quantity: str, iteration: int) -> None:
    """Raise ``NumericalError`` if ``values`` (per sample, first dimension) holds NaN or inf."""
    if all_finite(values):
        return
    kind = describe_non_finite(values)
    if kind is None:
        return
    bad = ~torch.isfinite(values.detach().reshape(values.shape[0], -1) if values.dim() else values.detach().reshape(1, 1))
    count = int(bad.any(dim=1).sum())
    raise _stop(iteration, f"{quantity} is {kind} for {count} of {bad.shape[0]} samples")


def check_rollout(trajectory: TensorDictBase, reward: Tensor, reward_terms: Mapping[str, Tensor], iteration: int) -> None:
    """The rollout's rewards, reward terms, per-step log-probs (stochastic steps) and final latents.

    ``trajectory`` is the ``[B, K]`` TorchRL trajectory; ``reward`` (B,) and ``reward_terms`` ``{name: (B,)}``
    its final rewards (``algos.evaluation.final_rewards``). One host sync when all is finite.
    """
    log_prob, stochastic = trajectory.get("sample_log_prob"), trajectory.get("stochastic")
    # the log-probs of the trained (stochastic) steps, without a boolean-mask gather (that would sync)
    trained = (torch.isfinite(log_prob.detach().reshape(*log_prob.shape[:2], -1)).all(dim=-1) | ~stochastic).all()
    final = trajectory.get(("next", "latent"))[:, -1]
    if all_finite(reward, *reward_terms.values(), final, flags=(trained,)):
        return
    for name, values in reward_terms.items():
        check_finite(values, f"reward term {name!r}", iteration)
    check_finite(reward, "the reward", iteration)
    if describe_non_finite(log_prob) is not None:
        bad = ~torch.isfinite(log_prob.reshape(*log_prob.shape[:2], -1)).all(dim=-1)
        bad = bad & stochastic
        if bool(bad.any()):
            step = int(bad.any(dim=0).nonzero()[0])
            count = int(bad[:, step].sum())
            raise _stop(iteration, f"sample_log_prob is {describe_non_finite(log_prob[:, step])} at denoising step {step} of "
                                   f"{log_prob.shape[1]} for {count} of {log_prob.shape[0]} samples (a zero or negative step "
                                   "std? check the kernel's noise level and the schedule's last sigmas)")
    check_finite(final, "the final latent", iteration)


def check_update(loss: Tensor, grad_norm: Tensor | None, epoch: int, minibatch: int, iteration: int) -> None:
    """The mini-batch loss and the gradient norm of one optimiser step, before the step is taken."""
    if all_finite(loss, grad_norm):
        return
    where = f"inner epoch {epoch}, mini-batch {minibatch}"
    kind = describe_non_finite(loss)
    if kind is not None:
        raise _stop(iteration, f"the loss is {kind} at {where} (the weights were not updated)")
    if grad_norm is not None:
        kind = describe_non_finite(grad_norm)
        if kind is not None:
            raise _stop(iteration, f"the gradient norm is {kind} at {where} (the weights were not updated)")
