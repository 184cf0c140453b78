"""Session fixtures for the tiny SD3 and LongCat-Image pipelines (each backbone's ``build_tiny_pipeline``).

Tests load them back through the adapters with ``BackboneOptions(model=<folder>)``, the same
``from_pretrained`` path a hub id takes. Built once per session (< 1 s each, ~1 MB).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cdmbench.backbones.diffusers import TINY_RESOLUTION, TINY_TEXT_LEN
from cdmbench.backbones.longcat import LongCatBackbone
from cdmbench.backbones.sd3 import SD3Backbone

SD3_RES = TINY_RESOLUTION  # pixels: VAE ×2, patch 2 → 8×8 = 64 image tokens
LONGCAT_RES = TINY_RESOLUTION  # pixels: VAE ×2, 2×2 packing → 8×8 = 64 image tokens
TEXT_LEN = TINY_TEXT_LEN  # T5 / Qwen tokens used by most tests (the real defaults are 256 / 512)


def with_scheduler(src: Path, dst: Path, **overrides) -> Path:
    """A copy of a pipeline folder whose scheduler config has ``overrides``."""
    shutil.copytree(src, dst)
    cfg_path = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(overrides)
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    return SD3Backbone.tiny_pipeline(tmp_path_factory.mktemp("tiny"))  # shared with the contract tests' SD3Backbone.tiny


@pytest.fixture(scope="session")
def tiny_longcat_dir(tmp_path_factory) -> Path:
    return LongCatBackbone.tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int = 1, only: str | None = None) -> torch.nn.Module:
    """Add seeded noise to the trainable weights (those whose name contains ``only``): a stand-in student."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return net
