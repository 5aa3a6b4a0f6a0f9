"""The run configuration's schema: one dataclass per section, each default in one place.

The schema is registered with Hydra's ConfigStore as ``flowgym_schema`` and is the base of
``configs/config.yaml``: the yaml files hold only what a task or a method sets, Hydra type-checks
every value, and a key that is not in the schema fails at start-up. ``load_config`` does the same for
a plain mapping (the ``Trainer`` API, the benchmark harness) and names the accepted keys.

Sections whose keys belong to a constructor (``algo.loss`` -> the loss module, ``env.backend`` ->
the model family's ``from_config``, ``algo.advantage_kwargs``, ``reward.kwargs``) are free-form
here and checked by those constructors. ``None`` in ``env`` and ``algo`` means "the default of
whoever consumes it": the model family's ``env_defaults``, the environment's constructor, the loss
class's ``policy_defaults``, then ``FlowPolicy``'s own defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from algos.losses.functional import STEP_WEIGHTINGS
from flowgym.env import stochastic_step_mask
from flowgym.registration import check_device, check_policy_arguments

__all__ = [
    "AlgoConfig",
    "DISTRIBUTED_BACKENDS",
    "DISTRIBUTED_STRATEGIES",
    "DistributedConfig",
    "EMAConfig",
    "EnvConfig",
    "LoggerConfig",
    "RewardConfig",
    "RunConfig",
    "TrainerConfig",
    "as_dict",
    "check_distributed",
    "check_overrides",
    "check_rollout_split",
    "check_sample_split",
    "env_arguments",
    "load_config",
    "validate_config",
]


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9
    every: int = 8


#: the accepted values of ``trainer.distributed.strategy`` and ``.backend``
DISTRIBUTED_STRATEGIES: tuple[str, ...] = ("auto", "single", "ddp", "fsdp")
DISTRIBUTED_BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")


@dataclass
class DistributedConfig:
    # auto = ddp when launched by torchrun with WORLD_SIZE > 1, else single (no process group)
    strategy: str = "auto"
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    timeout_s: float = 600.0  # a collective that waits longer (a rank died or hangs) raises on every rank
    find_unused_parameters: bool = False  # DDP: for losses that leave some trained parameters without a gradient


@dataclass
class TrainerConfig:
    iterations: int = 40
    inner_epochs: int = 1
    num_minibatches: int = 2  # optimizer steps per inner epoch (the recipes use 2 per rollout)
    rollout_batches: int = 1  # env episodes (of env.num_prompts x env.group_size) collected per iteration
    micro_batch_size: Optional[int] = None  # gradient accumulation over micro-batches; None = no split
    lr: float = 3.0e-4
    weight_decay: float = 1.0e-4
    max_grad_norm: Optional[float] = 1.0
    fused_optimizer: Optional[bool] = None  # torch's fused AdamW; None = where the parameters allow it (CPU / CUDA floats)
    compile: bool = False  # torch.compile of the velocity model (rollout, loss and reference forwards); off by default: minutes of compilation on a CPU
    compile_mode: Optional[str] = None  # torch.compile's mode: None (default), "reduce-overhead" (CUDA graphs), "max-autotune"
    drop_zero_advantage: bool = True
    refresh_old_policy: bool = False  # recompute old log-probs per mini-batch before the first update (+1 forward)
    mixed_precision: bool = True  # bf16 autocast on CUDA for float32 backends; log-probs stay float32
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval_every: int = 10
    eval_num_steps: Optional[int] = None  # None = env.num_steps (the SD3.5 recipes evaluate with 40 ODE steps)
    eval_guidance_scale: Optional[float] = None  # None = the training policy's guidance
    eval_batch_size: Optional[int] = None  # evaluate in chunks of this many samples; None = all at once
    # score each rollout batch in a background thread while the next one is sampled (rollout_batches > 1)
    async_rewards: bool = False
    drift_every_iteration: bool = True  # drift KL to the reference on each rollout (one reference forward over its states)
    drift_every: int = 1  # ... on every n-th iteration only (the others log NaN)
    drift_samples: Optional[int] = None  # ... on this many samples, evenly spaced (= num_prompts: one per group); None = all
    drift_rows_per_forward: Optional[int] = None  # states per reference forward (None = all at once; 16-32 for SD3.5)
    checkpoint_every: int = 10
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class EnvConfig:
    name: str = MISSING  # the model family (a registered backend)
    module: Optional[str] = None  # imported first: a family defined outside flowgym registers itself
    num_prompts: Optional[int] = None
    group_size: Optional[int] = None
    num_steps: Optional[int] = None
    shift: Any = None  # a number, "dynamic", or None = the family's default
    prompts: Any = None  # a prompt-set name, a .txt file or a list; None = "train"
    eval_prompts: Any = None  # a prompt set evaluated beside the training prompts (held-out); None = none
    eval_train_prompts: Any = None  # the prompts of the "train" evaluation; None = the training prompts
    eval_samples_per_prompt: int = 8
    stochastic_steps: Any = None  # see flowgym.env; None = "all_but_last"
    share_initial_noise: Optional[bool] = None
    backend: Dict[str, Any] = field(default_factory=dict)  # the family's options (its from_config arguments)


@dataclass
class AlgoConfig:
    name: str = MISSING  # a registered loss
    module: Optional[str] = None  # imported first: a method defined outside algos.losses registers itself
    kernel: Optional[str] = None  # None = the loss's policy_defaults, else flow_sde
    noise_level: Optional[float] = None  # None = the loss's policy_defaults, else 0.7
    guidance_scale: Optional[float] = None  # None = 1.0 (no CFG)
    reduce: Optional[str] = None  # None = "mean" over latent dimensions
    log_prob_convention: Optional[str] = None  # None = "exact"
    advantage: Optional[str] = None  # None = the loss's default_advantage
    advantage_kwargs: Dict[str, Any] = field(default_factory=dict)
    loss: Dict[str, Any] = field(default_factory=dict)  # the loss module's keyword arguments


@dataclass
class RewardConfig:
    weights: Dict[str, float] = field(default_factory=dict)  # empty = the model family's default_rewards()
    kwargs: Dict[str, Any] = field(default_factory=dict)  # per-reward constructor arguments


@dataclass
class LoggerConfig:
    backends: List[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # add wandb to log there too
    wandb_project: str = "flowgym"
    wandb_name: str = "flowgym"
    # at each evaluation: samples/iter_<n>.png (fixed prompts x fixed noise), also sent to tensorboard / wandb
    sample_grid: bool = True
    grid_prompts: int = 8  # the first distinct prompts of the train evaluation, one row each
    grid_samples: int = 4  # samples per prompt (columns); at most env.eval_samples_per_prompt are drawn
    report: bool = True  # at the end: curves (curves.png) and report.md, as python -m algos.report RUN_DIR writes


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    # torch's CPU threads; null = torch's default (one per physical core). On a shared machine set it
    # to the cores you may use: oversubscribed threads slow a run several-fold
    num_threads: Optional[int] = None
    resume: Any = False  # true = continue the newest run of this algo/env under outputs/; or a run folder
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


ConfigStore.instance().store(name="flowgym_schema", node=RunConfig)

#: the policy arguments an algo section sets, with FlowPolicy's defaults for those left at None
POLICY_KEYS = ("kernel", "noise_level", "guidance_scale", "reduce", "log_prob_convention")


def _check_keys(value: Mapping[str, Any], schema: type, where: str) -> None:
    """Unknown keys of ``value`` against the dataclass ``schema``, recursively; the error lists the accepted keys."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, item in value.items():
        if key not in fields:
            raise ValueError(f"unknown config key {where}{key!r}; accepted keys of {where.rstrip('.') or 'the config'}: {sorted(fields)}")
        sub = fields[key].type
        sub = globals().get(sub, sub) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub) and isinstance(item, Mapping):
            _check_keys(item, sub, f"{where}{key}.")


def check_overrides(overrides: Sequence[str]) -> None:
    """Reject a command-line override whose dotted key is not in the schema, naming the accepted keys.

    Hydra rejects it too, but names only the schema class; this runs first (``algos.run``). Overrides
    that append (``+key=``), delete (``~key``), pick a config group (``algo=grpo``), or reach into a
    free-form section (``algo.loss.*``, ``env.backend.*``) are left to Hydra and the constructors.
    """
    for override in overrides:
        if override.startswith(("+", "~", "-")) or "=" not in override:
            continue
        key = override.split("=", 1)[0]
        if "." not in key or key.startswith("hydra.") or "@" in key:
            continue
        schema: Any = RunConfig
        path: list[str] = []
        for part in key.split("."):
            fields = {f.name: f for f in dataclasses.fields(schema)}
            if part not in fields:
                where = ".".join(path) or "the config"
                raise ValueError(f"unknown config key {key!r}; accepted keys of {where}: {sorted(fields)}")
            path.append(part)
            sub = fields[part].type
            sub = globals().get(sub, sub) if isinstance(sub, str) else sub
            if not dataclasses.is_dataclass(sub):
                break
            schema = sub


def load_config(cfg: Mapping[str, Any] | RunConfig) -> RunConfig:
    """A validated ``RunConfig`` from a resolved mapping (or a ``RunConfig``): unknown keys and values of
    the wrong type are rejected with the key's name, missing ones take the schema's defaults."""
    if isinstance(cfg, RunConfig):
        return cfg
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    data = {k: v for k, v in data.items() if k != "hydra"}
    _check_keys(data, RunConfig, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
    except Exception as error:  # omegaconf's validation errors name the key and the expected type
        raise ValueError(f"invalid config value: {str(error).splitlines()[0]} ({_full_key(error)})") from None
    run = OmegaConf.to_object(merged)
    _validate(run)
    return run


def _full_key(error: Exception) -> str:
    return f"key {getattr(error, 'full_key', '?')}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any, where: str, integer: bool = False) -> None:
    ok = _number(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number (finite)"
        raise ValueError(f"{where} must be {kind}; got {value!r}")


def _interval(value: Any, where: str) -> None:
    if not (_number(value) and float(value).is_integer() and value >= 0):
        raise ValueError(f"{where} must be an integer >= 0 (every n iterations; 0 = never); got {value!r}")


def validate_config(cfg: Mapping[str, Any] | RunConfig) -> None:
    """Reject invalid values before any work is done, saying what is accepted (``load_config``'s checks)."""
    if isinstance(cfg, RunConfig):
        _validate(cfg)
    else:
        load_config(cfg)


def _validate(cfg: RunConfig) -> None:
    """The checks no constructor makes before the model is built: the trainer's own section, and a few
    loss and policy values whose constructors run only after the model is loaded."""
    t, e, a = cfg.trainer, cfg.env, cfg.algo
    check_device(cfg.device)  # a CUDA device on a machine without CUDA: a clear error, before the model
    check_distributed(t.distributed)
    if t.compile_mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError("trainer.compile_mode must be null, 'default', 'reduce-overhead', 'max-autotune' or "
                         f"'max-autotune-no-cudagraphs'; got {t.compile_mode!r}")
    for key in ("iterations", "inner_epochs", "num_minibatches", "rollout_batches"):
        _positive(getattr(t, key), f"trainer.{key}", integer=True)
    for key in ("eval_every", "checkpoint_every"):
        _interval(getattr(t, key), f"trainer.{key}")
    for key in ("eval_num_steps", "eval_batch_size"):
        if getattr(t, key) is not None:
            _positive(getattr(t, key), f"trainer.{key}", integer=True)
    _positive(e.eval_samples_per_prompt, "env.eval_samples_per_prompt", integer=True)
    _positive(t.ema.every, "trainer.ema.every", integer=True)
    if not (_number(t.ema.decay) and 0 <= t.ema.decay < 1):
        raise ValueError(f"trainer.ema.decay must be a number in [0, 1); got {t.ema.decay!r}")
    _positive(t.lr, "trainer.lr")
    if cfg.num_threads is not None:
        _positive(cfg.num_threads, "num_threads", integer=True)
    for key in ("grid_prompts", "grid_samples"):
        _positive(getattr(cfg.logger, key), f"logger.{key}", integer=True)
    if t.micro_batch_size is not None:
        _positive(t.micro_batch_size, "trainer.micro_batch_size", integer=True)
    _positive(t.drift_every, "trainer.drift_every", integer=True)
    for key in ("drift_samples", "drift_rows_per_forward"):
        if getattr(t, key) is not None:
            _positive(getattr(t, key), f"trainer.{key}", integer=True)
    if not (_number(t.weight_decay) and t.weight_decay >= 0):
        raise ValueError(f"trainer.weight_decay must be a finite number >= 0; got {t.weight_decay}")
    if t.max_grad_norm is not None and not (_number(t.max_grad_norm) and t.max_grad_norm > 0):
        raise ValueError(f"trainer.max_grad_norm must be a finite number > 0, or null for no clipping; got {t.max_grad_norm}")
    for name, weight in cfg.reward.weights.items():
        if not _number(weight):
            raise ValueError(f"reward.weights.{name} must be a finite number; got {weight!r}")
    if t.eval_guidance_scale is not None:
        check_policy_arguments({"guidance_scale": t.eval_guidance_scale}, prefix="trainer.eval_")
    for key, value in a.loss.items():
        # the loss constructors check these too, but only after the model is loaded (minutes for SD3.5)
        if key == "beta" and not (_number(value) and value >= 0):
            raise ValueError(f"algo.loss.{key} must be a number >= 0 (finite); got {value!r}")
        # a trust region's width may be inf: no trust region (the plain policy gradient), never NaN
        if key in ("threshold", "clip_range", "delta") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"algo.loss.{key} must be a number >= 0 (inf = no trust region); got {value!r}")
        if key == "step_weighting" and value is not None and value not in STEP_WEIGHTINGS:
            raise ValueError(f"algo.loss.step_weighting must be one of {list(STEP_WEIGHTINGS)}; got {value!r}")
    # the policy's arguments the algo section sets (the trainer checks them again with the loss's defaults)
    check_policy_arguments({key: getattr(a, key) for key in POLICY_KEYS if getattr(a, key) is not None}, prefix="algo.")
    if a.noise_level is not None and a.noise_level <= 0:
        raise ValueError(f"algo.noise_level must be > 0 (trained steps need a Gaussian); got {a.noise_level}")


def check_distributed(d: DistributedConfig) -> None:
    """``trainer.distributed``'s values, checked before any process group is made."""
    if d.strategy not in DISTRIBUTED_STRATEGIES:
        raise ValueError(f"trainer.distributed.strategy must be one of {list(DISTRIBUTED_STRATEGIES)}; got {d.strategy!r}")
    if d.backend not in DISTRIBUTED_BACKENDS:
        raise ValueError(f"trainer.distributed.backend must be one of {list(DISTRIBUTED_BACKENDS)}; got {d.backend!r}")
    if not (_number(d.timeout_s) and d.timeout_s > 0):
        raise ValueError(f"trainer.distributed.timeout_s must be a finite number of seconds > 0; got {d.timeout_s!r}")


def check_rollout_split(cfg: RunConfig, num_prompts: int, group_size: int, num_steps: int, stochastic_steps: Any) -> None:
    """The rollout's (sample, stochastic step) pairs must split into ``trainer.num_minibatches`` equal parts."""
    stochastic = stochastic_step_mask(stochastic_steps, num_steps, torch.Generator().manual_seed(0))
    pairs = num_prompts * group_size * int(stochastic.sum()) * cfg.trainer.rollout_batches
    if pairs == 0:
        raise ValueError("env.stochastic_steps leaves no stochastic step to train on")
    if pairs % cfg.trainer.num_minibatches:
        raise ValueError(
            f"the rollout's {pairs} (sample, step) pairs do not split into trainer.num_minibatches="
            f"{cfg.trainer.num_minibatches} equal mini-batches; choose a divisor of {pairs}"
        )


def check_sample_split(cfg: RunConfig, num_prompts: int, group_size: int) -> None:
    """For a per-sample loss (``batch_kind == "samples"``): the rollout's samples must split into
    ``trainer.num_minibatches`` equal parts, and there is no per-step old policy to refresh."""
    samples = num_prompts * group_size * cfg.trainer.rollout_batches
    if samples % cfg.trainer.num_minibatches:
        raise ValueError(
            f"the rollout's {samples} samples do not split into trainer.num_minibatches="
            f"{cfg.trainer.num_minibatches} equal mini-batches; choose a divisor of {samples}"
        )
    if cfg.trainer.refresh_old_policy:
        raise ValueError(
            f"trainer.refresh_old_policy recomputes per-step log-probs; {cfg.algo.name!r} trains on clean samples "
            "and keeps its old policy as a parameter copy: set trainer.refresh_old_policy=false"
        )


def env_arguments(e: EnvConfig) -> dict[str, Any]:
    """The environment arguments an env section sets (``None`` left to the family and the env)."""
    skip = ("name", "module", "backend", "eval_prompts", "eval_train_prompts", "eval_samples_per_prompt")
    return {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name not in skip and getattr(e, f.name) is not None}


def as_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain containers (for logs and for copies a caller edits)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
