"""Environment factories and gymnasium registration of the ``FlowDenoise-*`` ids.

Each factory splits its keyword arguments three ways: backend arguments (which model, dtype,
device, LoRA ...), policy defaults (``kernel``, ``noise_level``, ``guidance_scale``, used by
``env.make_policy()``) and environment arguments (steps, shift, prompts, rewards, group size ...).
"""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym

from flowgym.backends.base import FlowBackend
from flowgym.env import FlowDenoiseEnv

__all__ = ["BACKENDS", "ENV_IDS", "make_backend", "make_env", "register_envs"]

POLICY_KEYS = ("kernel", "noise_level", "guidance_scale", "reduce", "log_prob_convention")


def _digits_backend(**kwargs: Any) -> FlowBackend:
    from flowgym.backends.digits import DigitsBackend

    return DigitsBackend(**kwargs)


def _sd3_backend(**kwargs: Any) -> FlowBackend:
    from flowgym.backends.sd3 import SD3Backend

    return SD3Backend.from_pretrained(**kwargs)


def _toy_backend(**kwargs: Any) -> FlowBackend:
    from flowgym.backends.toy import ToyBackend

    return ToyBackend(**kwargs)


#: backend name -> (factory, the keyword arguments that belong to the backend, env defaults)
BACKENDS: dict[str, tuple[Callable[..., FlowBackend], tuple[str, ...], dict[str, Any]]] = {
    "digits": (_digits_backend, ("weights", "device", "dtype"), {"num_steps": 10, "shift": 1.0, "group_size": 8}),
    "sd3": (
        _sd3_backend,
        (
            "model", "dtype", "device", "resolution", "lora_rank", "lora_alpha", "lora_targets",
            "full_finetune", "max_sequence_length", "local_files_only", "load_t5", "trainable_dtype",
            "gradient_checkpointing", "revision",
        ),
        # shift None = the model's own scheduler shift (3.0 for SD3.5)
        {"num_steps": 10, "shift": None, "group_size": 1, "prompts": "pickscore_demo"},
    ),
    "toy": (_toy_backend, ("latent_shape", "hidden", "seed", "device"), {"num_steps": 10, "shift": 3.0, "group_size": 1}),
}

ENV_IDS = {"FlowDenoise-Digits-v0": "digits", "FlowDenoise-SD3-v0": "sd3", "FlowDenoise-Toy-v0": "toy"}


def _split(name: str, kwargs: dict[str, Any]) -> tuple[Callable[[], FlowBackend], dict[str, Any], dict[str, Any]]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; accepted: {sorted(BACKENDS)}")
    factory, backend_keys, env_defaults = BACKENDS[name]
    backend_kwargs = {k: kwargs.pop(k) for k in backend_keys if k in kwargs}
    policy_defaults = {k: kwargs.pop(k) for k in POLICY_KEYS if k in kwargs}
    env_kwargs = {**env_defaults, **kwargs, "policy_defaults": policy_defaults}
    if "device" in backend_kwargs and "device" not in env_kwargs:
        env_kwargs["device"] = backend_kwargs["device"]
    return (lambda: factory(**backend_kwargs)), env_kwargs, backend_kwargs


def make_backend(name: str, **kwargs: Any) -> FlowBackend:
    """Build the backend called ``name`` (``digits``, ``sd3`` or ``toy``)."""
    build, _, _ = _split(name, dict(kwargs))
    return build()


def _default_shift(env_kwargs: dict[str, Any], backend: FlowBackend) -> dict[str, Any]:
    if env_kwargs.get("shift") is None:
        env_kwargs["shift"] = float(getattr(backend, "scheduler_shift", 3.0))
    return env_kwargs


def make_env(name: str, backend: FlowBackend | None = None, **kwargs: Any) -> FlowDenoiseEnv:
    """The TorchRL ``FlowDenoiseEnv`` for a backend name, e.g. ``make_env("digits", num_prompts=8)``."""
    build, env_kwargs, _ = _split(name, dict(kwargs))
    backend = backend if backend is not None else build()
    return FlowDenoiseEnv(backend, **_default_shift(env_kwargs, backend))


def _gym_factory(name: str) -> Callable[..., gym.Env]:
    def make(**kwargs: Any) -> gym.Env:
        from flowgym.gym import FlowDenoiseGymEnv

        build, env_kwargs, _ = _split(name, dict(kwargs))
        env_kwargs.pop("group_size", None)
        backend = build()
        return FlowDenoiseGymEnv(backend, **_default_shift(env_kwargs, backend))

    return make


def _vector_factory(name: str) -> Callable[..., gym.vector.VectorEnv]:
    def make(num_envs: int = 1, **kwargs: Any) -> gym.vector.VectorEnv:
        from flowgym.gym import FlowDenoiseVectorEnv

        kwargs.pop("render_mode", None)
        build, env_kwargs, _ = _split(name, dict(kwargs))
        if "group_size" not in kwargs and num_envs % env_kwargs.get("group_size", 1):
            # the registered group size (8 for digits) when it divides num_envs, else groups of 1
            env_kwargs["group_size"] = 1
        backend = build()
        return FlowDenoiseVectorEnv(backend, num_envs, **_default_shift(env_kwargs, backend))

    return make


make_digits_gym, make_digits_vector = _gym_factory("digits"), _vector_factory("digits")
make_sd3_gym, make_sd3_vector = _gym_factory("sd3"), _vector_factory("sd3")
make_toy_gym, make_toy_vector = _gym_factory("toy"), _vector_factory("toy")


def register_envs() -> None:
    """Register every ``FlowDenoise-*`` id with gymnasium (idempotent)."""
    for env_id, name in ENV_IDS.items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point=f"flowgym.registration:make_{name}_gym",
            vector_entry_point=f"flowgym.registration:make_{name}_vector",
            max_episode_steps=None,
            disable_env_checker=True,
        )
