"""The generation phase: (row source, steps, prompts × seeds) → PNG files plus an append-only manifest.

``generate_source`` runs every plan of one source (``cdmbench.eval.sources``) over its missing samples;
the harness calls it once per source and nothing here calls back into the harness.

A sample's identity is (prompt id, seed) (style.md principle 8; EDM ``generate.py``): its initial noise
comes from its own generator, so it is the same at any batch size, on any shard, for every method and
step count. The phase is resumable: an image whose manifest line (same weights hash, σ grid, CFG and
prompt) and file are both present is never generated again. A batch's PNGs are written atomically before
its manifest lines (appended at once), so a kill at any point leaves at worst one batch to redo.

Layout under the eval folder ``OUT``::

    OUT/images/<run>/<steps>/<prompt_id>_s<seed>.png
    OUT/manifest.jsonl        one JSON line per generated image; the last line of a path wins
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cdmbench.errors import CdmbenchError, CorruptStateError
from cdmbench.eval.sources import Plan, Sampler
from cdmbench.io import atomic_path, locked
from cdmbench.seeding import StackedGenerator
from cdmbench.types import Prompt

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
IMAGES = "images"


OnImage = Callable[[dict], None]  # called with each new manifest record, after it is written


def image_relpath(run: str, steps: int, prompt_id: str, seed: int) -> str:
    """Where an image lives, relative to the eval folder."""
    return f"{IMAGES}/{run}/{steps}/{prompt_id}_s{seed}.png"


def process_share(device: str | None):
    """(process_index, num_processes, wait_for_everyone, device): accelerate's PartialState under a
    multi-process launch (each process on its own accelerator), else one process (accelerate not imported)."""
    from cdmbench.accel import select_device

    device = select_device(device)  # None: accelerate's device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, lambda: None, device
    from accelerate import PartialState

    cpu = torch.device(device).type == "cpu"
    state = PartialState(cpu=cpu)  # without cpu=True accelerate ignores a CPU multi-process launch
    if state.num_processes != world:
        raise CdmbenchError(f"WORLD_SIZE={world} but accelerate sees {state.num_processes} process(es); "
                            f"launch with `accelerate launch` or `torchrun`")
    return state.process_index, state.num_processes, state.wait_for_everyone, device if cpu else str(state.device)


def shard(items: Sequence, process_index: int, num_processes: int) -> list:
    """Items ``process_index``, ``process_index + num_processes``, ... (a split by index)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise CdmbenchError(f"process_index must be in [0, num_processes), got {process_index} of {num_processes}")
    return list(items[process_index::num_processes])


# --------------------------------------------------------------------------------------------------
# The manifest


class Manifest:
    """Append-only JSON lines; appends from several processes are serialised by an advisory lock.

    ``read`` parses only what was appended since its last call (a bench's manifest holds ~100k lines and is
    read once per plan); a file that shrank or was replaced is read again from the start."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        self._at: tuple[int, int, int] | None = None  # (inode, byte offset past the last complete line, lines)

    def read(self) -> dict[str, dict]:
        """Image path → its last record (a copy).

        A line that is not a JSON record with a ``path`` (torn by a kill, or damaged) is skipped with one
        warning: its image counts as missing and is generated again. A torn *final* line is an append in
        progress (or cut short): it is skipped silently and parsed once its newline is there.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._records, self._at = {}, None
            return {}
        except OSError as e:
            raise CorruptStateError(f"cannot read image manifest {self.path} ({e})") from None
        if self._at is None or self._at[0] != st.st_ino or st.st_size < self._at[1]:
            self._records, self._at = {}, (st.st_ino, 0, 0)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._at[1])
                chunk = f.read()
        except OSError as e:
            raise CorruptStateError(f"cannot read image manifest {self.path} ({e})") from None
        complete = chunk.rfind(b"\n") + 1  # the final line without a newline is a write in progress
        bad: list[int] = []
        lines = chunk[:complete].decode("utf-8", errors="replace").split("\n")[:-1]
        for i, line in enumerate(lines, start=self._at[2]):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                    raise ValueError("not a record")
            except ValueError:
                bad.append(i + 1)
                continue
            self._records[record["path"]] = record
        self._at = (self._at[0], self._at[1] + complete, self._at[2] + len(lines))
        if bad:
            logger.warning("image manifest %s: ignoring %d unreadable line(s) (line %s); their images are "
                           "generated again", self.path, len(bad), ", ".join(map(str, bad[:5])))
        return dict(self._records)

    def append(self, record: dict) -> None:
        self.append_many([record])

    def append_many(self, records: Sequence[dict]) -> None:
        """Append records under one lock and one fsync (a generation batch's images)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        with open(self.path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                _drop_torn_tail(self.path, f)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _drop_torn_tail(path: Path, f) -> None:
    """Under the append lock: cut a final line that a killed writer left without its newline (repair)."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return
    with open(path, "rb") as r:
        r.seek(max(0, size - (1 << 20)))
        tail = r.read()
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= (1 << 20) else size)
    if keep != size:
        logger.warning("image manifest %s: dropping a line torn by an interrupted write", path)
        os.truncate(path, keep)
        f.seek(0, os.SEEK_END)


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
    writes each PNG atomically and appends the batch's manifest lines at once (a kill leaves at worst one
    batch's images without their lines: they are generated again).
    """
    written = 0
    for chunk in batched(todo, batch_size):
        rng = StackedGenerator.for_samples([(p.id, s) for p, s in chunk])
        noise = rng.randn(tuple(backbone.latent_shape), device=backbone.device)
        cond = backbone.encode_prompts([p.text for p, _ in chunk])
        pixels = to_uint8(backbone.decode(sampler.sample(noise, cond, plan.steps, rng)))
        records = []
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
            records.append(record)
        manifest.append_many(records)  # one lock and fsync per batch
        written += len(records)
        if advance is not None:
            advance(len(records))
        for record in records if on_image is not None else ():
            on_image(record)
    return written


def generate_source(
    sampler: Sampler,
    plans: Sequence[Plan],
    backbone,
    items: Sequence[tuple[Prompt, int]],
    out: Path,
    manifest: Manifest,
    *,
    batch_size: int,
    process_index: int = 0,
    on_image: OnImage | None = None,
    progress=None,
    lock_name: str = "",
) -> int:
    """Generate the missing ``items`` of every runnable plan of one source; returns how many were written.

    Args:
        progress: a ``rich.progress.Progress`` to add one task per plan to, or None.
        lock_name: this share's name (e.g. "0of2"): each plan is planned and claimed under a lock file
            ``OUT/cache/locks/<run>@<steps>-<lock_name>``, so a second eval of the share waits, then finds the images.
    """
    written = 0
    for plan in plans:
        if plan.skipped:
            continue
        with locked(out / "cache" / "locks" / f"{plan.run}@{plan.steps}-{lock_name}"):
            todo = missing_items(plan, items, manifest.read(), out)
            if not todo:
                continue
            advance = None
            if progress is not None:
                task = progress.add_task(f"generate {plan.run} @ {plan.steps} steps", total=len(todo))
                advance = lambda k, t=task: progress.advance(t, k)  # noqa: E731
            written += generate_images(sampler, plan, backbone, todo, out, manifest, batch_size=batch_size,
                                       process_index=process_index, on_image=on_image, advance=advance)
    return written
