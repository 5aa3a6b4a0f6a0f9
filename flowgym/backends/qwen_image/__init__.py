"""The Qwen-Image family through diffusers (``QwenImagePipeline``), with LoRA (peft).

``QwenImageBackend`` is registered as ``"qwen_image"`` (gym id ``FlowDenoise-QwenImage-v0``); importing this
package does not import diffusers (the backend loads it when it builds a model).
"""

from flowgym.backends.qwen_image.adapter import (
    DEFAULT_QWEN_IMAGE_MODEL,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_DROP,
    QWEN_IMAGE_LORA_TARGETS,
    QwenImageBackend,
)

__all__ = ["DEFAULT_QWEN_IMAGE_MODEL", "PROMPT_TEMPLATE", "PROMPT_TEMPLATE_DROP", "QWEN_IMAGE_LORA_TARGETS", "QwenImageBackend"]
