"""The toy's free-factor regressor: reads, from a 32×32 render, the factors its caption leaves free.

``shapes.render`` draws, besides the four captioned attributes, seven free factors (``shapes.FACTORS``):
the centre offset x/y within the quadrant, the radius within the size class, the background shade and
the foreground colour jitter per channel, each U(0, 1) whatever the caption. ``FactorRegressor`` predicts
them (``FreeFactors.targets`` units), so the free-factor coverage metric can compare their distribution
over a prompt's seeds with real renders of the same caption (``real_factor_reference``).

The regressor is trained here from a seed on fresh procedural batches (MSE) and ships as
``cdmbench/assets/toy_factors.safetensors``; rebuild it with
``cdmbench toy train-evaluators --out-dir cdmbench/assets --only factors`` (see EVALUATORS.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdmbench.toy import shapes
from cdmbench.toy.shapes import FACTORS, RESOLUTION

FACTORS_ASSET = "toy_factors.safetensors"
FACTORS_VERSION = "toy-factors-v1"  # bump when the targets, architecture or preprocessing change
HELDOUT_SEED = 99_973  # stream seed of the held-out images measured after training
REFERENCE_KEY = "factors-ref:"  # seed namespace of the real renders a prompt's factors are compared with
# Units of each target, for the README's held-out errors: pixels for centre and radius, intensity in [0, 1]
# for the shade (the mean background level) and the colour jitter.
TARGET_UNITS = {"x": 5.0, "y": 5.0, "radius": 1.0, "shade": 0.45, "jitter_r": 0.12, "jitter_g": 0.12, "jitter_b": 0.12}
UNIT_NAMES = {"x": "px", "y": "px", "radius": "px", "shade": "intensity", "jitter_r": "intensity",
              "jitter_g": "intensity", "jitter_b": "intensity"}


class FactorRegressor(nn.Module):
    """CNN over (B, 3, 32, 32) images in [0, 1] plus two coordinate channels (CoordConv, Liu et al. 2018,
    which makes exact positions linearly readable) → (B, 7) free factors ordered as ``shapes.FACTORS``."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = self.width = width
        self.net = nn.Sequential(
            nn.Conv2d(5, w, 3, padding=1), nn.ReLU(),  # 32×32
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 16×16
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 8×8
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # 4×4
            nn.Flatten(),
            nn.Linear(4 * w * 16, 128), nn.ReLU(),
            nn.Linear(128, len(FACTORS)),
        )
        c = (torch.arange(RESOLUTION, dtype=torch.float32) + 0.5) / RESOLUTION * 2 - 1
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * 2 - 1
        return self.net(torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1))

    def arch(self) -> dict:
        return {"width": self.width}


def default_factors_path() -> Path:
    from cdmbench.toy.evaluators import assets_dir

    return assets_dir() / FACTORS_ASSET


def load_factor_regressor(path: str | Path | None = None) -> FactorRegressor:
    """The trained regressor in eval mode with frozen parameters; None = the shipped asset.

    Raises:
        MissingWeightsError: the file does not exist.
    """
    from cdmbench.toy.evaluators import _read_safetensors, _require_file

    path = Path(path) if path is not None else default_factors_path()
    _require_file(path, "toy free-factor regressor weights")
    tensors, record = _read_safetensors(path)
    model = FactorRegressor(**record.get("arch", {}))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict_factors(model: FactorRegressor, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(B, 7) float64 predicted free factors of images in [0, 1]."""
    from cdmbench.toy.evaluators import check_images

    check_images(images)
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)])


def factor_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh real (images (n, 3, 32, 32), factor targets (n, 7)) with uniform attributes."""
    attrs = shapes.random_attrs(n, generator)
    f = shapes.draw_factors(n, generator)
    return shapes.render_factors(attrs, f), f.targets()


def real_factor_reference(prompts, seeds) -> torch.Tensor:
    """Real renders of every (prompt, seed), deterministic per pair, in a seed namespace of their own
    (``REFERENCE_KEY``): (len(prompts) * len(seeds), 3, 32, 32), prompt-major."""
    from cdmbench.seeding import sample_seed

    imgs = []
    for p in prompts:
        for s in seeds:
            g = torch.Generator().manual_seed(sample_seed(REFERENCE_KEY + p.id, s))
            imgs.append(shapes.render(torch.tensor([p.attrs]), g)[0])
    return torch.stack(imgs)


def heldout_errors(model: FactorRegressor, n: int, seed: int = HELDOUT_SEED) -> dict[str, dict[str, float]]:
    """Per factor on n fresh real images: mean absolute error in the factor's units (px or intensity) and R²."""
    images, target = factor_batch(n, torch.Generator().manual_seed(seed))
    pred = predict_factors(model, images).float()
    out = {}
    for i, name in enumerate(FACTORS):
        err = (pred[:, i] - target[:, i])
        r2 = 1.0 - float(err.square().mean() / target[:, i].var(unbiased=False))
        out[name] = {"mae": round(float(err.abs().mean()) * TARGET_UNITS[name], 4), "unit": UNIT_NAMES[name],
                     "r2": round(r2, 4)}
    return out


def train_factor_regressor(
    out: str | Path,
    steps: int = 2000,  # optimizer steps
    seed: int = 0,  # model init and data stream
    batch_size: int = 128,
    lr: float = 2e-3,  # AdamW peak learning rate (100-step warmup, cosine decay to 5 %)
    width: int = 32,  # channels of the first conv; the trunk goes w → 2w → 2w → 4w
    heldout: int = 2048,  # fresh real images on which the final errors are measured
    progress: bool = True,
) -> dict:
    """Train and save the free-factor regressor (MSE on ``FreeFactors.targets``); returns its record."""
    from cdmbench.io import save_safetensors
    from cdmbench.toy.evaluators import METADATA_KEY
    from cdmbench.toy.train_evaluators import _train_loop

    torch.manual_seed(seed)
    model = FactorRegressor(width=width).train()
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        images, target = factor_batch(batch_size, g)
        return F.mse_loss(model(images), target)

    t0 = time.time()
    losses = _train_loop("toy factor regressor", list(model.parameters()), loss_fn, steps, lr, 1e-4, 100, progress)
    minutes = (time.time() - t0) / 60
    model.eval()
    record = {
        "version": FACTORS_VERSION, "arch": model.arch(), "factors": list(FACTORS), "steps": steps, "seed": seed,
        "batch_size": batch_size, "lr": lr, "train_minutes": round(minutes, 2),
        "final_loss": round(float(np.mean(losses[-100:])), 6), "heldout_n": heldout,
        "heldout": heldout_errors(model, heldout), "data": shapes.DATA_VERSION, "torch": torch.__version__,
    }
    save_safetensors(model.state_dict(), out, metadata={METADATA_KEY: json.dumps(record)})
    return record
