"""A sample grid: rows = methods, columns = step counts, each cell the same (prompt_id, seed) samples."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cdmbench.errors import CdmbenchError
from cdmbench.reports.tables import TEACHER_METHOD

_PAD = 4
_LABEL_W = 170
_HEADER_H = 20
_LINE_H = 14


def _labels(manifest: pd.DataFrame) -> pd.Series:
    """The same row names as the tables: the method, or "method (run)" when a method has several runs."""
    runs = manifest.groupby("method")["run"].transform("nunique")
    return manifest["method"].where(runs <= 1, manifest["method"] + " (" + manifest["run"] + ")")


def choose_samples(manifest: pd.DataFrame, max_samples: int) -> list[tuple[str, int]]:
    """Up to ``max_samples`` (prompt_id, seed) keys present in the most (run, steps) cells, in key order."""
    keys = manifest.assign(key=list(zip(manifest["prompt_id"].astype(str), manifest["seed"].astype(int))))
    coverage = keys.groupby("key")[["run", "steps"]].apply(lambda g: len(g.drop_duplicates()))
    ranked = sorted(coverage.index, key=lambda k: (-coverage[k], k))
    return ranked[:max_samples]


def _tile_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        side = max(im.size)
    if side < 96:
        return side * -(-96 // side)  # an integer upscale (nearest keeps toy pixels crisp)
    return min(side, 256)


def sample_grid(
    manifest: pd.DataFrame, images_root: str | os.PathLike, out_path: str | os.PathLike, max_samples: int = 4
) -> Path:
    """Write the grid PNG for one arch's manifest rows (``MANIFEST_COLUMNS``; paths relative to ``images_root``)."""
    from PIL import Image, ImageDraw, ImageFont

    from cdmbench.io import atomic_path

    if manifest.empty:
        raise CdmbenchError("the image manifest has no rows for this grid")
    root = Path(images_root)
    m = manifest.assign(label=_labels(manifest), steps=manifest["steps"].astype(int))
    keys = choose_samples(m, max_samples)
    teacher = list(dict.fromkeys(m.loc[m["method"] == TEACHER_METHOD, "label"]))
    labels = teacher + [lb for lb in dict.fromkeys(m["label"]) if lb not in teacher]
    steps = sorted(m["steps"].unique().tolist())
    lookup = {(r.label, r.steps, str(r.prompt_id), int(r.seed)): r.path for r in m.itertuples()}
    prompts = {(str(r.prompt_id), int(r.seed)): str(r.prompt) for r in m.itertuples()}

    tile = _tile_size(root / m["path"].iloc[0])
    cell_w = len(keys) * (tile + _PAD)
    width = _LABEL_W + len(steps) * (cell_w + _PAD)
    height = _HEADER_H + len(labels) * (tile + _PAD) + _PAD + len(keys) * _LINE_H
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, s in enumerate(steps):
        draw.text((_LABEL_W + j * (cell_w + _PAD), 4), f"{s} step" if s == 1 else f"{s} steps", fill="black", font=font)
    for i, label in enumerate(labels):
        y = _HEADER_H + i * (tile + _PAD)
        draw.text((4, y + tile // 2 - 6), label[:28], fill="black", font=font)
        for j, s in enumerate(steps):
            for k, (pid, seed) in enumerate(keys):
                x = _LABEL_W + j * (cell_w + _PAD) + k * (tile + _PAD)
                rel = lookup.get((label, s, pid, seed))
                if rel is None:
                    draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=(225, 225, 225))
                    continue
                with Image.open(root / rel) as im:
                    resample = Image.NEAREST if max(im.size) < tile else Image.LANCZOS
                    canvas.paste(im.convert("RGB").resize((tile, tile), resample), (x, y))
    y0 = _HEADER_H + len(labels) * (tile + _PAD) + _PAD
    for k, key in enumerate(keys):
        text = f"{k + 1}: {prompts.get(key, '')[:90]}  [prompt {key[0]}, seed {key[1]}]"
        draw.text((4, y0 + k * _LINE_H), text, fill="black", font=font)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")
    return out_path
