"""The generation phase: (row source, steps, prompts × seeds) → PNG files plus an append-only manifest.

``generate_source`` runs every plan of one source (``cdmbench.eval.sources``) over its missing samples;
the harness calls it once per source and nothing here calls back into the harness.

A sample's identity is (prompt id, seed) (style.md principle 8; EDM ``generate.py``): its initial noise
comes from its own generator, so it is the same at any batch size, on any shard, for every method and
step count. The phase is resumable: an image whose manifest line (same weights hash, σ grid, CFG and
prompt) and file are both present is never generated again. A PNG is written atomically before its
manifest line, so a kill at any point leaves at worst one image to redo.

Layout under the eval folder ``OUT``::

    OUT/images/<run>/<steps>/<prompt_id>_s<seed>.png
    OUT/manifest.jsonl        one JSON line per generated image; the last line of a path wins
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.eval.sources import Plan, Sampler
from cdmbench.io import atomic_path
from cdmbench.seeding import StackedGenerator
from cdmbench.types import Prompt

MANIFEST = "manifest.jsonl"
IMAGES = "images"


OnImage = Callable[[dict], None]  # called with each new manifest record, after it is written


def image_relpath(run: str, steps: int, prompt_id: str, seed: int) -> str:
    """Where an image lives, relative to the eval folder."""
    return f"{IMAGES}/{run}/{steps}/{prompt_id}_s{seed}.png"


def shard(items: Sequence, process_index: int, num_processes: int) -> list:
    """Items ``process_index``, ``process_index + num_processes``, ... (a split by index)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise CdmbenchError(f"process_index must be in [0, num_processes), got {process_index} of {num_processes}")
    return list(items[process_index::num_processes])


# --------------------------------------------------------------------------------------------------
# The manifest


class Manifest:
    """Append-only JSON lines; appends from several processes are serialised by an advisory lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> dict[str, dict]:
        """Image path → its last record. A torn final line (a kill during a write) is ignored."""
        if not self.path.is_file():
            return {}
        text = self.path.read_text()
        lines = text.split("\n")
        out: dict[str, dict] = {}
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # no trailing newline: the write was cut short
                    continue
                raise CdmbenchError(f"image manifest {self.path} line {i + 1} is not valid JSON ({e.msg}); "
                                    f"delete the eval folder's manifest and images to regenerate") from e
            out[record["path"]] = record
        return out

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if f.tell() > 0:  # a torn line from a killed writer must not swallow this one
                    with open(self.path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            f.write("\n")
                f.write(line)
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def is_cached(record: dict | None, plan: Plan, prompt: Prompt, out: Path) -> bool:
    """Whether ``record`` is this image under ``plan`` (same weights, σ grid, CFG, prompt) and its file exists."""
    return (
        record is not None
        and record.get("checkpoint") == plan.checkpoint
        and record.get("sigmas_effective") == list(plan.sigmas_effective)
        and record.get("guidance") == plan.guidance
        and record.get("nfe") == plan.nfe
        and record.get("prompt") == prompt.text
        and (out / record["path"]).is_file()
    )


# --------------------------------------------------------------------------------------------------
# Images on disk


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] → (B, H, W, 3) uint8, rounded the way the metrics quantise."""
    from cdmbench.eval.metrics.base import to_uint8_hwc

    return to_uint8_hwc(images)


def pixels_sha256(pixels: np.ndarray) -> str:
    """Hash of an image's pixels (H, W, 3) uint8, independent of the PNG encoder."""
    h = hashlib.sha256(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def read_pngs(paths: Sequence[Path]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1] from PNG files (all of one size)."""
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CdmbenchError(f"images of one row have different sizes {sorted(shapes)}: {paths[0].parent}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


# --------------------------------------------------------------------------------------------------
# The loop


def batched(items: Sequence, size: int) -> Iterator[list]:
    for lo in range(0, len(items), size):
        yield list(items[lo:lo + size])


def missing_items(plan: Plan, items: Sequence[tuple[Prompt, int]], records: dict[str, dict], out: Path) -> list:
    """The (prompt, seed) items of ``plan`` that are not in the cache."""
    return [(p, s) for p, s in items
            if not is_cached(records.get(image_relpath(plan.run, plan.steps, p.id, s)), plan, p, out)]


@torch.no_grad()
def generate_images(
    sampler: Sampler,
    plan: Plan,
    backbone,
    todo: Sequence[tuple[Prompt, int]],
    out: Path,
    manifest: Manifest,
    *,
    batch_size: int,
    process_index: int = 0,
    on_image: OnImage | None = None,
    advance: Callable[[int], None] | None = None,
) -> int:
    """Generate ``todo`` (prompt, seed) items of ``plan`` in batches; returns how many were written.

    Each batch draws per-sample noise from ``StackedGenerator.for_samples([(prompt_id, seed), ...])`` and
    passes the same generator to the sampler (stochastic samplers re-noise from it), then decodes,
    writes each PNG atomically and appends its manifest line.
    """
    written = 0
    for chunk in batched(todo, batch_size):
        rng = StackedGenerator.for_samples([(p.id, s) for p, s in chunk])
        noise = rng.randn(tuple(backbone.latent_shape), device=backbone.device)
        cond = backbone.encode_prompts([p.text for p, _ in chunk])
        pixels = to_uint8(backbone.decode(sampler.sample(noise, cond, plan.steps, rng)))
        for (prompt, seed), px in zip(chunk, pixels):
            rel = image_relpath(plan.run, plan.steps, prompt.id, seed)
            write_png(out / rel, px)
            record = {
                "run": plan.run, "method": plan.method, "arch": plan.arch, "checkpoint": plan.checkpoint,
                "checkpoint_label": plan.checkpoint_label, "steps": plan.steps,
                "sigmas_nominal": list(plan.sigmas_nominal), "sigmas_effective": list(plan.sigmas_effective),
                "guidance": plan.guidance, "nfe": plan.nfe, "prompt_id": prompt.id, "prompt": prompt.text,
                "seed": seed, "resolution": f"{px.shape[1]}x{px.shape[0]}", "path": rel,
                "pixels_sha256": pixels_sha256(px), "process_index": process_index,
                "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            manifest.append(record)
            written += 1
            if advance is not None:
                advance(1)
            if on_image is not None:
                on_image(record)
    return written


def generate_source(
    sampler: Sampler,
    plans: Sequence[Plan],
    backbone,
    items: Sequence[tuple[Prompt, int]],
    out: Path,
    manifest: Manifest,
    records: dict[str, dict],
    *,
    batch_size: int,
    process_index: int = 0,
    on_image: OnImage | None = None,
    progress=None,
) -> int:
    """Generate the missing ``items`` of every runnable plan of one source; returns how many were written.

    Args:
        records: the manifest as read before this phase (image path → record), for the cache check.
        progress: a ``rich.progress.Progress`` to add one task per plan to, or None.
    """
    written = 0
    for plan in plans:
        if plan.skipped:
            continue
        todo = missing_items(plan, items, records, out)
        if not todo:
            continue
        advance = None
        if progress is not None:
            task = progress.add_task(f"generate {plan.run} @ {plan.steps} steps", total=len(todo))
            advance = lambda k, t=task: progress.advance(t, k)  # noqa: E731
        written += generate_images(sampler, plan, backbone, todo, out, manifest, batch_size=batch_size,
                                   process_index=process_index, on_image=on_image, advance=advance)
    return written
