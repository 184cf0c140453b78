"""Training data: real image–caption pairs encoded by the backbone, or a backbone's own generator.

Methods that learn from data (DMD2's GAN head, consistency distillation on real pairs, vanilla DMD's
regression if configured) take latents and captions from the run's ``DataSource``; they never read files.

* ``ImageCaptionSource``: one of three on-disk forms, all read through Hugging Face ``datasets``
  (``open_dataset``):
  a folder of images with a ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet`` captions file
  (``file_name`` + ``text`` columns: the ``imagefolder`` layout), a dataset written by
  ``Dataset.save_to_disk`` (``datasets.load_from_disk``), or webdataset ``.tar`` shards (a folder of them,
  a glob, or a comma-separated list). Images are resized on the short side and centre-cropped to the
  backbone's resolution, then encoded with the backbone's VAE (``Backbone.encode_images``: the posterior
  mean, so a latent is a function of the image and can be cached). Optional on-disk latent cache, keyed by
  everything that determines a latent.
* ``ProceduralSource``: the toy's procedural shapes generator (``Backbone.real_batch``).

Sharding and resume: every epoch is a permutation of the whole dataset drawn from (seed, epoch); process r
of w takes positions r, r+w, … of its first w·⌊N/w⌋ entries (``DistributedSampler`` with ``drop_last``), so
within an epoch no example is seen twice and every process holds the same number. Every process consumes
the same count per iteration, so the source's position (epoch, offset) is the same on every process and
is saved with the training state (``state_dict``); a resumed run continues with the next unseen example.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cdmbench.errors import CdmbenchError

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("text", "caption", "txt", "prompt")  # tried in this order when none is named
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass
class RealBatch:
    """Clean training latents (B, *latent_shape), fp32 on the backbone's device, and their captions."""

    latents: torch.Tensor
    captions: list[str]


class DataSource(ABC):
    """Per-process stream of real (latent, caption) pairs with a resumable position."""

    @abstractmethod
    def next(self, n: int) -> RealBatch:
        """The next ``n`` pairs of this process."""

    @abstractmethod
    def state_dict(self) -> dict[str, int]:
        """The position (plain ints; identical on every process)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position taken by ``state_dict``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What identifies the data in the run record."""


def _mix(*xs) -> int:
    return int.from_bytes(hashlib.sha256(repr(xs).encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------
# The backbone's own generator (the toy)


class ProceduralSource(DataSource):
    """Pairs from ``generate(n, generator)`` with a generator seeded by (seed, process, pairs drawn so far)."""

    def __init__(self, generate: Callable[[int, torch.Generator], tuple[torch.Tensor, list[str]]], name: str,
                 *, seed: int, process_index: int = 0):
        self.generate, self.name, self.seed, self.rank = generate, name, seed, process_index
        self.drawn = 0

    def next(self, n: int) -> RealBatch:
        g = torch.Generator().manual_seed(_mix("data", self.seed, self.rank, self.drawn))
        self.drawn += n
        latents, captions = self.generate(n, g)
        return RealBatch(latents.float(), list(captions))

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn = int(state["drawn"])

    def describe(self) -> dict[str, Any]:
        return {"kind": "procedural", "generator": self.name}


# ------------------------------------------------------------------------------------------------
# Image–caption datasets on disk


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise CdmbenchError("train.data needs the `datasets` package: pip install 'datasets>=4'") from None
    datasets.disable_progress_bars()
    return datasets


def _shards(spec: str) -> list[str]:
    """webdataset shard paths named by ``spec``: a folder of .tar files, a glob, or comma-separated paths."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return sorted(str(x) for x in p.glob("*.tar"))
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[str] = []
    for part in parts:
        hits = sorted(glob.glob(os.path.expanduser(part)))
        if not hits:
            raise CdmbenchError(f"train.data: no webdataset shard matches {part!r}")
        out += hits
    return out


def open_dataset(spec: str):
    """The ``datasets.Dataset`` that ``spec`` names (see the module docstring for the three forms)."""
    p = Path(spec).expanduser()
    forms = ("a folder of images with metadata.jsonl/.csv/.parquet (file_name, text), a folder written by "
             "Dataset.save_to_disk, or webdataset .tar shards (a folder of them, a glob or a comma-separated list)")
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        datasets = _import_datasets()
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise CdmbenchError(f"train.data: {spec} is a DatasetDict without a 'train' split "
                                    f"(splits: {', '.join(ds)})")
            ds = ds["train"]
        return ds
    if p.is_dir() and any((p / m).is_file() for m in METADATA_FILES):
        datasets = _import_datasets()
        return datasets.load_dataset("imagefolder", data_dir=str(p), split="train")
    if (p.is_dir() and any(p.glob("*.tar"))) or spec.endswith(".tar") or ".tar," in spec or "*" in spec:
        datasets = _import_datasets()
        return datasets.load_dataset("webdataset", data_files=_shards(spec), split="train")
    if not p.exists() and "*" not in spec and "," not in spec:
        raise CdmbenchError(f"train.data: {spec} does not exist; pass {forms}")
    raise CdmbenchError(f"train.data: {spec} is not an image-caption dataset; pass {forms}")


def _column(feats, given: str | None, kind: str, candidates: list[str]) -> str:
    """``given`` if it is a column, else the first of ``candidates``; one-line errors naming the setting."""
    setting = f"train.data_{kind}_column"
    if given is not None:
        if given not in feats:
            raise CdmbenchError(f"{setting}={given!r} is not a column; valid: {', '.join(feats)}")
        return given
    if not candidates:
        raise CdmbenchError(f"train.data: no {kind} column among {', '.join(feats)}; set {setting}")
    return candidates[0]


def _columns(ds, image_column: str | None, caption_column: str | None) -> tuple[str, str]:
    from datasets import Image, Value

    feats = ds.features
    images = [k for k, f in feats.items() if isinstance(f, Image)]
    texts = [c for c in CAPTION_COLUMNS
             if isinstance(feats.get(c), Value) and feats[c].dtype in ("string", "large_string")]
    return _column(feats, image_column, "image", images), _column(feats, caption_column, "caption", texts)


def load_image(image, resolution: int) -> torch.Tensor:
    """A PIL image as RGB in [0, 1], (3, r, r): short side resized to ``r`` (bicubic), centre-cropped."""
    import numpy as np
    from PIL import Image, ImageOps

    img = ImageOps.fit(image.convert("RGB"), (resolution, resolution), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


class ImageCaptionSource(DataSource):
    """Real image–caption pairs from ``spec``, encoded with ``backbone.encode_images`` (see the module docstring).

    ``cache_dir``: latents are written there once (one safetensors file per example, atomically) and read
    back on later visits, under a key of (dataset fingerprint, size, resolution, backbone identity).
    """

    def __init__(self, spec: str, backbone, *, seed: int, process_index: int = 0, num_processes: int = 1,
                 image_column: str | None = None, caption_column: str | None = None,
                 cache_dir: str | None = None):
        self.spec, self.backbone, self.seed = spec, backbone, seed
        self.rank, self.world = process_index, num_processes
        self.ds = open_dataset(spec)
        self.image_column, self.caption_column = _columns(self.ds, image_column, caption_column)
        self.resolution = backbone.image_resolution
        if len(self.ds) < num_processes:
            raise CdmbenchError(f"train.data: {spec} has {len(self.ds)} examples; need at least one per process "
                                f"({num_processes})")
        self.per_process = len(self.ds) // num_processes
        self.epoch, self.offset = 0, 0
        self._order: list[int] | None = None
        key = hashlib.sha256(json.dumps({"data": self.ds._fingerprint, "n": len(self.ds), "res": self.resolution,
                                         "image": self.image_column, "backbone": backbone.describe()},
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.cache = Path(cache_dir).expanduser() / key if cache_dir else None

    def _shard(self) -> list[int]:
        """This process's dataset indices for the current epoch, in visiting order."""
        if self._order is None:
            g = torch.Generator().manual_seed(_mix("data-order", self.seed, self.epoch))
            perm = torch.randperm(len(self.ds), generator=g)[: self.per_process * self.world]
            self._order = perm[self.rank::self.world].tolist()
        return self._order

    def indices(self, n: int) -> list[int]:
        """The next ``n`` dataset indices of this process (advancing the position, across epochs)."""
        out = []
        while len(out) < n:
            shard = self._shard()
            take = shard[self.offset:self.offset + n - len(out)]
            out += take
            self.offset += len(take)
            if self.offset == len(shard):
                self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        return out

    def next(self, n: int) -> RealBatch:
        idx = self.indices(n)
        rows = self.ds.select(idx)
        captions = [str(c) for c in rows[self.caption_column]]
        latents: list[torch.Tensor | None] = [self._cached(i) for i in idx]
        todo = [k for k, z in enumerate(latents) if z is None]
        if todo:
            images = torch.stack([load_image(rows[k][self.image_column], self.resolution) for k in todo])
            with torch.no_grad():
                encoded = self.backbone.encode_images(images.to(self.backbone.device)).float()
            for k, z in zip(todo, encoded):
                latents[k] = z
                self._store(idx[k], z)
        return RealBatch(torch.stack([z.to(self.backbone.device) for z in latents]), captions)

    def _cached(self, i: int) -> torch.Tensor | None:
        if self.cache is None or not (self.cache / f"{i:09d}.safetensors").is_file():
            return None
        from cdmbench.io import load_safetensors

        return load_safetensors(self.cache / f"{i:09d}.safetensors")["latent"]

    def _store(self, i: int, z: torch.Tensor) -> None:
        if self.cache is not None:
            from cdmbench.io import save_safetensors

            save_safetensors({"latent": z}, self.cache / f"{i:09d}.safetensors")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "num_processes": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("num_processes", self.world)) != self.world:
            logger.warning("train.data: resuming on %d processes from a position taken on %d; the shards differ, "
                           "so examples of the current epoch may repeat or be skipped", self.world,
                           state["num_processes"])
        self.epoch, self.offset, self._order = int(state["epoch"]), int(state["offset"]), None
        if self.offset >= self.per_process:
            self.epoch, self.offset = self.epoch + 1, 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "image-caption", "spec": self.spec, "examples": len(self.ds),
                "image_column": self.image_column, "caption_column": self.caption_column,
                "resolution": self.resolution, "latent_cache": str(self.cache) if self.cache else None}


def build_data_source(backbone, *, spec: str | None, seed: int, process_index: int = 0, num_processes: int = 1,
                      image_column: str | None = None, caption_column: str | None = None,
                      cache_dir: str | None = None) -> DataSource | None:
    """The run's data source: ``spec`` on disk when given, else the backbone's own (``None`` if it has none)."""
    if spec:
        return ImageCaptionSource(spec, backbone, seed=seed, process_index=process_index,
                                  num_processes=num_processes, image_column=image_column,
                                  caption_column=caption_column, cache_dir=cache_dir)
    if image_column or caption_column or cache_dir:
        raise CdmbenchError("train.data_image_column / data_caption_column / data_cache need train.data=PATH")
    return backbone.data_source(seed=seed, process_index=process_index)


def require_data(source: DataSource | None, who: str, arch: str) -> DataSource:
    """``source``, or the one-line error a method that needs real data gives on a backbone without any."""
    if source is None:
        raise CdmbenchError(f"{who} needs real training images, and backbone {arch!r} has none: pass "
                            f"--set train.data=PATH (an image folder with metadata.jsonl, a saved `datasets` "
                            f"dataset, or webdataset .tar shards)")
    return source
