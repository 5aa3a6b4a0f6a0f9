"""The SD3 family: Stable Diffusion 3 / 3.5 through diffusers, with LoRA (peft).

``SD3Backend`` is registered as ``"sd3"`` (gym id ``FlowDenoise-SD3-v0``); importing this package
does not import diffusers (the backend loads it when it builds a model).
"""

from flowgym.backends.sd3.backend import DEFAULT_SD3_MODEL, SD3_LORA_TARGETS, SD3Backend
from flowgym.hub import ModelNotAvailableError, hub_offline, resolve_dtype, resolve_pretrained

__all__ = [
    "DEFAULT_SD3_MODEL",
    "SD3_LORA_TARGETS",
    "ModelNotAvailableError",
    "SD3Backend",
    "hub_offline",
    "resolve_dtype",
    "resolve_pretrained",
]
