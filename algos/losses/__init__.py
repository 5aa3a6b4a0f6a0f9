"""Interchangeable policy-gradient losses over a ``flowgym.policy.FlowPolicy`` (TorchRL ``LossModule``s).

``LOSSES`` maps a name to its class; ``make_loss(name, policy, **kwargs)`` builds one. Every
loss reads the same input keys and returns the same ``loss_*`` terms and diagnostics (see
``algos.losses.base``), and declares its default advantage estimator
(``cls.default_advantage``, a name in ``algos.advantages.ADVANTAGES``) and, where it needs one,
its step kernel (``cls.required_kernel``), so a trainer never branches on the loss type.

A new method is one new file: subclass ``FlowPolicyLoss``, implement ``objective`` (with the
maths in ``algos.losses.functional`` style) and decorate it with ``@register_loss("name")``.

Methods that train on the rollout's final clean samples instead of its per-step log-probs
(DiffusionNFT, AWM) subclass ``SampleLoss`` (``algos.losses.sample_base``): their class attribute
``batch_kind = "samples"`` tells the trainer and the updater to build per-sample batches
(``batch_kind(cls)`` is ``"transitions"`` for every ``FlowPolicyLoss``).
"""

from algos.losses import functional
from algos.losses.base import (
    DIAGNOSTIC_KEYS,
    LOSSES,
    FlowPolicyLoss,
    PolicyEvaluation,
    get_loss_class,
    make_loss,
    register_loss,
)
from algos.losses.ppo_clip import ClippedRatioLoss, PPOClipLoss, PromptSigmaValue
from algos.losses.grpo import GRPOLoss
from algos.losses.cps import CPSLoss
from algos.losses.flow_dppo import FlowDPPOLoss
from algos.losses.grpo_guard import GRPOGuardLoss
from algos.losses.sample_base import SAMPLES, TRANSITIONS, SampleBatch, SampleLoss, batch_kind
from algos.losses.diffusion_nft import DiffusionNFTLoss
from algos.losses.awm import AWMLoss

__all__ = [
    "AWMLoss",
    "DIAGNOSTIC_KEYS",
    "DiffusionNFTLoss",
    "LOSSES",
    "ClippedRatioLoss",
    "CPSLoss",
    "FlowDPPOLoss",
    "FlowPolicyLoss",
    "GRPOGuardLoss",
    "GRPOLoss",
    "PPOClipLoss",
    "PolicyEvaluation",
    "PromptSigmaValue",
    "SAMPLES",
    "SampleBatch",
    "SampleLoss",
    "TRANSITIONS",
    "batch_kind",
    "functional",
    "get_loss_class",
    "make_loss",
    "register_loss",
]
