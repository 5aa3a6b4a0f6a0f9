"""One small registry for everything that is looked up by name.

Kernels, backends (model families), rewards, losses and advantage estimators are all ``Registry``
instances: a decorator registers an object under a name, ``lookup(name)`` returns it or raises a
``ValueError`` that lists the accepted names, and ``names()`` lists them. A registry may name
*built-in modules* (or a package whose sub-modules and sub-packages are all built-ins); they are
imported on the first lookup, so that a heavy dependency loads only when something asks for it and
a new built-in is one new file (or folder) with no list to update.

A ``Registry`` reads like a mapping (``name in registry``, ``registry[name]``, ``sorted(registry)``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import Callable, Generic, Sequence, TypeVar

__all__ = ["Registry", "import_plugin"]

T = TypeVar("T")


def import_plugin(module: str | None) -> None:
    """Import ``module`` (a dotted name) so that what it defines registers itself; ``None`` does nothing.

    This is how a config names code outside the package (``algo.module``, ``env.module``).
    """
    if not module:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and module.startswith(error.name):
            raise ValueError(
                f"cannot import module {module!r} (named by a config's 'module' key): {error}. "
                "Put its folder on PYTHONPATH or install it"
            ) from None
        raise


class Registry(Mapping[str, T], Generic[T]):
    """Named objects of one kind (``kind`` appears in error messages: ``"unknown loss 'x'"``).

    Args:
        kind: what the entries are, e.g. ``"loss"`` or ``"backend"``.
        builtin_modules: modules imported on the first lookup (their imports register entries).
        builtin_package: a package whose direct sub-modules and sub-packages are all imported on the
            first lookup (modules whose name starts with ``_``, and ``base``, are skipped).
        check: called as ``check(name, obj)`` before an entry is added; raises on a bad entry.
    """

    def __init__(
        self,
        kind: str,
        *,
        builtin_modules: Sequence[str] = (),
        builtin_package: str | None = None,
        check: Callable[[str, T], None] | None = None,
    ) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._builtin_modules = tuple(builtin_modules)
        self._builtin_package = builtin_package
        self._check = check
        self._loaded = not (builtin_modules or builtin_package)

    # ------------------------------------------------------------------ registration
    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """``@registry.register("name")`` on a class or function, or ``registry.register("name", obj)``.

        Registering the same object twice is a no-op; another object under a taken name is an error.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string; got {name!r}")

        def add(entry: T) -> T:
            if self._check is not None:
                self._check(name, entry)
            current = self._entries.get(name)
            if current is not None and current is not entry:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({_describe(current)})")
            self._entries[name] = entry
            return entry

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin's entry, e.g. in tests); ``KeyError`` if it is not registered."""
        del self._entries[name]

    __delitem__ = unregister

    def pop(self, name: str, *default: T) -> T:
        """Remove ``name`` and return its entry (``default`` when given and ``name`` is not registered)."""
        return self._entries.pop(name, *default)

    # ------------------------------------------------------------------ lookup
    def lookup(self, name: str) -> T:
        """The entry registered as ``name``; ``ValueError`` naming the accepted names otherwise."""
        self._load_builtins()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; accepted: {self.names()}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        self._load_builtins()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load_builtins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    # ------------------------------------------------------------------ built-ins
    def _builtin_names(self) -> list[str]:
        names = list(self._builtin_modules)
        if self._builtin_package is not None:
            package = importlib.import_module(self._builtin_package)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_") and info.name != "base":
                    names.append(f"{self._builtin_package}.{info.name}")
        return names

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: a built-in module may look entries up while it loads
        for module in self._builtin_names():
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                # only a missing optional built-in is tolerated, never a broken dependency inside one
                if error.name != module:
                    raise


def _describe(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__
