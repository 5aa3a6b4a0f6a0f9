"""The FLUX.2-klein family through diffusers (``Flux2KleinPipeline``), with LoRA (peft).

``Flux2KleinBackend`` is registered as ``"flux2_klein"`` (gym id ``FlowDenoise-FLUX2Klein-v0``); importing
this package does not import diffusers (the backend loads it when it builds a model).
"""

from flowgym.backends.flux2_klein.adapter import (
    DEFAULT_FLUX2_KLEIN_MODEL,
    FLUX2_LORA_TARGETS,
    Flux2KleinBackend,
    empirical_mu,
)

__all__ = ["DEFAULT_FLUX2_KLEIN_MODEL", "FLUX2_LORA_TARGETS", "Flux2KleinBackend", "empirical_mu"]
