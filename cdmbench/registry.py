"""Explicit name → object registries with a `register` decorator (style.md principle 5)."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Callable, Generic, Iterator, TypeVar

from cdmbench.errors import CdmbenchError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named entries.

    Args:
        kind: what the entries are ("method", "backbone", "metric"); used in error messages.
        entry_point_group: optional importlib entry-point group through which installed
            packages add entries (each entry point loads an object registered under its name).
            A plug-in that fails to load is skipped with one warning line on stderr naming it
            (``broken()`` lists them); the built-ins and every other plug-in keep working.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._plugins: set[str] = set()
        self._broken: dict[str, str] = {}  # plug-in name -> why it was skipped
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("cdm") class CDM(Method): ...``."""

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise CdmbenchError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            try:
                obj.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        try:
            eps = list(metadata.entry_points(group=self.entry_point_group))
        except Exception as e:  # a corrupt installed distribution's metadata
            self._warn("*", f"cannot read the {self.entry_point_group!r} entry points", e)
            return
        for ep in eps:
            if ep.name in self._entries:
                continue
            try:  # a broken plug-in must not break the built-ins
                obj = ep.load()
                if ep.name not in self._entries:
                    self.register(ep.name)(obj)
            except Exception as e:
                self._warn(ep.name, f"{self.kind} plug-in {ep.name!r} ({ep.value})", e)
                continue
            self._plugins.add(ep.name)

    def _warn(self, name: str, what: str, error: BaseException) -> None:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
        self._broken[name] = reason
        print(f"warning: skipping {what}: {reason}", file=sys.stderr)

    def broken(self) -> dict[str, str]:
        """Plug-ins of this registry that failed to load: name -> the error, one line."""
        self._load_entry_points()
        return dict(self._broken)

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def is_plugin(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._plugins

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self.get(n)) for n in self.names()]
