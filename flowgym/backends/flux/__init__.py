"""The FLUX.1 family (dev / schnell) through diffusers (``FluxPipeline``), with LoRA (peft).

``FluxBackend`` is registered as ``"flux"`` (gym id ``FlowDenoise-FLUX-v0``); importing this package does
not import diffusers (the backend loads it when it builds a model).
"""

from flowgym.backends.flux.adapter import DEFAULT_FLUX_MODEL, FLUX_LORA_TARGETS, FluxBackend

__all__ = ["DEFAULT_FLUX_MODEL", "FLUX_LORA_TARGETS", "FluxBackend"]
