"""Name -> class tables for nslens' extension points: operators (``nslens.ops``), rankings (``nslens.rank``), model
families (``nslens.models``) and dataset sources (``nslens.data``).

Each extension point is one small base class in its own module and one ``Registry`` here; adding an operator, a
ranking, a family or a source is one class and one ``register`` call (``docs/extending.md``). Whatever reads the
names (config validation, the CLI's help, "choose one of ..." errors) reads the registry, so a registered class is
accepted everywhere a built-in one is.

A built-in whose module sits *above* the registry's module in the import graph (LEACE needs the range masks, the
NeurGrad ranking the model code) is registered by its import path, ``"nslens.leace:Leace"``, and imported on first
lookup: the name is listed from the start and no import cycle arises.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

from .errors import NsLensError

__all__ = ["Names", "Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names (in registration order) -> classes for one extension point; ``what`` names it in error messages
    ("unknown operator 'x'; choose one of ...")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str, *, replace: bool = False) -> T | str:
        """Add ``entry`` (a class, or ``"module:Name"`` imported on first lookup) under ``name``. A name already
        taken is refused unless ``replace=True`` (so a typo never silently shadows a built-in)."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise NsLensError(f"a {self.what} needs a non-empty name without surrounding spaces, got {name!r}")
        if name in self._entries and not replace and self._entries[name] is not entry:
            raise NsLensError(f"{self.what} {name!r} is already registered; pass replace=True to replace it")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's or a session's own registration)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        """The class registered as ``name``, or a one-line error listing the registered names."""
        if name not in self._entries:
            raise self.unknown(name)
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def names(self, keep: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        """The registered names in registration order (those whose class passes ``keep``)."""
        return tuple(n for n in list(self._entries) if keep is None or keep(self.get(n)))

    def unknown(self, name: Any, choices: Sequence[str] | None = None) -> NsLensError:
        """The error for a name that is not registered (``choices``: the names valid where it was asked)."""
        listed = self.names() if choices is None else choices
        return NsLensError(f"unknown {self.what} {name!r}; choose one of {', '.join(listed)}")

    def view(self, keep: Callable[[T], bool] | None = None) -> Names:
        """A live tuple of the names (``keep``-filtered) that follows later registrations."""
        return Names(self, keep)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


class Names(Sequence[str]):
    """The names of a registry as a read-only sequence that is read at each use: ``OPERATORS`` and
    ``RANKING_METHODS`` keep their old spelling (``name in OPERATORS``, ``", ".join(OPERATORS)``) and include
    classes registered after import. Compares equal to the tuple of its names."""

    def __init__(self, registry: Registry[Any], keep: Callable[[Any], bool] | None = None) -> None:
        self._registry = registry
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return self._registry.names(self._keep)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[str, ...]: ...

    def __getitem__(self, i: int | slice) -> str | tuple[str, ...]:
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Names, tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._names())

    def __add__(self, other: Sequence[str]) -> tuple[str, ...]:
        return self._names() + tuple(other)

    def __repr__(self) -> str:
        return repr(self._names())
