"""``DiffusersBackend``: what every diffusers flow-matching family shares; a family adapter adds the rest.

Shared here (one implementation for SD3 / SD3.5, FLUX.1, FLUX.2-klein, Qwen-Image, ...):

* loading (``from_pretrained``): a hub id, a local folder in the diffusers layout, or a registered
  model source (``tiny:<family>``), through ``flowgym.hub`` (local-files-only when offline, one
  short ``ModelNotAvailableError`` naming the id and how to get it); the folder's
  ``model_index.json`` must name one of the family's pipeline classes; each component is loaded
  with the class the adapter declares (never remote code, safetensors only);
* dtype / device placement (``flowgym.hub.resolve_dtype``: bf16 on CUDA, float32 on CPU);
* peft LoRA with the family's default target modules (``flowgym.backends.lora``), the reference
  policy as adapters off (``full_finetune``: a frozen copy), checkpoints of the adapters alone;
* the prompt-encoding cache (``FlowBackend.encode_prompts``), text-encoder offloading / freeing;
* the sigma schedule of the model's own scheduler config (``FlowMatchSchedule``: static or dynamic
  shift, ``shift_terminal``, ``invert_sigmas``, ...) at this backend's resolution, used by the env
  when ``shift`` is left to the model (``sigma_schedule``), and the transformer's timestep convention;
* one velocity call: pack the latents, run the active transformer, unpack; guidance by the family's
  convention (``guidance``): ``"cfg"`` (negative-prompt branch batched with the conditional one,
  combined by ``combine_guidance``), ``"embedded"`` (FLUX.1-dev: the scale goes into the
  guidance embedding, one forward) or ``"distilled"`` (no guidance: the scale is ignored, as the
  diffusers pipeline of a step-distilled model ignores it);
* VAE decoding in chunks, images ``clamp(x / 2 + 0.5, 0, 1)`` in float32.

A family adapter (one file, see ``flowgym/backends/flux2_klein/adapter.py``) sets the class
attributes (``name``, ``env_id``, ``pipeline_classes``, ``components``, ``default_model``,
``default_lora_targets``, ``timestep``, ``sigma_inputs``, ...) and implements the hooks
``vae_scale_factor``, ``latent_geometry``, ``pack`` / ``unpack`` (identity by default),
``_encode``, ``transformer_inputs`` and ``decode_latents``; optionally ``scheduler_mu``,
``combine_guidance`` and ``guidance``.

Latent layout: the env's latents are the pipeline's latents *before* token packing, ``(C, h, w)``
per sample (FLUX.1 / Qwen-Image: ``(16, H/8, W/8)`` and 2x2 patches packed into 64-channel tokens
inside ``_forward``; FLUX.2: ``(128, H/16, W/16)``, already patchified, one token per position).
Packing is a permutation, so an Euler step in either layout gives the same numbers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Mapping, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.backends.base import FlowBackend
from flowgym.backends.diffusers.schedule import FlowMatchSchedule, calculate_shift
from flowgym.backends.lora import LoraAdapters, check_lora_rank
from flowgym.backends.prompts import PROMPT_SETS
from flowgym.hub import ModelNotAvailableError, module_device, module_dtype, resolve_device, resolve_dtype, resolve_pretrained

__all__ = ["Component", "DiffusersBackend"]


@dataclass(frozen=True)
class Component:
    """One component of a diffusers pipeline folder: ``folder/<name>/`` loaded with ``library.class_name``.

    ``kind``: ``"model"`` (weights, loaded in the compute dtype; must hold ``.safetensors``) or
    ``"tokenizer"``. ``required=False``: absent folders give ``None`` (SD3's T5).
    """

    name: str
    library: Literal["diffusers", "transformers"]
    class_name: str
    kind: Literal["model", "tokenizer"] = "model"
    required: bool = True

    def load(self, folder: Path, dtype: torch.dtype, what: str) -> Any:
        if self.kind == "model" and not any((folder / self.name).glob("*.safetensors")):
            raise ModelNotAvailableError(
                f"{what}: {str(folder / self.name)!r} holds no .safetensors weights (only safetensors are loaded)"
            )
        cls = getattr(importlib.import_module(self.library), self.class_name)
        kwargs: dict[str, Any] = {"subfolder": self.name, "local_files_only": True}
        if self.kind == "model":
            kwargs["torch_dtype" if self.library == "diffusers" else "dtype"] = dtype
        return cls.from_pretrained(folder, **kwargs)


def _first_base_parameter(model: nn.Module) -> Tensor | None:
    for name, p in model.named_parameters():
        if "lora_" not in name:
            return p
    return None


class DiffusersBackend(FlowBackend):
    """Base of the diffusers families (see the module docstring). Not registered itself."""

    # ------------------------------------------------------------------ what a family declares
    #: diffusers pipeline classes whose folders this family loads (``model_index.json``'s ``_class_name``)
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: the pipeline's components, in registration order (the transformer first: ``device`` follows it)
    components: ClassVar[tuple[Component, ...]] = ()
    #: the hub id ``from_pretrained`` loads by default
    default_model: ClassVar[str] = ""
    #: peft target modules (suffixes of ``nn.Linear`` names in the transformer)
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    #: text tokens of the prompt encoding by default, and the most the family's pipeline accepts
    default_max_sequence_length: ClassVar[int] = 256
    max_sequence_length_limit: ClassVar[int] = 512
    #: the transformer's timestep: ``"t"`` = sigma x 1000 (SD3), ``"t/1000"`` = sigma (FLUX, Qwen-Image)
    timestep: ClassVar[Literal["t", "t/1000"]] = "t/1000"
    #: what the pipeline passes to ``set_timesteps``: nothing (``"scheduler"``) or ``linspace(1, 1/K, K)``
    sigma_inputs: ClassVar[Literal["scheduler", "linspace"]] = "linspace"
    #: the scheduler config used when a folder has none
    default_scheduler_config: ClassVar[Mapping[str, Any] | None] = None
    #: the modules ``free_text_encoders`` / ``offload_text_encoders`` act on
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: images decoded per VAE call in ``decode`` (bounds activation memory; None: one call); set per instance
    decode_batch_size: int | None = 8
    #: a readable name of the model kind, for error messages
    what: ClassVar[str] = "diffusers model"

    def __init__(
        self,
        components: Mapping[str, Any],
        *,
        resolution: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] | None = None,
        full_finetune: bool = False,
        max_sequence_length: int | None = None,
        trainable_dtype: torch.dtype | None = torch.float32,
        gradient_checkpointing: bool = False,
        scheduler_config: Mapping[str, Any] | None = None,
        pipeline_config: Mapping[str, Any] | None = None,
        model_id: str | None = None,
        decode_batch_size: int | None = 8,
    ) -> None:
        super().__init__()
        check_lora_rank(lora_rank)
        if decode_batch_size is not None and (isinstance(decode_batch_size, bool) or not isinstance(decode_batch_size, int)
                                              or decode_batch_size < 1):
            raise ValueError(f"decode_batch_size must be an integer >= 1, or null for one VAE call; got {decode_batch_size!r}")
        self.decode_batch_size = decode_batch_size
        if full_finetune:
            lora_rank = 0  # the whole transformer trains; LoRA settings are ignored
        if max_sequence_length is None:
            max_sequence_length = self.default_max_sequence_length
        limit = self.max_sequence_length_limit
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= limit:
            raise ValueError(f"max_sequence_length must be an integer in [1, {limit}]; got {max_sequence_length!r}")
        missing = [c.name for c in self.components if c.required and components.get(c.name) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the components {missing}")
        # registration order matters: ``device`` and parameter names follow the transformer first
        for component in self.components:
            setattr(self, component.name, components.get(component.name))
        self.max_sequence_length = max_sequence_length
        self.model_id = model_id
        self.pipeline_config = dict(pipeline_config or {})
        self.full_finetune = bool(full_finetune)
        self.lora_rank = lora_rank
        self._text_encoders_freed = False
        self._warned: set[str] = set()

        config = dict(scheduler_config if scheduler_config is not None else (self.default_scheduler_config or {}))
        self.schedule = FlowMatchSchedule(
            config, sigma_inputs=self.sigma_inputs, mu=self.scheduler_mu, timestep=self.timestep,
            where=f"{self.what} {model_id!r}" if model_id else self.what,
        )
        self.scheduler_shift = self.schedule.shift

        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer; got {resolution!r}")
        self.resolution = resolution
        self.latent_shape = tuple(int(n) for n in self.latent_geometry(resolution))

        for component in self.components:
            module = getattr(self, component.name)
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()

        transformer = self.transformer
        targets = self.default_lora_targets if lora_targets is None else lora_targets
        self.lora = LoraAdapters(transformer, lora_rank, lora_alpha, targets, trainable_dtype) if lora_rank else None
        if full_finetune:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if full_finetune:
            self.snapshot_reference()

    # ------------------------------------------------------------------ hooks for a family
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent position (the pipeline's ``vae_scale_factor``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_geometry(self, resolution: int) -> tuple[int, ...]:
        """The per-sample latent shape for ``resolution`` (``ValueError`` for one the model cannot take)."""
        raise NotImplementedError

    @property
    def image_seq_len(self) -> int:
        """The number of image tokens the transformer sees (the ``image_seq_len`` of the pipeline's mu)."""
        raise NotImplementedError

    def pack(self, latents: Tensor) -> Tensor:
        """Env latents ``(B, *latent_shape)`` -> the transformer's ``hidden_states`` (identity by default)."""
        return latents

    def unpack(self, tokens: Tensor) -> Tensor:
        """The transformer's output -> ``(B, *latent_shape)`` (identity by default)."""
        return tokens

    def transformer_inputs(self, hidden_states: Tensor, timestep: Tensor, cond: TensorDict, guidance: Tensor | None) -> dict[str, Any]:
        """Keyword arguments of the transformer call (``return_dict=False`` is added)."""
        raise NotImplementedError

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Env latents (in the VAE's dtype and device) -> VAE output in [-1, 1], ``(B, 3, H, W)``."""
        raise NotImplementedError

    def scheduler_mu(self, image_seq_len: int, num_steps: int, config: Mapping[str, Any]) -> float:
        """The pipeline's ``mu`` for dynamic shifting: FLUX's ``calculate_shift`` on the image tokens."""
        return calculate_shift(image_seq_len, config)

    @property
    def guidance(self) -> Literal["cfg", "embedded", "distilled"]:
        """How ``velocity`` uses ``guidance_scale`` (see the module docstring)."""
        return "cfg"

    def combine_guidance(self, v_neg: Tensor, v_cond: Tensor, guidance_scale: float) -> Tensor:
        """Classifier-free guidance from the two branches: ``v_neg + scale * (v_cond - v_neg)``."""
        return v_neg + guidance_scale * (v_cond - v_neg)

    # ------------------------------------------------------------------ construction
    @classmethod
    def read_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        dtype: torch.dtype,
        local_files_only: bool | None = None,
        revision: str | None = None,
        skip: Sequence[str] = (),
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """``(components, pipeline config, scheduler config)`` of a hub id / folder / model source.

        ``skip``: optional components not to load (SD3 without T5). Raises ``ModelNotAvailableError``.
        """
        patterns = ["model_index.json"]
        for component in (*cls.components, Component("scheduler", "diffusers", "", "tokenizer", False)):
            if component.name in skip:
                continue
            patterns += [f"{component.name}/{ext}" for ext in ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")]
        required = [c.name for c in cls.components if c.required]
        folder = resolve_pretrained(
            model, what=cls.what, allow_patterns=patterns, required=required,
            local_files_only=local_files_only, revision=revision,
        )
        index_file = folder / "model_index.json"
        pipeline_config = json.loads(index_file.read_text()) if index_file.is_file() else {}
        pipeline = pipeline_config.get("_class_name")
        if pipeline is not None and cls.pipeline_classes and pipeline not in cls.pipeline_classes:
            raise ModelNotAvailableError(
                f"{cls.what}: {os.fspath(model)!r} holds a {pipeline}; the {cls.name!r} family loads "
                f"{' / '.join(cls.pipeline_classes)} folders"
            )
        components: dict[str, Any] = {}
        for component in cls.components:
            if component.name in skip or not (folder / component.name).is_dir():
                components[component.name] = None
                continue
            components[component.name] = component.load(folder, dtype, cls.what)
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
        return components, pipeline_config, scheduler_config

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        resolution: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] | None = None,
        full_finetune: bool = False,
        max_sequence_length: int | None = None,
        local_files_only: bool | None = None,
        trainable_dtype: torch.dtype | None = torch.float32,
        gradient_checkpointing: bool = False,
        revision: str | None = None,
        decode_batch_size: int | None = 8,
    ) -> "DiffusersBackend":
        """Load the family from a hub id (``None``: ``default_model``), a local diffusers folder or
        ``tiny:<family>``.

        ``dtype``: ``None`` -> bfloat16 on CUDA, float32 on CPU (half on CPU is rejected).
        ``device``: ``None`` -> CUDA if available. ``lora_rank=0`` with ``full_finetune=False`` gives
        a frozen model; ``full_finetune=True`` trains every transformer weight. ``lora_targets``:
        ``None`` = the family's ``default_lora_targets``. ``max_sequence_length``: ``None`` = the
        family's default (the pipeline's). ``local_files_only=None`` follows ``HF_HUB_OFFLINE``.
        ``decode_batch_size``: images per VAE call (bounds the decoder's activation memory); ``None``
        decodes a batch in one call, the fastest where it fits.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model = cls.default_model if model is None else model
        components, pipeline_config, scheduler_config = cls.read_pretrained(
            model, dtype=dtype, local_files_only=local_files_only, revision=revision
        )
        backend = cls(
            components, resolution=resolution, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
            full_finetune=full_finetune, max_sequence_length=max_sequence_length, trainable_dtype=trainable_dtype,
            gradient_checkpointing=gradient_checkpointing, scheduler_config=scheduler_config,
            pipeline_config=pipeline_config, model_id=os.fspath(model), decode_batch_size=decode_batch_size,
        )
        return backend.to(device)

    @classmethod
    def from_config(cls, **options: Any) -> "DiffusersBackend":
        """Configs build the backend from a hub id or folder: the options are ``from_pretrained``'s."""
        return cls.from_pretrained(**options)

    @classmethod
    def options(cls) -> tuple[str, ...]:
        import inspect

        parameters = inspect.signature(cls.from_pretrained).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return tuple(p.name for p in parameters if p.kind in kinds and p.name not in ("self", "cls"))

    # ------------------------------------------------------------------ the FlowBackend contract
    @property
    def device(self) -> torch.device:
        return module_device(self.transformer)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The base weights' dtype (LoRA weights may be float32 on a bf16 model)."""
        weight = _first_base_parameter(self.transformer)
        return weight.dtype if weight is not None else module_dtype(self.transformer)

    def prompt_sets(self) -> dict[str, list[str]]:
        """``train`` = ``pickscore_demo``, ``heldout`` = ``pickscore_demo_eval``, plus every built-in set."""
        sets = {name: list(prompts) for name, prompts in PROMPT_SETS.items()}
        sets["train"] = list(PROMPT_SETS["pickscore_demo"])
        sets["heldout"] = list(PROMPT_SETS["pickscore_demo_eval"])
        return sets

    def velocity_model(self) -> nn.Module:
        return self.transformer

    def sigma_schedule(self, num_steps: int) -> Tensor:
        """The K + 1 sigmas of the model's own scheduler at this resolution (dynamic shift included)."""
        return self.schedule.sigmas(num_steps, self.image_seq_len)

    def default_shift(self) -> float | str:
        """The static shift when the model's schedule is a plain static shift (SD3), else ``"model"``."""
        static = self.schedule.static_shift
        return float(static) if static is not None else "model"

    def check_encoders_available(self, prompts: Sequence[str]) -> None:
        if self._text_encoders_freed:
            raise RuntimeError(
                f"the text encoders were freed (free_text_encoders()); these prompts are not cached: {list(prompts)[:3]}. "
                "Encode every prompt before freeing the encoders (encode_prompts(all_prompts))."
            )

    def velocity(self, latents: Tensor, sigma: Tensor, cond: TensorDict, guidance_scale: float = 1.0) -> Tensor:
        """Predicted velocity ``v ≈ eps - x_data`` in the env's layout, guided by the family's convention.

        ``"cfg"``: ``guidance_scale != 1`` runs the negative-prompt and conditional branches in one
        batched forward and returns ``combine_guidance(v_neg, v_cond, scale)``. ``"embedded"``:
        one forward with ``guidance = scale`` in the guidance embedding. ``"distilled"``: the scale
        is ignored (a warning, once).
        """
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(latents.shape[0])
        mode = self.guidance
        if mode == "embedded":
            return self._forward(latents, sigma, cond, guidance=float(guidance_scale))
        if guidance_scale == 1.0:
            return self._forward(latents, sigma, cond)
        if mode == "distilled":
            if "distilled" not in self._warned:
                self._warned.add("distilled")
                warnings.warn(
                    f"{self.what}: guidance_scale {guidance_scale} is ignored for a step-distilled model "
                    "(as its diffusers pipeline ignores it)", stacklevel=2,
                )
            return self._forward(latents, sigma, cond)
        both = self._forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]), self.guidance_conditioning(cond))
        v_neg, v_cond = both.chunk(2)
        return self.combine_guidance(v_neg, v_cond, guidance_scale)

    def _forward(self, latents: Tensor, sigma: Tensor, cond: TensorDict, guidance: float | None = None) -> Tensor:
        """One transformer call: pack, ``timestep = schedule.model_timestep(sigma)``, unpack; in ``latents``' dtype."""
        model = self.active_velocity_model()
        device = module_device(model)
        weight = _first_base_parameter(model)
        dtype = weight.dtype if weight is not None else module_dtype(model)
        sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).reshape(-1).expand(latents.shape[0])
        hidden = self.pack(latents.to(device=device, dtype=dtype))
        guidance_tensor = None
        if guidance is not None:
            # the pipeline's torch.full([1], scale, float32).expand(B); the transformer casts and x1000
            guidance_tensor = torch.full([1], guidance, device=device, dtype=torch.float32).expand(latents.shape[0])
        kwargs = self.transformer_inputs(hidden, self.schedule.model_timestep(sigma), cond.to(device), guidance_tensor)
        out = model(**kwargs, return_dict=False)[0]
        out = self.unpack(out)
        if self.schedule.inverted:
            out = -out  # the model predicts d x / d(1 - s)
        return out.to(device=latents.device, dtype=latents.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images ``(B, 3, resolution, resolution)``, float32 in [0, 1] (``clamp(x / 2 + 0.5)``).

        Runs in chunks of ``decode_batch_size`` (None: one call); wrap in ``torch.no_grad()`` unless you
        need gradients.
        """
        vae = self.vae
        x = latents.to(device=module_device(vae), dtype=module_dtype(vae))
        chunks = [x] if self.decode_batch_size is None else x.split(self.decode_batch_size)
        images = [self.decode_latents(chunk) for chunk in chunks]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0.0, 1.0)

    def check_resolution_multiple(self, resolution: int, multiple: int) -> None:
        if resolution % multiple:
            raise ValueError(
                f"resolution must be a positive multiple of {multiple} for {self.what} "
                f"(vae_scale_factor x packing); got {resolution!r}"
            )

    # ------------------------------------------------------------------ reference and checkpoints
    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Evaluate the pretrained model: LoRA adapters disabled (no copy), re-enabled on exit.

        With ``full_finetune`` the frozen snapshot is used instead; with no trainable parameters
        (``lora_rank=0``) the model is its own reference.
        """
        if self.lora is not None:
            with self.lora.disabled():
                yield
        elif self.full_finetune:
            with super().reference():
                yield
        else:
            yield

    def lora_parameter_names(self) -> list[str]:
        """Names (in ``transformer.named_parameters()``) of the LoRA weights; empty without LoRA."""
        return list(self.lora.names) if self.lora is not None else []

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the LoRA weights with LoRA (the whole transformer with ``full_finetune``): a dict of
        contiguous tensors, ready for ``safetensors.torch.save_file``."""
        if self.lora is not None:
            return self.lora.state_dict()
        return {k: v.contiguous() for k, v in super().trainable_state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load weights saved by ``trainable_state_dict``; keys and shapes must match exactly."""
        if self.lora is not None:
            self.lora.load_state_dict(state)
            return
        super().load_trainable_state_dict(state)

    # ------------------------------------------------------------------ memory management
    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (getattr(self, name, None) for name in self.text_encoder_names) if m is not None]

    def offload_text_encoders(self, device: torch.device | str = "cpu") -> None:
        """Move the text encoders (e.g. to CPU) after the prompts are cached; encoding still works
        (slowly, in the load dtype) and outputs land on the transformer's device. A later
        ``backend.to(device)`` moves them back: call this after it."""
        for encoder in self.text_encoders():
            encoder.to(device)

    def free_text_encoders(self) -> None:
        """Delete the text encoders; prompts already cached keep working, new ones raise."""
        for name in self.text_encoder_names:
            setattr(self, name, None)
        self._text_encoders_freed = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def to(self, *args, **kwargs) -> "DiffusersBackend":
        """Move the backend; the prompt cache follows the device."""
        super().to(*args, **kwargs)
        device = self.device
        self._prompt_cache = {p: td.to(device) for p, td in self._prompt_cache.items()}
        self._stacked_prompts = None
        return self

    def extra_repr(self) -> str:
        mode = f"lora_rank={self.lora_rank}" if self.lora_rank else ("full_finetune" if self.full_finetune else "frozen")
        return (
            f"model={self.model_id!r}, resolution={self.resolution}, latent_shape={self.latent_shape}, "
            f"{mode}, schedule=({self.schedule.describe()})"
        )
