"""Name → object registries with "did you mean" errors.

Configs name methods and networks by string; a typo must fail with the closest valid names rather than a
``KeyError`` (MONAI's ``look_up_option`` does the same).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from volsynth.errors import VolsynthError

T = TypeVar("T")


def suggest(name: str, options: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return a ``" Did you mean 'x'?"`` suffix for ``name`` among ``options`` (empty when nothing is close)."""
    close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class UnknownNameError(VolsynthError, KeyError, ValueError):
    """An unknown registry name; the message lists the known names and the closest match."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of objects, filled with the :meth:`register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownNameError(
                f"Unknown {self.kind} '{name}'.{suggest(name, list(self._entries))} Known {self.kind}s: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
