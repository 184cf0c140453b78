"""The toy's free-factor regressor: reads, from a 32×32 render and its caption, the factors the caption
leaves free.

``shapes.render`` draws, besides the four captioned attributes, seven free factors (``shapes.FACTORS``):
the centre offset x/y within the quadrant, the radius within the size class, the background shade and
the foreground colour jitter per channel, each ~U(0, 1) whatever the caption. The regressor has two
stages:

1. ``measure_factors`` — a fixed measurement of the picture: the background colour is the median of the
   quadrant diagonally opposite the caption's (which no shape reaches); a soft coverage mask is each
   pixel's position between the background and the caption's palette colour, then between the background
   and the measured foreground colour (the mean of the pixels the first mask calls inside); the centre is
   the mask's centroid within the caption's quadrant (the triangle's centroid sits 0.2 r below its centre)
   and the radius follows from its area (π r², 4 r², 2.106 r² for circle, square, triangle).
2. a per-shape affine calibration of those seven numbers, fitted by least squares on fresh real renders
   (``train_factor_regressor``); it absorbs what the measurement misses (shapes clipped by the image
   border, anti-aliasing). It ships as ``cdmbench/assets/toy_factors.safetensors``.

Trained in well under a minute on one CPU thread; rebuild with
``cdmbench toy train-evaluators --out-dir cdmbench/assets --only factors``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import torch

from cdmbench.errors import CdmbenchError
from cdmbench.toy import shapes
from cdmbench.toy.shapes import FACTORS, RESOLUTION, SHAPES

FACTORS_ASSET = "toy_factors.safetensors"
FACTORS_VERSION = "toy-factors-v1"  # bump when the measurement, calibration or targets change
HELDOUT_SEED = 99_973  # generator seed of the held-out images measured after fitting
REFERENCE_KEY = "factors-ref:"  # seed namespace of the real renders a prompt's factors are compared with
_AREA = (math.pi, 4.0, 2 * 0.65 * 1.8**2 / 2)  # area / r² per shape: circle, square, triangle (shapes.render)
_TRIANGLE_CENTROID = 0.2  # the triangle's centroid lies 0.2 r below its centre (its width grows linearly)
# Size of one unit of each target, to state held-out errors in pixels or intensity
TARGET_UNITS = {"x": 5.0, "y": 5.0, "radius": 1.0, "shade": 0.45, "jitter_r": 0.12, "jitter_g": 0.12, "jitter_b": 0.12}
UNIT_NAMES = {"x": "px", "y": "px", "radius": "px", "shade": "intensity", "jitter_r": "intensity",
              "jitter_g": "intensity", "jitter_b": "intensity"}


def _check(images: torch.Tensor, attrs: torch.Tensor) -> None:
    from cdmbench.toy.evaluators import check_images

    check_images(images)
    if tuple(attrs.shape) != (images.shape[0], 4):
        raise CdmbenchError(f"attrs must be (B, 4) = ({images.shape[0]}, 4), got {tuple(attrs.shape)}")


@torch.no_grad()
def measure_factors(images: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """(B, 7) float64 uncalibrated factor measurements (``FreeFactors.targets`` units) of images in [0, 1]
    given their captions' attribute labels (B, 4). An image with no pixel near the caption's colour reads
    as the palette colour with zero area at the quadrant's centre."""
    _check(images, attrs)
    x = images.detach().double().cpu()
    attrs = attrs.long().cpu()
    b, n = x.shape[0], RESOLUTION
    shape, color, pos, size = attrs.unbind(1)
    qx, qy = (pos % 2), (pos // 2)
    centre = torch.arange(n, dtype=torch.float64) + 0.5
    # background: median of the opposite quadrant's far 12×12 block (the shapes reach 18 px from their side)
    bg = torch.empty(b, 3, dtype=torch.float64)
    for q in range(4):
        sel = pos == q
        if sel.any():
            ox, oy = (0 if q % 2 else 20), (0 if q // 2 else 20)
            block = x[sel][:, :, oy:oy + 12, ox:ox + 12].reshape(int(sel.sum()), 3, -1)
            bg[sel] = block.median(dim=2).values
    # the caption's quadrant, widened to hold any shape it draws (centre ±2.5 px, radius ≤ 7.5 px)
    cxq = (8.0 + 16.0 * qx).double()
    cyq = (8.0 + 16.0 * qy).double()
    win = (((centre[None, :] - cxq[:, None]).abs() <= 11.0)[:, None, :]
           & ((centre[None, :] - cyq[:, None]).abs() <= 11.0)[:, :, None]).double()  # (B, 32, 32)

    def cover(fg: torch.Tensor) -> torch.Tensor:
        d = fg - bg
        proj = ((x - bg[:, :, None, None]) * d[:, :, None, None]).sum(1) / d.square().sum(1).clamp_min(1e-4)[:, None, None]
        return proj.clamp(0.0, 1.0) * win

    pal = shapes._RGB[color].double()
    inside = (cover(pal) > 0.9).double()
    count = inside.sum(dim=(1, 2))
    fg_mean = (x * inside[:, None]).sum(dim=(2, 3)) / count.clamp_min(1.0)[:, None]
    fg = torch.where(count[:, None] > 0, fg_mean, pal)
    m = cover(fg)
    area = m.sum(dim=(1, 2))
    safe = area.clamp_min(1e-9)
    cx = torch.where(area > 0, (m * centre[None, None, :]).sum(dim=(1, 2)) / safe, cxq)
    cy = torch.where(area > 0, (m * centre[None, :, None]).sum(dim=(1, 2)) / safe, cyq)
    k = torch.tensor(_AREA, dtype=torch.float64)[shape]
    r = (area / k).sqrt()
    cy = cy - torch.where(shape == SHAPES.index("triangle"), _TRIANGLE_CENTROID * r, torch.zeros_like(r))
    lo = torch.tensor([shapes._RADIUS[0][0], shapes._RADIUS[1][0]], dtype=torch.float64)[size]
    hi = torch.tensor([shapes._RADIUS[0][1], shapes._RADIUS[1][1]], dtype=torch.float64)[size]
    return torch.stack([
        (cx - cxq) / 5.0 + 0.5,
        (cy - cyq) / 5.0 + 0.5,
        (r - lo) / (hi - lo),
        (bg.mean(dim=1) - 0.05) / 0.45,
        *((fg - pal) / 0.12 + 0.5).unbind(1),
    ], dim=1)


class FactorRegressor:
    """``measure_factors`` followed by a per-shape affine calibration ``weights`` (3 shapes, 8, 7)."""

    def __init__(self, weights: torch.Tensor):
        if tuple(weights.shape) != (len(SHAPES), len(FACTORS) + 1, len(FACTORS)):
            raise CdmbenchError(f"factor calibration must be ({len(SHAPES)}, {len(FACTORS) + 1}, {len(FACTORS)}), "
                                f"got {tuple(weights.shape)}")
        self.weights = weights.double()

    def __call__(self, images: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        """(B, 7) float64 calibrated free factors of images (B, 3, 32, 32) in [0, 1] with captions' attrs (B, 4)."""
        raw = measure_factors(images, attrs)
        design = torch.cat([raw, torch.ones(raw.shape[0], 1, dtype=torch.float64)], dim=1)
        w = self.weights[attrs[:, 0].long().cpu()]  # (B, 8, 7)
        return torch.bmm(design[:, None, :], w)[:, 0, :]


def default_factors_path() -> Path:
    from cdmbench.toy.evaluators import assets_dir

    return assets_dir() / FACTORS_ASSET


def load_factor_regressor(path: str | Path | None = None) -> FactorRegressor:
    """The shipped (or given) calibration; raises MissingWeightsError when the file is absent."""
    from cdmbench.toy.evaluators import _read_safetensors, _require_file

    path = Path(path) if path is not None else default_factors_path()
    _require_file(path, "toy free-factor regressor")
    tensors, record = _read_safetensors(path)
    if record.get("version") != FACTORS_VERSION:
        raise CdmbenchError(f"{path} is free-factor regressor {record.get('version')!r}, this code reads "
                            f"{FACTORS_VERSION!r}; rebuild it")
    return FactorRegressor(tensors["weights"])


def factor_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n fresh real (images (n, 3, 32, 32), attrs (n, 4), factor targets (n, 7)) with uniform attributes."""
    attrs = shapes.random_attrs(n, generator)
    f = shapes.draw_factors(n, generator)
    return shapes.render_factors(attrs, f), attrs, f.targets().double()


def _batches(n: int, seed: int, chunk: int = 512):
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, n, chunk):
        yield factor_batch(min(chunk, n - lo), g)


def heldout_errors(model: FactorRegressor, n: int, seed: int = HELDOUT_SEED) -> dict[str, dict]:
    """Per factor on n fresh real images: mean absolute error in the factor's units (px or intensity), R²."""
    pred, target = [], []
    for images, attrs, t in _batches(n, seed):
        pred.append(model(images, attrs))
        target.append(t)
    pred, target = torch.cat(pred), torch.cat(target)
    out = {}
    for i, name in enumerate(FACTORS):
        err = pred[:, i] - target[:, i]
        r2 = 1.0 - float(err.square().mean() / target[:, i].var(unbiased=False))
        out[name] = {"mae": round(float(err.abs().mean()) * TARGET_UNITS[name], 4), "unit": UNIT_NAMES[name],
                     "r2": round(r2, 4)}
    return out


def train_factor_regressor(
    out: str | Path,
    n: int = 12_288,  # fresh real renders the calibration is fitted on
    seed: int = 0,  # data stream
    ridge: float = 1e-6,  # L2 penalty of the least-squares fit (numerical safety only)
    heldout: int = 4096,  # fresh real images on which the final errors are measured
    progress: bool = True,
) -> dict:
    """Fit and save the per-shape calibration of ``measure_factors``; returns the record in the file metadata."""
    from cdmbench.io import save_safetensors
    from cdmbench.toy.evaluators import METADATA_KEY

    t0 = time.time()
    raws, attrs_all, targets = [], [], []
    for images, attrs, t in _batches(n, seed):
        raws.append(measure_factors(images, attrs))
        attrs_all.append(attrs)
        targets.append(t)
    raw, attrs, target = torch.cat(raws), torch.cat(attrs_all), torch.cat(targets)
    design = torch.cat([raw, torch.ones(raw.shape[0], 1, dtype=torch.float64)], dim=1)
    weights = torch.zeros(len(SHAPES), design.shape[1], len(FACTORS), dtype=torch.float64)
    for s in range(len(SHAPES)):
        a, y = design[attrs[:, 0] == s], target[attrs[:, 0] == s]
        weights[s] = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y)
    model = FactorRegressor(weights)
    fit_minutes = (time.time() - t0) / 60
    uncalibrated = FactorRegressor(torch.cat([torch.eye(len(FACTORS)), torch.zeros(1, len(FACTORS))])
                                   .double().expand(len(SHAPES), -1, -1).clone())
    record = {
        "version": FACTORS_VERSION, "factors": list(FACTORS), "n": n, "seed": seed, "ridge": ridge,
        "train_minutes": round(fit_minutes, 2), "heldout_n": heldout, "heldout": heldout_errors(model, heldout),
        "heldout_uncalibrated": heldout_errors(uncalibrated, heldout), "data": shapes.DATA_VERSION,
        "torch": torch.__version__,
    }
    if progress:
        print(f"toy factor regressor: fitted on {n} renders in {fit_minutes:.1f} min")
    save_safetensors({"weights": weights.float()}, out, metadata={METADATA_KEY: json.dumps(record)})
    return record




REFERENCE_SEEDS = 32  # real renders per prompt behind the free-factor and detail references


@functools.lru_cache(maxsize=512)
def reference_renders(caption: str, attrs: tuple[int, int, int, int], n: int = REFERENCE_SEEDS) -> torch.Tensor:
    """n real renders of one caption (seeds 0..n-1 in the ``REFERENCE_KEY`` namespace of the caption), cached:
    (n, 3, 32, 32). Keyed by caption text, so the same caption gets the same reference in every eval."""
    from cdmbench.seeding import sample_seed

    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(sample_seed(REFERENCE_KEY + caption, s))
        out.append(shapes.render(torch.tensor([attrs]), g)[0])
    return torch.stack(out)


@functools.lru_cache(maxsize=1)
def reference_scales(n: int = 4096, seed: int = HELDOUT_SEED + 1) -> torch.Tensor:
    """(7,) spread of each free factor: the std of the shipped regressor's reading of n random real renders."""
    model = load_factor_regressor()
    preds = [model(images, attrs) for images, attrs, _ in _batches(n, seed)]
    return torch.cat(preds).std(dim=0)


# ----------------------------------------------------------------------------------------------------
# What the toy backbone declares to the eval layer (``ToyBackbone.evaluators``)


def reference_images(device: str = "cpu"):
    """Real renders of a caption (``reference_renders``, keyed by the caption and its attribute labels),
    for the metrics that compare with real images of the same prompt (PRDC, detail, factor_w1)."""
    from cdmbench.eval.metrics.sets import ReferenceImages
    from cdmbench.types import ATTRS

    def render(prompt, n: int) -> torch.Tensor:
        attrs = prompt.meta.get(ATTRS)
        if attrs is None:
            raise CdmbenchError(f"real toy renders need the prompt's attribute labels (meta[{ATTRS!r}]): {prompt.text!r}")
        return reference_renders(prompt.text, tuple(int(a) for a in attrs), n)

    return ReferenceImages(render, REFERENCE_SEEDS, "real-renders")


def factor_model(device: str = "cpu"):
    """The shipped free-factor regressor (``FactorRegressor``) with the factors' spread over real renders."""
    from cdmbench.eval.metrics.factor_coverage import FactorModel

    model = load_factor_regressor()
    return FactorModel(model, reference_scales().numpy(), FACTORS_VERSION)
