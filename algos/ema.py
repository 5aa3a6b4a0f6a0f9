"""Exponential moving average of the trained parameters (Flow-GRPO keeps one for evaluation)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["ParameterEMA"]


class ParameterEMA:
    """``ema = decay * ema + (1 - decay) * param`` every ``every`` calls of ``update()``.

    Only the trained parameters are averaged (LoRA adapters for SD3), never a whole model copy.
    ``swapped_in()`` evaluates with the averaged weights and restores the live ones afterwards.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float = 0.9, every: int = 8) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1); got {decay}")
        if every < 1:
            raise ValueError(f"ema every must be >= 1; got {every}")
        self.parameters = list(parameters)
        self.decay = decay
        self.every = every
        self.calls = 0
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.calls += 1
        if self.calls % self.every:
            return
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.lerp_(param.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for param, shadow in zip(self.parameters, self.shadow):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.parameters, live):
                    param.copy_(value)

    def state_dict(self) -> dict:
        return {"calls": self.calls, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        for shadow, value in zip(self.shadow, state["shadow"]):
            shadow.copy_(value)
