"""The backend interface: what a model family provides to the denoising MDP, and the family registry.

A backend owns the velocity model (the only module the policy runs each step), the prompt
encoder (run once per distinct prompt, cached) and the decoder (run once, at the terminal step).
A model family is one folder, ``flowgym/backends/<family>/``, whose ``__init__`` registers its
backend class with ``@register_backend("<family>")``; the folder is found and imported on the first
lookup of ``BACKENDS``. A family outside the package registers the same way when its module is
imported (``env.module`` in a config).

Subclasses implement five hooks:

* ``prompt_sets()``                 -> ``{name: [prompt, ...]}`` (at least ``"train"``)
* ``_encode(prompts)``              -> ``TensorDict`` with batch size ``[len(prompts)]``
* ``_forward(latents, sigma, cond)`` -> velocity of the same shape as ``latents``
* ``decode(latents)``               -> images, float32 in [0, 1], shape ``(B, C, H, W)``
* ``velocity_model()``              -> the module whose parameters define the policy

and set ``name`` and ``latent_shape``. A family may also override:

* ``from_config(**options)`` (a classmethod; the constructor by default): how a config builds the
  backend. Its keyword parameters *are* the family's accepted options (``env.backend.<option>``);
* ``env_defaults``: the environment arguments the family is meant to run with (steps, shift, group
  size); ``env_id``: its gymnasium id (``FlowDenoise-<Name>-v0``);
* ``default_rewards()``: ``{reward name: weight}`` used when a config names none;
* ``prior_capability_metrics(images, prompts)``: metrics of what the pretrained model could do
  (forgetting is measured with them at every evaluation);
* ``reference()``: a cheaper way to evaluate the pretrained model (LoRA adapters disabled);
* ``sigma_schedule(num_steps)`` / ``default_shift()``: the schedule of the model's own scheduler (a
  static ``scheduler_shift`` by default; the diffusers families read their scheduler config, dynamic
  shifting at their resolution included). The env uses them when ``shift`` is left to the model.

``velocity`` (classifier-free guidance in one batched forward), the prompt cache,
``trainable_parameters`` and the ``reference()`` context come from this base class.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import weakref
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.registry import Registry
from flowgym.schedules import static_shift_sigmas
from flowgym.td_utils import tensordict_unchecked

__all__ = ["BACKENDS", "FlowBackend", "backend_class", "register_backend"]


class FlowBackend(nn.Module):
    """Base class of model backends. See the module docstring for the contract."""

    #: short name of the model family, e.g. ``"digits"`` or ``"sd3"``
    name: str = "base"
    #: per-sample latent shape, e.g. ``(1, 8, 8)`` or ``(16, 64, 64)``
    latent_shape: tuple[int, ...] = ()
    #: the prompt classifier-free guidance pushes away from
    negative_prompt: str = ""
    #: gymnasium id registered for the family (None: no gym id)
    env_id: ClassVar[str | None] = None
    #: environment arguments the family runs with unless a caller says otherwise
    env_defaults: ClassVar[Mapping[str, Any]] = {}
    #: the static schedule shift of the model's own scheduler, used when ``shift=None``
    scheduler_shift: float = 3.0

    def __init__(self) -> None:
        super().__init__()
        self._prompt_cache: dict[str, TensorDict] = {}
        # (sorted distinct prompts, their stacked encodings, row of each prompt)
        self._stacked_prompts: tuple[tuple[str, ...], TensorDict, dict[str, int]] | None = None
        self.reference_model: nn.Module | None = None
        self._use_reference = False

    # ------------------------------------------------------------------ hooks for subclasses
    def prompt_sets(self) -> dict[str, list[str]]:
        """Named prompt lists; ``"train"`` is required, others (e.g. ``"heldout"``) optional."""
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> TensorDict:
        """Encode distinct prompts, uncached: a TensorDict with batch size ``[len(prompts)]``."""
        raise NotImplementedError

    def _forward(self, latents: Tensor, sigma: Tensor, cond: TensorDict) -> Tensor:
        """One forward of the velocity model. ``sigma`` has shape ``(B,)``, in [0, 1]."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images, float32 in [0, 1], shape ``(B, C, H, W)``."""
        raise NotImplementedError

    def velocity_model(self) -> nn.Module:
        """The module whose parameters define the policy (trained, or carrying the adapters)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks
    @classmethod
    def from_config(cls, **options: Any) -> "FlowBackend":
        """Build the backend from its config options (the constructor's keyword arguments by default)."""
        return cls(**options)

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The options ``from_config`` accepts: its keyword parameters (the constructor's when the family
        keeps the default ``from_config``), read from the signature."""
        builder = cls.__init__ if cls.from_config.__func__ is FlowBackend.from_config.__func__ else cls.from_config
        parameters = inspect.signature(builder).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(p.name for p in parameters if p.kind in kinds and p.name not in ("self", "cls"))

    def default_rewards(self) -> dict[str, float]:
        """``{reward name: weight}`` when a caller names no reward (a generic, model-free reward here)."""
        return {"jpeg_compressibility": 1.0}

    def prior_capability_metrics(self, images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Prior-capability metrics of decoded ``images`` for ``prompts`` (none by default)."""
        return {}

    def sigma_schedule(self, num_steps: int) -> Tensor:
        """The K + 1 sigmas of the model's own sampler (``shift="model"``): a static ``scheduler_shift`` here."""
        return static_shift_sigmas(num_steps, float(self.scheduler_shift))

    def default_shift(self) -> float | str:
        """What ``shift=None`` means for this family: a number (a static shift) or ``"model"``
        (``sigma_schedule``, e.g. a resolution-dependent dynamic shift)."""
        return float(self.scheduler_shift)

    # ------------------------------------------------------------------ shared behaviour
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the velocity model."""
        for p in self.velocity_model().parameters():
            return p.dtype
        return torch.float32

    def resolve_prompt_set(self, name: str) -> list[str]:
        sets = self.prompt_sets()
        if name not in sets:
            raise ValueError(f"unknown prompt set {name!r} for backend {self.name!r}; accepted: {sorted(sets)}")
        return list(sets[name])

    def encode_prompts(self, prompts: Sequence[str]) -> TensorDict:
        """Conditioning for ``prompts`` (batch ``[len(prompts)]``); each distinct prompt is encoded once.

        The cache lives as long as the backend; ``clear_prompt_cache()`` empties it.
        """
        prompts = list(prompts)
        distinct_set = set(prompts)
        missing = [] if distinct_set <= self._prompt_cache.keys() else [
            p for p in dict.fromkeys(prompts) if p not in self._prompt_cache
        ]
        if missing:
            with torch.no_grad():
                encoded = self._encode(missing)
            if encoded.batch_size != torch.Size([len(missing)]):
                raise RuntimeError(
                    f"{type(self).__name__}._encode returned batch size {tuple(encoded.batch_size)}; "
                    f"expected ({len(missing)},)"
                )
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = encoded[i].clone()
        # gather rows from one stack of the distinct prompts: stacking B per-prompt tensordicts costs
        # more than a small model's forward at batch 256. The stack is kept while batches keep
        # drawing from the same prompts (a short prompt list), and rebuilt when the set changes.
        distinct = tuple(sorted(distinct_set))
        if self._stacked_prompts is None or self._stacked_prompts[0] != distinct:
            stacked = torch.stack([self._prompt_cache[p] for p in distinct], dim=0)
            self._stacked_prompts = (distinct, stacked, {prompt: i for i, prompt in enumerate(distinct)})
        _, stacked, rows = self._stacked_prompts
        index = np.fromiter(map(rows.__getitem__, prompts), dtype=np.int64, count=len(prompts))  # 4x torch.tensor(list)
        index = torch.from_numpy(index).to(stacked.device)
        # row-gather each entry and wrap the result unchecked: indexing the tensordict itself costs
        # 5x more (0.1 ms in a rollout) for the same values
        gathered = {key: value[index] for key, value in stacked.items()}
        return tensordict_unchecked(gathered, batch_size=(len(prompts),), device=stacked.device)

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()
        self._stacked_prompts = None
        self.__dict__.pop("_guidance_pair", None)

    def guidance_conditioning(self, cond: TensorDict) -> TensorDict:
        """``[negative prompt x B; cond]``, the conditioning of a batched classifier-free-guidance forward.

        Built once per conditioning object and reused while the same one comes back: a rollout passes
        its episode's conditioning at every step, so the concatenation (for SD3, B x 333 tokens x 4096
        of T5 states twice) happens once per episode instead of once per step. A conditioning must not
        be changed in place between calls (nothing in flowgym does; a new one is always a new object).
        """
        cached = self.__dict__.get("_guidance_pair")
        key = (self.negative_prompt, cond.batch_size, cond.device)
        if cached is not None and cached[0]() is cond and cached[1] == key:
            return cached[2]
        negative = self.encode_prompts([self.negative_prompt]).expand(cond.batch_size[0]).to(cond.device)
        both = torch.cat([negative, cond])
        self.__dict__["_guidance_pair"] = (weakref.ref(cond), key, both)
        return both

    def velocity(self, latents: Tensor, sigma: Tensor, cond: TensorDict, guidance_scale: float = 1.0) -> Tensor:
        """Predicted velocity, with classifier-free guidance when ``guidance_scale != 1``.

        CFG runs the unconditional (negative-prompt) and conditional branches in one batched
        forward: ``v = v_neg + guidance_scale * (v_cond - v_neg)``.
        """
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(latents.shape[0])
        if guidance_scale == 1.0:
            return self._forward(latents, sigma, cond)
        both = self._forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]), self.guidance_conditioning(cond))
        v_neg, v_cond = both.chunk(2)
        return v_neg + guidance_scale * (v_cond - v_neg)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.velocity_model().parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained weights only (what a checkpoint stores)."""
        names = {id(p) for p in self.trainable_parameters()}
        return {
            k: v.detach().clone()
            for k, v in self.velocity_model().named_parameters()
            if id(v) in names
        }

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.velocity_model().named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"state holds parameters this backend does not have: {unknown[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def snapshot_reference(self) -> None:
        """Keep a frozen copy of the current velocity model as the reference policy.

        Call it once the pretrained weights are loaded (backends do, in their constructor).
        Fine for small models; backends with adapters override ``reference()`` instead and never
        need a second copy.
        """
        self.reference_model = copy.deepcopy(self.velocity_model()).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Evaluate the frozen pretrained (reference) model inside this context."""
        if getattr(self, "reference_model", None) is None:
            raise RuntimeError(
                f"{type(self).__name__} has no reference model: call snapshot_reference() after "
                "loading the pretrained weights, or override reference()"
            )
        previous = self._use_reference
        self._use_reference = True
        try:
            yield
        finally:
            self._use_reference = previous

    def active_velocity_model(self) -> nn.Module:
        """The model ``_forward`` should run: the frozen reference inside ``reference()``."""
        if self._use_reference:
            return self.reference_model
        return self.velocity_model()


def _check_backend(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, FlowBackend)):
        raise ValueError(f"register_backend({name!r}) expects a FlowBackend subclass; got {cls!r}")


#: model families by name; the folders under ``flowgym/backends`` are imported on the first lookup
BACKENDS: Registry[type[FlowBackend]] = Registry("backend", builtin_package="flowgym.backends", check=_check_backend)


def register_backend(name: str):
    """Class decorator registering a ``FlowBackend`` subclass as the model family ``name``."""
    return BACKENDS.register(name)


def backend_class(name: str) -> type[FlowBackend]:
    """The backend class registered as ``name``; ``ValueError`` listing the families otherwise."""
    return BACKENDS.lookup(name)
