"""Procedural, seeded, infinite "shapes" data: a coloured shape on a background, with a caption.

The caption names four attributes (shape, colour, quadrant, size class). Attributes the caption does
NOT name vary freely: exact centre within the quadrant, exact size within its class, background shade
and tint, and a small colour jitter (``FreeFactors``, drawn by ``draw_factors``). A generator that
collapses onto one mode of those is measurably worse (toy FID, free-factor coverage) than one that
covers them.

Everything is deterministic given a ``torch.Generator``; images are float32 in [0, 1], (B, 3, 32, 32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from cdmbench.errors import CdmbenchError
from cdmbench.types import ATTRS, Prompt

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
ATTRIBUTES = ("shape", "color", "position", "size")
NUM_CLASSES = {"shape": len(SHAPES), "color": len(COLORS), "position": len(POSITIONS), "size": len(SIZES)}

_RGB = torch.tensor([[0.86, 0.16, 0.16], [0.16, 0.71, 0.24], [0.16, 0.31, 0.86], [0.90, 0.82, 0.16]])
# Pixel radius range per size class (small, large). A square's half-width equals its radius, so its
# corners stand 0.41·r (1.6-3.1 px) outside the circle of the same radius: "shapes-v1" drew squares
# 0.85·r wide, whose outline differed from a circle's by about one pixel and no toy teacher resolved it.
_RADIUS = ((4.0, 5.0), (6.5, 7.5))
DATA_VERSION = "shapes-v2"
_TEMPLATES = (
    "a {size} {color} {shape} in the {position}",
    "{size} {color} {shape} {position}",
    "a {color} {shape} at the {position} {size}",
)
VOCAB = sorted(
    {w for t in _TEMPLATES for w in re.findall(r"[a-z]+", t.format(size="", color="", shape="", position=""))}
    | set(SHAPES) | set(COLORS) | set(SIZES) | {w for p in POSITIONS for w in p.split()}
)


def caption(attrs: tuple[int, int, int, int] | torch.Tensor, template: int = 0) -> str:
    s, c, p, z = (int(a) for a in attrs)
    return _TEMPLATES[template].format(shape=SHAPES[s], color=COLORS[c], position=POSITIONS[p], size=SIZES[z])


def parse_caption(text: str) -> tuple[int, int, int, int]:
    """Attribute labels named by a caption of the grammar; raises on a caption outside it."""
    words = re.findall(r"[a-z]+", text.lower())

    def find(names: tuple[str, ...], what: str) -> int:
        hits = [i for i, n in enumerate(names) if all(w in words for w in n.split())]
        if len(hits) != 1:
            raise CdmbenchError(f"caption {text!r} does not name exactly one {what} of {', '.join(names)}")
        return hits[0]

    return find(SHAPES, "shape"), find(COLORS, "color"), find(POSITIONS, "position"), find(SIZES, "size")


def random_attrs(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) int64 attribute labels, uniform over every class."""
    return torch.stack([torch.randint(NUM_CLASSES[a], (n,), generator=generator) for a in ATTRIBUTES], dim=1)


FACTORS = ("x", "y", "radius", "shade", "jitter_r", "jitter_g", "jitter_b")  # free factors, each ~U(0, 1)


@dataclass(frozen=True)
class FreeFactors:
    """The uniform draws behind the attributes a caption leaves free, for a batch of B images.

    ``x``, ``y``: centre offset within the quadrant (0 → −2.5 px, 1 → +2.5 px); ``radius``: position
    within the size class's radius range; ``shade`` (B, 1): background grey level; ``tint`` (B, 3):
    background tint; ``jitter`` (B, 3): foreground colour jitter per channel (0 → −0.06, 1 → +0.06).
    Every entry is U(0, 1), independent of the caption.
    """

    radius: torch.Tensor  # (B,)
    x: torch.Tensor  # (B,)
    y: torch.Tensor  # (B,)
    shade: torch.Tensor  # (B, 1)
    tint: torch.Tensor  # (B, 3)
    jitter: torch.Tensor  # (B, 3)

    def targets(self) -> torch.Tensor:
        """(B, 7) float32 regression targets ordered as ``FACTORS``. ``shade`` is the observable mean
        background level rescaled to ~[0, 1] ((mean_c bg_c − 0.05) / 0.45), which folds in the tint."""
        bg = 0.05 + 0.45 * self.shade + (self.tint - 0.5) * 0.1
        shade = (bg.mean(dim=1) - 0.05) / 0.45
        return torch.stack([self.x, self.y, self.radius, shade, *self.jitter.unbind(1)], dim=1).float()


def draw_factors(b: int, generator: torch.Generator) -> FreeFactors:
    """The free factors of b images, drawn from ``generator`` in the order ``render`` consumes them."""
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    return FreeFactors(radius=u(b), x=u(b), y=u(b), shade=u(b, 1), tint=u(b, 3), jitter=u(b, 3))


def render(attrs: torch.Tensor, generator: torch.Generator, supersample: int = 4) -> torch.Tensor:
    """Render (B, 4) attribute labels into (B, 3, 32, 32) images in [0, 1] (anti-aliased)."""
    attrs = torch.as_tensor(attrs, dtype=torch.long).reshape(-1, 4)
    return render_factors(attrs, draw_factors(attrs.shape[0], generator), supersample)


def render_factors(attrs: torch.Tensor, f: FreeFactors, supersample: int = 4) -> torch.Tensor:
    """Render (B, 4) attribute labels with given free factors into (B, 3, 32, 32) images in [0, 1]."""
    attrs = torch.as_tensor(attrs, dtype=torch.long).reshape(-1, 4)
    b, r = attrs.shape[0], RESOLUTION
    shape, color, pos, size = attrs.unbind(1)
    lo = torch.tensor([_RADIUS[0][0], _RADIUS[1][0]])[size]
    hi = torch.tensor([_RADIUS[0][1], _RADIUS[1][1]])[size]
    radius = lo + (hi - lo) * f.radius
    # quadrant centre (8, 8) / (24, 8) / ... jittered by up to ±2.5 px
    cx = 8.0 + 16.0 * (pos % 2).float() + (f.x - 0.5) * 5.0
    cy = 8.0 + 16.0 * (pos // 2).float() + (f.y - 0.5) * 5.0
    bg = 0.05 + 0.45 * f.shade + (f.tint - 0.5) * 0.1  # grey shade plus a slight tint
    fg = (_RGB[color] + (f.jitter - 0.5) * 0.12).clamp(0, 1)

    n = r * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    rr = radius[:, None, None]
    circle = dx**2 + dy**2 <= rr**2
    square = (dx.abs() <= rr) & (dy.abs() <= rr)
    triangle = (dy >= -rr) & (dy <= 0.8 * rr) & (dx.abs() <= (dy + rr) * 0.65)
    masks = torch.stack([circle, square, triangle], 1).float()  # (B, 3 shapes, n, n)
    mask = masks[torch.arange(b), shape]
    cover = torch.nn.functional.avg_pool2d(mask[:, None], supersample)  # (B, 1, 32, 32)
    img = bg[:, :, None, None] * (1 - cover) + fg[:, :, None, None] * cover
    return img.clamp(0, 1)


class ShapesStream:
    """An infinite, seeded stream of (images, captions, attrs) batches; caption templates vary."""

    def __init__(self, seed: int, batch_size: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        attrs = random_attrs(self.batch_size, self.generator)
        templates = torch.randint(len(_TEMPLATES), (self.batch_size,), generator=self.generator)
        images = render(attrs, self.generator)
        caps = [caption(a, int(t)) for a, t in zip(attrs, templates)]
        return images, caps, attrs


def random_captions(n: int, generator: torch.Generator) -> list[str]:
    """Training prompts for data-free distillation: captions of random attributes and templates."""
    attrs = random_attrs(n, generator)
    templates = torch.randint(len(_TEMPLATES), (n,), generator=generator)
    return [caption(a, int(t)) for a, t in zip(attrs, templates)]


PROMPT_SET_VERSION = "toy-v1"


def eval_prompts() -> list[Prompt]:
    """The fixed, versioned toy prompt set: every attribute combination once, template 0 (96 prompts), each
    with its attribute labels in ``meta[ATTRS]``."""
    out = []
    for s in range(len(SHAPES)):
        for c in range(len(COLORS)):
            for p in range(len(POSITIONS)):
                for z in range(len(SIZES)):
                    a = (s, c, p, z)
                    out.append(Prompt(f"{PROMPT_SET_VERSION}-{len(out):03d}", caption(a), {ATTRS: a}))
    return out


def real_images_for(prompts: list[Prompt], seeds: list[int]) -> torch.Tensor:
    """Real procedural images for (prompt, seed) pairs, deterministic per pair (reference sets)."""
    from cdmbench.seeding import sample_seed

    imgs = []
    for p in prompts:
        for s in seeds:
            g = torch.Generator().manual_seed(sample_seed("real:" + p.id, s))
            imgs.append(render(torch.tensor([p.meta[ATTRS]]), g)[0])
    return torch.stack(imgs)
