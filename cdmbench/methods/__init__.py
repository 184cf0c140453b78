"""METHODS registry. Built-in methods register on import; installed packages add their own through the
``cdmbench.methods`` entry-point group (each entry point names a ``Method`` subclass)."""

from __future__ import annotations

from cdmbench.registry import Registry

METHODS: Registry = Registry("method", entry_point_group="cdmbench.methods")

from cdmbench.methods import cdm, dmd, dmd2, ddmd, cd, scm, rcm  # noqa: E402,F401  (register built-ins)
