"""Environment factories and the gymnasium registration of every family's ``FlowDenoise-*`` id.

The families and what they accept come from the backend registry (``flowgym.backends.base.BACKENDS``),
never from a list kept here: a family's options are the keyword parameters of its
``from_config``, its environment defaults are ``env_defaults``, its gym id is ``env_id``.

``make_env(family, backend_options={...}, **env_kwargs)`` keeps backend options apart from the
environment's arguments (what configs do: ``env.backend`` stays nested). The gymnasium entry points
(``gym.make("FlowDenoise-Digits-v0", **kwargs)``) take one flat set of keyword arguments, split three
ways: the family's options, ``FlowPolicy`` arguments (the env's policy defaults, used by
``env.make_policy()``) and the environment's own arguments; anything else is an error naming what
is accepted.

Every factory checks what it is given before any model is built: ``check_policy_arguments`` (the
kernel, a finite noise level in the kernel's range, the guidance, the reductions) and
``flowgym.hub.resolve_device`` (a CUDA device asked for on a machine without CUDA is a
``ValueError``, not torch's assertion deep in the backend).
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any, Mapping

import gymnasium as gym

from flowgym.backends.base import BACKENDS, FlowBackend, backend_class
from flowgym.env import FlowDenoiseEnv
from flowgym.hub import resolve_device
from flowgym.kernels import KERNELS
from flowgym.policy import FlowPolicy

__all__ = ["NOISE_LEVEL_RANGES", "check_device", "check_policy_arguments", "env_arguments_with_defaults", "env_ids", "make_backend", "make_env", "make_gym_env", "make_vector_env", "register_envs", "split_options"]


def _keyword_names(function: Any, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(
        p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds and p.name not in exclude
    )


#: what FlowDenoiseEnv and FlowPolicy accept, read from their signatures
ENV_ARGUMENTS = _keyword_names(FlowDenoiseEnv.__init__, exclude=("self", "backend", "policy_defaults"))
ENV_DEFAULTS = {
    name: p.default for name, p in inspect.signature(FlowDenoiseEnv.__init__).parameters.items()
    if name in ENV_ARGUMENTS and p.default is not p.empty
}
POLICY_ARGUMENTS = tuple(k for k in _keyword_names(FlowPolicy.__init__, exclude=("self", "backend")) if k not in ENV_ARGUMENTS)

#: the noise levels a kernel is defined for, ``(low, high)`` inclusive; other kernels take any finite
#: level >= 0. CPS's eta: std = sigma_next sin(eta pi / 2) leaves [0, sigma_next] outside [0, 1]
#: (eta = 2 gives a zero std, eta > 2 a negative one)
NOISE_LEVEL_RANGES: dict[str, tuple[float, float]] = {"cps": (0.0, 1.0)}


_POLICY_CHOICES = {"reduce": ("mean", "sum"), "log_prob_convention": ("exact", "cps_legacy")}


def _literal_choices(name: str) -> tuple[str, ...]:
    """The choices of a ``Literal``-typed ``FlowPolicy`` argument (``reduce``, ``log_prob_convention``),
    read from its signature (the values above if the annotations cannot be resolved)."""
    try:
        return typing.get_args(typing.get_type_hints(FlowPolicy.__init__)[name]) or _POLICY_CHOICES[name]
    except Exception:  # an annotation only importable under TYPE_CHECKING
        return _POLICY_CHOICES[name]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_policy_arguments(arguments: Mapping[str, Any], prefix: str = "") -> None:
    """``ValueError`` naming the argument (``prefix`` + its name) and what is accepted, for the
    ``FlowPolicy`` arguments among ``arguments`` that cannot work: an unknown kernel, a noise level or
    guidance scale that is not a finite number >= 0, a noise level outside the kernel's range
    (``NOISE_LEVEL_RANGES``), an unknown ``reduce`` / ``log_prob_convention``. No model is needed."""
    kernel = arguments.get("kernel")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"{prefix}kernel={kernel!r} is not a kernel; accepted: {sorted(KERNELS)}")
    for key in ("noise_level", "guidance_scale"):
        value = arguments.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{prefix}{key} must be a finite number >= 0; got {value!r}")
    level = arguments.get("noise_level")
    kernel = kernel or "flow_sde"  # FlowPolicy's default
    if level is not None and kernel in NOISE_LEVEL_RANGES:
        low, high = NOISE_LEVEL_RANGES[kernel]
        if not low <= level <= high:
            raise ValueError(
                f"{prefix}noise_level={level!r} is outside the {kernel!r} kernel's range [{low:g}, {high:g}] "
                f"(its std is sigma_next * sin(eta pi / 2)); accepted: a number in [{low:g}, {high:g}]"
            )
    for key in ("reduce", "log_prob_convention"):
        value = arguments.get(key)
        if value is not None and value not in _literal_choices(key):
            raise ValueError(f"{prefix}{key}={value!r} is not accepted; accepted: {list(_literal_choices(key))}")


def check_device(device: Any, key: str = "device") -> None:
    """``ValueError`` naming ``key`` for a device that does not exist here (``flowgym.hub.resolve_device``)."""
    if device is None:
        return
    try:
        resolve_device(device)
    except ValueError as error:
        raise ValueError(str(error) if key == "device" else f"{key}: {error}") from None


def make_backend(name: str, **options: Any) -> FlowBackend:
    """Build the backend of family ``name`` from its options (``ValueError`` for one it does not accept)."""
    cls = backend_class(name)
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        raise ValueError(f"backend {name!r} does not accept {unknown}; accepted options: {sorted(cls.options())}")
    check_device(options.get("device"))
    return cls.from_config(**options)


def split_options(
    name: str,
    kwargs: Mapping[str, Any],
    extra_env_arguments: tuple[str, ...] = (),
    backend_options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Flat keyword arguments -> ``(backend options, policy defaults, environment arguments)``.

    A family's options are taken first (a toy backend's ``seed`` seeds the backend), on top of the
    nested ``backend_options``; ``device`` also goes to the environment when the family takes it. The
    family's ``env_defaults`` fill in the environment arguments that were not given;
    ``extra_env_arguments`` are accepted too (a gym view's own arguments, such as ``render_mode``).
    """
    cls = backend_class(name)
    kwargs = dict(kwargs)
    backend_options = {**dict(backend_options or {}), **{k: kwargs.pop(k) for k in cls.options() if k in kwargs}}
    policy_defaults = {k: kwargs.pop(k) for k in POLICY_ARGUMENTS if k in kwargs}
    accepted = (*ENV_ARGUMENTS, *extra_env_arguments)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for the {name!r} environment; accepted: its backend options "
            f"{sorted(cls.options())}, the policy's {sorted(POLICY_ARGUMENTS)} and the environment's {sorted(accepted)}"
        )
    check_policy_arguments(policy_defaults)
    check_device(backend_options.get("device"))
    check_device(kwargs.get("device"))
    env_kwargs = {**dict(cls.env_defaults), **kwargs}
    if "device" in backend_options and "device" not in env_kwargs:
        env_kwargs["device"] = backend_options["device"]
    return backend_options, policy_defaults, env_kwargs


def env_arguments_with_defaults(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every environment argument the env of family ``name`` would get from ``kwargs``: the given ones,
    then the family's ``env_defaults``, then ``FlowDenoiseEnv``'s own defaults (no model is built)."""
    _, _, env_kwargs = split_options(name, kwargs)
    return {**ENV_DEFAULTS, **env_kwargs}


def _with_default_shift(env_kwargs: dict[str, Any], backend: FlowBackend) -> dict[str, Any]:
    if env_kwargs.get("shift") is None:
        env_kwargs["shift"] = backend.default_shift()
    return env_kwargs


def make_env(
    name: str,
    backend: FlowBackend | None = None,
    *,
    backend_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> FlowDenoiseEnv:
    """The TorchRL ``FlowDenoiseEnv`` of family ``name``, e.g. ``make_env("digits", num_prompts=8)``.

    ``backend``: an already-built backend (else one is built from ``backend_options`` and the
    family options among ``kwargs``).
    """
    options, policy_defaults, env_kwargs = split_options(name, kwargs, backend_options=backend_options)
    if backend is None:
        backend = make_backend(name, **options)
    return FlowDenoiseEnv(backend, **_with_default_shift(env_kwargs, backend), policy_defaults=policy_defaults)


def make_gym_env(family: str, **kwargs: Any) -> gym.Env:
    """The gymnasium entry point of every ``FlowDenoise-*`` id: one episode, numpy observations."""
    from flowgym.gym import FlowDenoiseGymEnv

    options, policy_defaults, env_kwargs = split_options(family, kwargs, ("latent_bound", "render_mode"))
    env_kwargs.pop("group_size", None)
    backend = make_backend(family, **options)
    return FlowDenoiseGymEnv(backend, **_with_default_shift(env_kwargs, backend), policy_defaults=policy_defaults)


def make_vector_env(family: str, num_envs: int = 1, **kwargs: Any) -> gym.vector.VectorEnv:
    """The gymnasium vector entry point: ``num_envs`` samples stepping together as torch tensors."""
    from flowgym.gym import FlowDenoiseVectorEnv

    kwargs.pop("render_mode", None)
    options, policy_defaults, env_kwargs = split_options(family, kwargs, ("latent_bound", "autoreset_mode"))
    if "group_size" not in kwargs and num_envs % env_kwargs.get("group_size", 1):
        # the registered group size (8 for digits) when it divides num_envs, else groups of 1
        env_kwargs["group_size"] = 1
    backend = make_backend(family, **options)
    return FlowDenoiseVectorEnv(backend, num_envs, **_with_default_shift(env_kwargs, backend), policy_defaults=policy_defaults)


def env_ids() -> dict[str, str]:
    """``{gym id: family}`` of every registered family that has a gym id."""
    return {cls.env_id: name for name, cls in BACKENDS.items() if cls.env_id}


def register_envs() -> None:
    """Register the gym id of every registered family with gymnasium (idempotent).

    Call it again after importing a family defined outside the package.
    """
    for env_id, family in env_ids().items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="flowgym.registration:make_gym_env",
            vector_entry_point="flowgym.registration:make_vector_env",
            kwargs={"family": family},
            max_episode_steps=None,
            disable_env_checker=True,
        )
