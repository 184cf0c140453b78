"""BACKBONES registry. Adapter modules import their heavy libraries lazily, so listing is cheap."""

from __future__ import annotations

from cdmbench.registry import Registry

BACKBONES: Registry = Registry("backbone", entry_point_group="cdmbench.backbones")


def build_backbone(arch: str, options=None):
    """Build a registered backbone by name with ``BackboneOptions`` (defaults if None)."""
    from cdmbench.backbones.base import BackboneOptions

    return BACKBONES.get(arch)(options or BackboneOptions())


from cdmbench.backbones import toy  # noqa: E402,F401  (registers "toy")
from cdmbench.backbones import longcat, sd3  # noqa: E402,F401  (register "longcat", "sd3"; diffusers loads lazily)
