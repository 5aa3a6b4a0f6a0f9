"""FROZEN COPY of flowgym/backends/sd3/backend.py as of commit 39006ef (before the shared diffusers base),
kept only as the oracle of tests/test_sd3_parity.py: the refactored SD3 backend must reproduce its
trajectories bit for bit. Not registered as a family; never edit it.

Stable Diffusion 3 / 3.5 through diffusers: the ``"sd3"`` backend, with LoRA (peft).

``SD3Backend.from_pretrained(model)`` takes a hub id (default ``stabilityai/stable-diffusion-3.5-medium``)
or a local folder in the diffusers layout and loads the ``StableDiffusion3Pipeline`` components
one by one: ``SD3Transformer2DModel`` (the velocity model), ``AutoencoderKL`` and the three text
encoders (two CLIP, one optional T5) with their tokenizers. Nothing runs remote code.

Conventions (those of diffusers' ``StableDiffusion3Pipeline``):

* ``_forward(latents, sigma, cond)`` runs only the transformer with ``timestep = 1000 * sigma``
  (``FlowMatchEulerDiscreteScheduler`` timesteps are ``sigma * num_train_timesteps``) and returns
  the velocity ``v ≈ eps - x_data`` in the dtype of ``latents``.
* Prompt encoding: CLIP-L and CLIP-G penultimate hidden states (77 tokens each, concatenated on
  the feature axis and zero-padded to the T5 width) followed by ``max_sequence_length`` T5
  tokens; pooled = ``concat(CLIP-L text_embeds, CLIP-G text_embeds)``. Without T5 the T5 part is
  zeros, exactly as diffusers does when ``text_encoder_3=None``.
* ``decode``: ``latents / scaling_factor + shift_factor`` through the VAE; images ``(x + 1) / 2``
  clamped to [0, 1], float32.
* ``latent_shape = (in_channels, resolution // vae_scale_factor, resolution // vae_scale_factor)``.

dtypes: bfloat16 by default on CUDA (float16 accepted), float32 on CPU; half precision on CPU is
rejected (``ValueError``) because most CPU kernels are slow or missing in half precision. LoRA
weights are kept in float32 (``trainable_dtype``) while the frozen base runs in bf16/fp16, the
usual mixed-precision LoRA recipe (peft casts activations to the adapter dtype and back).

Reference policy: with LoRA, ``reference()`` disables the adapters (no second copy of the model);
with ``full_finetune=True`` a frozen copy is taken by ``snapshot_reference()`` when the backend is
built (twice the transformer's memory).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from flowgym.backends.base import FlowBackend
from flowgym.backends.lora import SD3_LORA_TARGETS, LoraAdapters, check_lora_rank
from flowgym.backends.prompts import PROMPT_SETS
from flowgym.hub import ModelNotAvailableError, module_device, module_dtype, resolve_device, resolve_dtype, resolve_pretrained

__all__ = ["DEFAULT_SD3_MODEL", "SD3_LORA_TARGETS", "LegacySD3Backend"]

DEFAULT_SD3_MODEL = "stabilityai/stable-diffusion-3.5-medium"


_SD3_REQUIRED = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_SD3_OPTIONAL = ("text_encoder_3", "tokenizer_3", "scheduler")
def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The base weights' dtype (LoRA weights may be float32 on a bf16 model): the patch embedding's."""
    weight = getattr(getattr(getattr(model, "pos_embed", None), "proj", None), "weight", None)
    return weight.dtype if isinstance(weight, Tensor) else module_dtype(model)


# ---------------------------------------------------------------------------------- backend
class LegacySD3Backend(FlowBackend):
    """Stable Diffusion 3 / 3.5 (diffusers) as a flowgym backend.

    Build it with ``SD3Backend.from_pretrained(...)``; the constructor takes already-loaded
    components. Trainable parameters: the LoRA adapters (``lora_rank > 0``), the whole transformer
    (``full_finetune=True``) or nothing (``lora_rank=0``: a frozen model, its own reference).
    """

    name = "sd3"
    env_id = "FlowDenoise-SD3-v0"
    # shift None = the model's own scheduler shift (3.0 for SD3.5)
    env_defaults = {"num_steps": 10, "shift": None, "group_size": 1, "prompts": "pickscore_demo"}
    #: images decoded per VAE call in ``decode`` (bounds activation memory)
    decode_batch_size: int = 8

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        text_encoder_2: nn.Module,
        tokenizer_2,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3=None,
        *,
        resolution: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] = SD3_LORA_TARGETS,
        full_finetune: bool = False,
        max_sequence_length: int = 256,
        trainable_dtype: torch.dtype | None = torch.float32,
        gradient_checkpointing: bool = False,
        scheduler_shift: float = 3.0,
        model_id: str | None = None,
    ) -> None:
        super().__init__()
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 must be given together (or both None)")
        check_lora_rank(lora_rank)
        if full_finetune:
            lora_rank = 0  # the whole transformer trains; LoRA settings are ignored
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an integer in [1, 512]; got {max_sequence_length!r}")
        # registration order matters: ``device`` follows the transformer
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.max_sequence_length = max_sequence_length
        self.scheduler_shift = float(scheduler_shift)
        self.model_id = model_id
        self.full_finetune = bool(full_finetune)
        self.lora_rank = lora_rank
        self._text_encoders_freed = False

        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.patch_size = int(transformer.config.patch_size)
        step = self.vae_scale_factor * self.patch_size
        if not isinstance(resolution, int) or resolution <= 0 or resolution % step:
            raise ValueError(
                f"resolution must be a positive multiple of vae_scale_factor * patch_size = {step}; got {resolution!r}"
            )
        latent_side = resolution // self.vae_scale_factor
        max_side = int(transformer.config.pos_embed_max_size or 0) * self.patch_size
        if max_side and latent_side > max_side:
            raise ValueError(
                f"resolution {resolution} needs {latent_side // self.patch_size} patches a side; this transformer's "
                f"position embedding holds at most {max_side // self.patch_size} (resolution <= "
                f"{max_side * self.vae_scale_factor})"
            )
        self.resolution = resolution
        self.latent_shape = (int(transformer.config.in_channels), latent_side, latent_side)

        for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
            if module is not None:
                module.requires_grad_(False).eval()

        self.lora = LoraAdapters(transformer, lora_rank, lora_alpha, lora_targets, trainable_dtype) if lora_rank else None
        if full_finetune:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if full_finetune:
            self.snapshot_reference()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_SD3_MODEL,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        resolution: int = 512,
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: Sequence[str] = SD3_LORA_TARGETS,
        full_finetune: bool = False,
        max_sequence_length: int = 256,
        local_files_only: bool | None = None,
        load_t5: bool = True,
        trainable_dtype: torch.dtype | None = torch.float32,
        gradient_checkpointing: bool = False,
        revision: str | None = None,
    ) -> "LegacySD3Backend":
        """Load SD3 / SD3.5 from a hub id or a local diffusers folder.

        ``dtype``: ``None`` -> bfloat16 on CUDA, float32 on CPU (half on CPU is rejected).
        ``device``: ``None`` -> CUDA if available. ``lora_rank=0`` with ``full_finetune=False``
        gives a frozen model; ``full_finetune=True`` trains every transformer weight in ``dtype``
        and ignores the LoRA arguments. ``trainable_dtype`` is the dtype of the LoRA weights
        (float32 by default; ``None`` keeps ``dtype``).
        ``load_t5=False`` skips the T5 encoder (zeros in its place, as diffusers does when it is
        absent; saves ~9 GB for SD3.5). ``local_files_only=None`` follows ``HF_HUB_OFFLINE``.
        A model that is not available raises ``ModelNotAvailableError`` (a ``FileNotFoundError``).
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        patterns = ["model_index.json"]
        for sub in (*_SD3_REQUIRED, *_SD3_OPTIONAL):
            if sub in ("text_encoder_3", "tokenizer_3") and not load_t5:
                continue
            patterns += [f"{sub}/*.json", f"{sub}/*.safetensors", f"{sub}/*.txt", f"{sub}/*.model"]
        what = "Stable Diffusion 3 model"
        folder = resolve_pretrained(
            model,
            what=what,
            allow_patterns=patterns,
            required=_SD3_REQUIRED,
            local_files_only=local_files_only,
            revision=revision,
        )

        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        def weights_present(sub: str) -> None:
            if not any((folder / sub).glob("*.safetensors")):
                raise ModelNotAvailableError(
                    f"{what}: {str(folder / sub)!r} holds no .safetensors weights (only safetensors are loaded)"
                )

        for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            weights_present(sub)
        kw = {"local_files_only": True}
        transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", dtype=dtype, **kw
        )
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", **kw)
        text_encoder_3 = tokenizer_3 = None
        if load_t5 and (folder / "text_encoder_3").is_dir() and (folder / "tokenizer_3").is_dir():
            weights_present("text_encoder_3")
            text_encoder_3 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", dtype=dtype, **kw)
            tokenizer_3 = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_3", **kw)
        shift = 3.0
        scheduler_config = folder / "scheduler" / "scheduler_config.json"
        if scheduler_config.is_file():
            shift = float(json.loads(scheduler_config.read_text()).get("shift", 3.0))

        backend = cls(
            transformer,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            text_encoder_3,
            tokenizer_3,
            resolution=resolution,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            full_finetune=full_finetune,
            max_sequence_length=max_sequence_length,
            trainable_dtype=trainable_dtype,
            gradient_checkpointing=gradient_checkpointing,
            scheduler_shift=shift,
            model_id=os.fspath(model),
        )
        return backend.to(device)

    #: configs build the backend from a hub id or folder: its options are ``from_pretrained``'s
    from_config = from_pretrained

    # ------------------------------------------------------------------ contract
    @property
    def device(self) -> torch.device:
        return module_device(self.transformer)

    def prompt_sets(self) -> dict[str, list[str]]:
        """``train`` = ``pickscore_demo``, ``heldout`` = ``pickscore_demo_eval``, plus every built-in set."""
        sets = {name: list(prompts) for name, prompts in PROMPT_SETS.items()}
        sets["train"] = list(PROMPT_SETS["pickscore_demo"])
        sets["heldout"] = list(PROMPT_SETS["pickscore_demo_eval"])
        return sets

    def velocity_model(self) -> nn.Module:
        return self.transformer

    @property
    def has_t5(self) -> bool:
        return self.text_encoder_3 is not None

    def _clip_embeds(self, prompts: list[str], index: int) -> tuple[Tensor, Tensor]:
        tokenizer = (self.tokenizer, self.tokenizer_2)[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = encoder(ids.to(module_device(encoder)), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _t5_embeds(self, prompts: list[str]) -> Tensor:
        if self.text_encoder_3 is None:
            width = int(self.transformer.config.joint_attention_dim)
            return torch.zeros(len(prompts), self.max_sequence_length, width)
        ids = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder_3(ids.to(module_device(self.text_encoder_3)))[0]

    def _encode(self, prompts: list[str]) -> TensorDict:
        """TensorDict(prompt_embeds (n, 77 + max_sequence_length, joint_dim), pooled_prompt_embeds (n, 2 * proj))."""
        if self._text_encoders_freed:
            raise RuntimeError(
                f"the text encoders were freed (free_text_encoders()); these prompts are not cached: {prompts[:3]}. "
                "Encode every prompt before freeing the encoders (encode_prompts(all_prompts))."
            )
        device, dtype = self.device, module_dtype(self.transformer)
        with torch.no_grad():
            clip_l, pooled_l = self._clip_embeds(prompts, 0)
            clip_g, pooled_g = self._clip_embeds(prompts, 1)
            clip = torch.cat([clip_l.to(device), clip_g.to(device)], dim=-1)
            t5 = self._t5_embeds(prompts).to(device=device, dtype=clip.dtype)
            clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            prompt_embeds = torch.cat([clip, t5], dim=-2).to(dtype)
            pooled = torch.cat([pooled_l.to(device), pooled_g.to(device)], dim=-1).to(dtype)
        return TensorDict(
            {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled},
            batch_size=[len(prompts)],
            device=device,
        )

    def _forward(self, latents: Tensor, sigma: Tensor, cond: TensorDict) -> Tensor:
        """Velocity from the active transformer; ``timestep = 1000 * sigma`` (diffusers' SD3 convention)."""
        model = self.active_velocity_model()
        device, dtype = module_device(model), _compute_dtype(model)
        sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).reshape(-1).expand(latents.shape[0])
        out = model(
            hidden_states=latents.to(device=device, dtype=dtype),
            timestep=sigma * 1000.0,
            encoder_hidden_states=cond["prompt_embeds"].to(device=device, dtype=dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            return_dict=False,
        )[0]
        return out.to(device=latents.device, dtype=latents.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images ``(B, 3, resolution, resolution)``, float32 in [0, 1].

        ``x = vae.decode(latents / scaling_factor + shift_factor)``, ``image = clamp((x + 1) / 2, 0, 1)``.
        Runs in chunks of ``decode_batch_size``; wrap in ``torch.no_grad()`` unless you need gradients.
        """
        vae = self.vae
        config = vae.config
        x = latents.to(device=module_device(vae), dtype=module_dtype(vae))
        x = x / config.scaling_factor + (config.shift_factor or 0.0)
        images = [vae.decode(chunk, return_dict=False)[0] for chunk in x.split(self.decode_batch_size)]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ reference and checkpoints
    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Evaluate the pretrained model: LoRA adapters disabled (no copy), re-enabled on exit.

        With ``full_finetune`` the frozen snapshot is used instead; with no trainable
        parameters (``lora_rank=0``) the model is its own reference.
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
    def offload_text_encoders(self, device: torch.device | str = "cpu") -> None:
        """Move the text encoders (e.g. to CPU) after the prompts are cached; encoding still works
        (slowly, in the load dtype) and outputs land on the transformer's device. A later
        ``backend.to(device)`` moves them back: call this after it."""
        for encoder in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if encoder is not None:
                encoder.to(device)

    def free_text_encoders(self) -> None:
        """Delete the text encoders; prompts already cached keep working, new ones raise."""
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        self._text_encoders_freed = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def to(self, *args, **kwargs) -> "LegacySD3Backend":
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
            f"{mode}, t5={self.has_t5}"
        )
