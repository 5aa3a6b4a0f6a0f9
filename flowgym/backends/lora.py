"""peft LoRA adapters on a diffusers model, shared by the families that fine-tune with LoRA.

``LoraAdapters(model, rank, alpha, targets)`` adds one adapter through diffusers'
``PeftAdapterMixin.add_adapter`` (``init_lora_weights="gaussian"``: ``lora_A`` random, ``lora_B``
zero, so the adapted model starts exactly at the pretrained one), makes only the adapter weights
trainable, and gives the three things a backend needs: ``disabled()`` (the pretrained model as the
reference policy without a second copy), ``state_dict()`` and ``load_state_dict()`` (the adapter
weights alone, for checkpoints).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SD3_LORA_TARGETS", "LoraAdapters", "check_lora_rank"]

#: Flow-GRPO's LoRA targets for SD3 / SD3.5: the joint attention's image and text projections
SD3_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def check_lora_rank(lora_rank: object) -> int:
    """``lora_rank`` as an int >= 0 (0: no LoRA), or a ``ValueError`` saying what is accepted."""
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an integer >= 0 (0: no LoRA); got {lora_rank!r}")
    return lora_rank


class LoraAdapters:
    """One LoRA adapter on ``model`` (a diffusers model with ``add_adapter``).

    ``names`` are the adapter weights' names in ``model.named_parameters()``; they are the only
    parameters of ``model`` left trainable (stored in ``trainable_dtype`` when given).
    """

    def __init__(
        self,
        model: nn.Module,
        rank: int,
        alpha: float,
        targets: Sequence[str] = SD3_LORA_TARGETS,
        trainable_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        from peft import LoraConfig

        if check_lora_rank(rank) == 0:
            raise ValueError("LoraAdapters needs lora_rank >= 1")
        targets = list(targets)
        if not targets:
            raise ValueError("lora_targets is empty; give module name suffixes such as 'attn.to_q'")
        self.model = model
        self.rank = rank
        model.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
        try:
            model.add_adapter(config)
        except ValueError as error:
            if "not found in the base model" in str(error) or "Target modules" in str(error):
                raise ValueError(
                    f"lora_targets {targets} match no module of the transformer; accepted: suffixes of its "
                    f"nn.Linear module names, e.g. {list(SD3_LORA_TARGETS)}"
                ) from None
            raise
        self.names = [n for n, _ in model.named_parameters() if "lora_" in n]
        if not self.names:
            raise ValueError(f"lora_targets {targets} created no LoRA parameters")
        params = dict(model.named_parameters())
        for name in self.names:
            if trainable_dtype is not None:
                params[name].data = params[name].data.to(trainable_dtype)
            params[name].requires_grad_(True)
        self._disabled = False

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The pretrained model inside the context (adapters off), re-enabled on exit; nests."""
        if self._disabled:
            yield
            return
        params = dict(self.model.named_parameters())
        flags = {name: params[name].requires_grad for name in self.names}
        self.model.disable_adapters()
        self._disabled = True
        try:
            yield
        finally:
            self.model.enable_adapters()
            self._disabled = False
            for name, flag in flags.items():  # peft toggles requires_grad; restore exactly
                params[name].requires_grad_(flag)

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter weights as contiguous copies, ready for ``safetensors.torch.save_file``."""
        params = dict(self.model.named_parameters())
        return {name: params[name].detach().clone().contiguous() for name in self.names}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load weights saved by ``state_dict``; keys and shapes must match exactly."""
        params = dict(self.model.named_parameters())
        unknown = sorted(set(state) - set(self.names))
        missing = sorted(set(self.names) - set(state))
        if unknown or missing:
            raise ValueError(
                f"LoRA state does not match this backend: unknown keys {unknown[:3]}, missing keys "
                f"{missing[:3]} (is the LoRA rank / target list the same?)"
            )
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(value)
