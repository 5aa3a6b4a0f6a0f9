"""Loading pretrained models from a hub id or a local folder, and device / dtype resolution.

Every backend and every reward model loads through these helpers, so that a missing model gives
the same short ``ModelNotAvailableError`` (naming what was looked for and how to get it, never a
chain of library tracebacks) and ``device`` / ``dtype`` arguments mean the same thing everywhere:

* ``resolve_device(None | "auto" | "cpu" | "cuda:1" | torch.device)``: ``None`` and ``"auto"`` pick
  CUDA when it is available; asking for CUDA on a machine without it is a ``ValueError``.
* ``resolve_dtype(dtype, device)``: a ``torch.dtype`` or a string (``"float32"``, ``"bf16"``, ...);
  ``None`` is bfloat16 on CUDA and float32 elsewhere (``half_on_cuda=False``: float32 always);
  half precision on CPU is rejected unless ``allow_half_on_cpu``.
* ``resolve_pretrained(model, what=..., required=...)``: a local folder for a hub id (cached or
  downloaded), a local path, or ``<source>:<name>`` from a registered model source
  (``register_model_source``; ``flowgym.testing.tiny_pipelines`` registers ``tiny:<family>``, random
  tiny pipelines built offline into a cache folder); ``load_pretrained(loader, model, what=...)``: ``loader.from_pretrained``
  with the same errors, never with ``trust_remote_code``; ``fetch_file(model, filename, what=...)``.

Offline mode follows ``local_files_only`` when given, else ``HF_HUB_OFFLINE`` (``hub_offline``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = [
    "MODEL_SOURCES",
    "ModelNotAvailableError",
    "check_local_path",
    "download_hint",
    "fetch_file",
    "hub_offline",
    "load_pretrained",
    "looks_like_path",
    "module_device",
    "module_dtype",
    "parse_dtype",
    "register_model_source",
    "resolve_device",
    "resolve_dtype",
    "resolve_pretrained",
    "short_error",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
#: the dtypes a diffusers / transformers model runs in
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ModelNotAvailableError(FileNotFoundError):
    """A pretrained model could not be found locally nor downloaded; the message says how to fix it."""


#: ``{source: builder}``: ``resolve_pretrained("<source>:<name>")`` returns ``builder(name)``, a local folder.
#: Sources register themselves from higher layers (``flowgym.testing.tiny_pipelines`` adds ``tiny``).
MODEL_SOURCES: dict[str, Callable[[str], Path]] = {}
#: built-in sources: imported on their first use (``tiny:<family>`` needs no explicit import)
_SOURCE_MODULES = {"tiny": "flowgym.testing.tiny_pipelines"}


def register_model_source(source: str, builder: Callable[[str], Path]) -> None:
    """Make ``"<source>:<name>"`` resolve to the folder ``builder(name)`` (idempotent for the same builder)."""
    if not source.isidentifier():
        raise ValueError(f"a model source name must be an identifier; got {source!r}")
    MODEL_SOURCES[source] = builder


def _source_spec(spec: str) -> tuple[str, str] | None:
    """``(source, name)`` for ``"<source>:<name>"`` (hub ids never hold a colon), else None."""
    source, colon, name = spec.partition(":")
    if colon and source.isidentifier() and len(source) > 1 and not looks_like_path(spec):
        return source, name
    return None


def _resolve_source(spec: str, what: str) -> Path:
    source, name = _source_spec(spec)  # type: ignore[misc]
    if source not in MODEL_SOURCES and source in _SOURCE_MODULES:
        import importlib

        importlib.import_module(_SOURCE_MODULES[source])  # a built-in source registers itself on import
    if source not in MODEL_SOURCES:
        module = _SOURCE_MODULES.get(source)
        hint = (
            f"import {module} first (in a config: env.module: {module})" if module
            else f"register it with flowgym.hub.register_model_source({source!r}, builder)"
        )
        raise ModelNotAvailableError(
            f"{what}: {spec!r} names the model source {source!r}, which is not registered; {hint}. "
            f"Registered sources: {sorted(MODEL_SOURCES) or 'none'}"
        )
    try:
        return Path(MODEL_SOURCES[source](name))
    except (KeyError, ValueError) as error:
        raise ModelNotAvailableError(f"{what}: {spec!r}: {short_error(error)}") from None


# ---------------------------------------------------------------------------------- devices and dtypes
def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` / ``"auto"`` -> CUDA when available, else CPU; any other name as ``torch.device``.

    A CUDA device asked for on a machine without CUDA is a ``ValueError`` (not torch's assertion).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; accepted: 'auto', 'cpu', 'cuda', 'cuda:<index>'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available; use device=cpu or device=auto")
    return resolved


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating ``torch.dtype`` from a dtype or its name (``"bf16"``, ``"torch.float32"``, the only
    form a config can pass); ``None`` stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {sorted(_DTYPES)}")
        return _DTYPES[key]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be a floating torch.dtype or one of {sorted(_DTYPES)} (or None); got {dtype!r}")


def resolve_dtype(
    dtype: torch.dtype | str | None,
    device: torch.device | str = "cpu",
    *,
    half_on_cuda: bool = True,
    allow_half_on_cpu: bool = False,
) -> torch.dtype:
    """The compute dtype: ``dtype`` parsed, or for ``None`` bfloat16 on CUDA (``half_on_cuda``) else float32.

    Half precision (bf16 / fp16) on CPU is rejected with a ``ValueError`` unless
    ``allow_half_on_cpu``: most CPU kernels are slow or missing in half precision.
    """
    device = torch.device(device)
    resolved = parse_dtype(dtype)
    if resolved is not None and resolved not in _MODEL_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (or None); got {dtype!r}")
    if resolved is None:
        resolved = torch.bfloat16 if (device.type == "cuda" and half_on_cuda) else torch.float32
    if device.type == "cpu" and resolved != torch.float32 and not allow_half_on_cpu:
        raise ValueError(
            f"dtype {resolved} on CPU is not supported (slow or missing half-precision CPU kernels); "
            "use dtype=torch.float32 on CPU, or a CUDA device for bfloat16 / float16"
        )
    return resolved


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of a module's first parameter (float32 for a module without parameters)."""
    for p in module.parameters():
        return p.dtype
    return torch.float32


# ---------------------------------------------------------------------------------- hub and folders
def hub_offline(local_files_only: bool | None = None) -> bool:
    """Whether to stay off the network: ``local_files_only`` if given, else ``HF_HUB_OFFLINE``.

    The environment variable is read at call time (huggingface_hub reads it only at import).
    """
    if local_files_only is not None:
        return bool(local_files_only)
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always present with diffusers
        return False


def looks_like_path(spec: str) -> bool:
    """A string that cannot be a hub id ``name`` / ``org/name`` is treated as a local path."""
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
        or (len(spec) > 1 and spec[1] == ":")  # windows drive
    )


def download_hint(model: str) -> str:
    """How to make ``model`` available on a machine that cannot download it."""
    return (
        f"where the hub is reachable run `hf download {model} --local-dir <folder>` (gated repositories, "
        f"as SD3.5 and FLUX: accept the licence on the hub page and `hf auth login` first), copy the folder "
        f"here and pass env.backend.model=<folder> (a model family) or reward.kwargs.<reward>.model=<folder> "
        f"(a reward; .processor likewise); or set HF_HOME to a cache that holds it"
    )


def _mode(offline: bool) -> str:
    """What was tried, for a loading error: the cache only, or the cache and then the hub."""
    if offline:
        return "offline mode (HF_HUB_OFFLINE=1 or local_files_only=True): the local cache only"
    return "not in the local cache; the hub was unreachable or refused it"


def short_error(error: BaseException) -> str:
    """``"TypeName: first line"`` of an exception, at most 300 characters of it."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}"


def check_local_path(spec: str, what: str) -> None:
    """``ModelNotAvailableError`` when ``spec`` looks like a local path that does not exist."""
    path = Path(spec).expanduser()
    if not path.exists() and looks_like_path(spec):
        raise ModelNotAvailableError(
            f"{what}: local path {spec!r} does not exist. Pass an existing folder or a hub id; to get "
            f"the files, {download_hint('<hub id>')}"
        )


def resolve_pretrained(
    model: str | os.PathLike,
    *,
    what: str,
    allow_patterns: Sequence[str] | None = None,
    required: Sequence[str] = (),
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> Path:
    """A local folder holding ``model``: the folder itself, or a hub snapshot (cached or downloaded).

    ``required`` lists entries (sub-folders or files) that must exist in the folder. Raises
    ``ModelNotAvailableError`` with a short message naming what was looked for and how to get it
    (never a chain of library tracebacks). ``local_files_only=None`` follows ``HF_HUB_OFFLINE``.
    """
    spec = os.fspath(model)
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path
    elif not isinstance(model, os.PathLike) and _source_spec(spec) is not None:
        folder = _resolve_source(spec, what)
    elif path.exists():
        raise ModelNotAvailableError(f"{what}: {spec!r} is a file; expected a folder (or a hub id)")
    elif isinstance(model, os.PathLike) or looks_like_path(spec):
        raise ModelNotAvailableError(
            f"{what}: local folder {spec!r} does not exist. Pass an existing folder in the diffusers / "
            f"transformers layout or a hub id; to get the files, {download_hint('<hub id>')}"
        )
    else:
        offline = hub_offline(local_files_only)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

        try:
            folder = Path(
                snapshot_download(
                    repo_id=spec,
                    allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
                    local_files_only=offline,
                    revision=revision,
                )
            )
        except GatedRepoError:
            raise ModelNotAvailableError(
                f"{what}: hub repository {spec!r} is gated. Accept its licence at "
                f"https://huggingface.co/{spec} and log in (`hf auth login`), or {download_hint(spec)}"
            ) from None
        except RepositoryNotFoundError:
            raise ModelNotAvailableError(
                f"{what}: no hub repository {spec!r} (or it is private and you are not logged in); "
                f"check the id, or pass a local folder"
            ) from None
        except HFValidationError:
            raise ModelNotAvailableError(
                f"{what}: {spec!r} is neither an existing local folder nor a valid hub id"
            ) from None
        except Exception as error:  # offline / no cache / network failure
            mode = _mode(offline)
            raise ModelNotAvailableError(
                f"{what}: {spec!r} is not in the local Hugging Face cache and could not be downloaded "
                f"[{mode}; {short_error(error)}]. To fix: {download_hint(spec)}"
            ) from None
    missing = [entry for entry in required if not (folder / entry).exists()]
    if missing:
        raise ModelNotAvailableError(
            f"{what}: folder {str(folder)!r} lacks {missing}; expected a folder in the library's "
            f"save_pretrained layout with {list(required)}"
        )
    return folder


def load_pretrained(loader: Any, spec: str | os.PathLike, what: str, local_files_only: bool | None, **kwargs: Any) -> Any:
    """``loader.from_pretrained(spec)`` (never with remote code) with a short ``ModelNotAvailableError``
    when ``spec`` is missing; a local folder that exists but is broken raises the library's own error."""
    spec = os.fspath(spec)
    check_local_path(spec, what)
    offline = hub_offline(local_files_only)
    try:
        return loader.from_pretrained(spec, local_files_only=offline, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as error:
        if Path(spec).expanduser().is_dir():
            raise
        raise ModelNotAvailableError(
            f"{what}: could not load {spec!r} ({_mode(offline)}; {short_error(error)}). "
            f"To fix: {download_hint(spec)}"
        ) from None


def fetch_file(spec: str | os.PathLike, filename: str, what: str, local_files_only: bool | None) -> Path:
    """``filename`` inside a local folder or a hub repository (cached / downloaded)."""
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        target = path / filename
        if not target.is_file():
            raise ModelNotAvailableError(f"{what}: {str(target)!r} does not exist")
        return target
    check_local_path(spec, what)
    offline = hub_offline(local_files_only)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec, filename, local_files_only=offline))
    except Exception as error:
        raise ModelNotAvailableError(
            f"{what}: could not get {filename!r} from {spec!r} ({_mode(offline)}; "
            f"{short_error(error)}). To fix: {download_hint(spec)}"
        ) from None
