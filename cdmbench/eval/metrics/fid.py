"""Fréchet Inception Distance (Heusel et al., 2017), streaming, float64, against named reference stats.

One Fréchet-distance implementation (``frechet_distance``) serves every feature extractor:
- a backbone's declared extractor (``Evaluators.fid`` → ``FIDFeatures``), e.g. a classifier's
  penultimate features with reference statistics the backbone ships;
- the real default: clean-fid's Inception (``inception-2015-12-05.pt``) with the "clean" resize mode
  (Parmar et al., 2022: PIL bicubic to 299×299 on the float image) and a named reference set (a folder
  of images or a precomputed ``.npz`` of mu/sigma).
Images are quantised to uint8 first, exactly as a saved PNG, so scoring tensors and scoring the saved
files give the same number.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.eval.metrics import METRICS
from cdmbench.eval.metrics.base import (
    Metric,
    MetricOptions,
    MetricResult,
    PromptLike,
    check_batch,
    HOW_TO_DOWNLOAD,
    downloads_allowed,
    to_uint8_hwc,
)
from cdmbench.types import Evaluators

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float [0, 1] -> (B, F)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "CDMBENCH_INCEPTION_PATH"
REFERENCE_ENV = "CDMBENCH_FID_REF"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------
# The distance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½), in float64.

    Tr((Σ₁Σ₂)^½) is computed as Σᵢ √λᵢ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½, which has the same
    eigenvalues as Σ₁Σ₂, so only symmetric eigendecompositions are needed (no complex sqrtm).
    Inputs may be numpy arrays or tensors; mu (F,), sigma (F, F).
    """
    mu1, mu2 = (np.asarray(_np(m), dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(_np(s), dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise CdmbenchError(f"FID shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2.0)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _np(x):
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x


# --------------------------------------------------------------------------------------------------
# Reference statistics


@dataclass(frozen=True)
class ReferenceStats:
    """Gaussian statistics of a reference set. ``name`` goes into the metric's protocol string."""

    mu: np.ndarray  # (F,) float64
    sigma: np.ndarray  # (F, F) float64
    name: str
    n: int | None = None  # images behind the stats, when known
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_features(cls, features, name: str, meta: dict | None = None) -> "ReferenceStats":
        f = np.asarray(_np(features), dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise CdmbenchError(f"reference features must be (N >= 2, F), got {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), name, f.shape[0], dict(meta or {}))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        """A ``.npz`` with ``mu`` and ``sigma`` (clean-fid's format; optional ``n``)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"FID reference stats not found at {path}")
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise CdmbenchError(
                    f"{path} is not FID reference stats: it needs arrays 'mu' and 'sigma', has {list(z)}"
                )
            n = int(z["n"]) if "n" in z else None
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), path.stem, n)

    def save(self, path: str | Path) -> None:
        from cdmbench.io import atomic_path

        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.n is not None:
            arrays["n"] = np.asarray(self.n)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)


def _folder_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise CdmbenchError(f"FID reference folder {folder} holds {len(files)} images; it needs at least 2")
    return files


def folder_features(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 50) -> np.ndarray:
    """Features of every image under ``folder`` (sorted, recursive), read as RGB like clean-fid does.
    Consecutive images of one size are batched; (N, F) float64."""
    from PIL import Image

    feats, batch = [], []

    def flush():
        if batch:
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(255.0)
            feats.append(np.asarray(_np(extractor(x)), dtype=np.float64))
            batch.clear()

    for path in _folder_images(Path(folder)):
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        if batch and (a.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(a)
    flush()
    return np.concatenate(feats)


def reference_from_folder(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 50) -> ReferenceStats:
    folder = Path(folder).expanduser()
    return ReferenceStats.from_features(folder_features(folder, extractor, batch_size), folder.name)


@dataclass(frozen=True)
class FIDFeatures:
    """A backbone's FID feature space (what ``Evaluators.fid`` loads), as torchmetrics' ``feature=``.

    Args:
        extractor: (B, 3, H, W) float [0, 1] → (B, F) features, on the device it was loaded for.
        protocol: the feature space's identity (extractor + preprocessing); ``FID`` adds "fid|" and the reference.
        reference: loads the extractor's own reference statistics; None = the reference comes from
            ``fid_reference`` / $CDMBENCH_FID_REF as for the default extractor. A declared reference is used
            instead of $CDMBENCH_FID_REF (which names a set for the default extractor); an explicit
            ``fid_reference`` still wins.
    """

    extractor: FeatureExtractor
    protocol: str
    reference: Callable[[], ReferenceStats] | None = None


class RandomFeatures(torch.nn.Module):
    """A stand-in extractor for tests (torchmetrics' ``_DummyFeatureExtractor``): average-pool to 8×8, then a
    fixed random projection to ``num_features``; any image size."""

    def __init__(self, num_features: int = 12, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_features = num_features
        self.proj = torch.nn.Linear(3 * 64, num_features)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(num_features, 3 * 64, generator=g) / 8.0)
            self.proj.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1))


# --------------------------------------------------------------------------------------------------
# clean-fid's Inception ("clean" mode)


class CleanInceptionFeatures:
    """clean-fid's feature path on in-memory images: uint8 quantisation, ``cleanfid.resize`` "clean"
    resizer (PIL bicubic on float32 per channel, 299×299), then the torchscript Inception on [0, 255].

    Args:
        model: clean-fid's ``InceptionV3W`` (or any module taking (B, 3, 299, 299) in [0, 255]).
        device: where ``model`` runs.
    """

    num_features = 2048

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], device: str | torch.device = "cpu"):
        from cleanfid.resize import build_resizer

        self.model = model
        self.device = torch.device(device)
        self.resize = build_resizer("clean")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        resized = [self.resize(a) for a in to_uint8_hwc(images)]  # (299, 299, 3) float32 in [0, 255]
        x = torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).copy()).to(self.device)
        return self.model(x).float().cpu()


INCEPTION_SHA256_ENV = "CDMBENCH_INCEPTION_SHA256"


def _inception_cache_dir() -> Path:
    """cdmbench's own cache of the Inception file (``$XDG_CACHE_HOME/cdmbench`` or ``~/.cache/cdmbench``): never a
    shared folder such as clean-fid's ``/tmp``, where anyone could leave a TorchScript file for us to run."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdmbench"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _download_inception(dest: Path) -> None:
    from cdmbench.io import atomic_path, write_text
    from cleanfid.downloads_helper import inception_url

    how = f"download {inception_url} and pass inception_path= or set ${INCEPTION_ENV}"
    if not downloads_allowed():
        raise MissingWeightsError(
            f"clean-fid Inception weights {INCEPTION_FILE} are not cached in {dest.parent}: {how}, {HOW_TO_DOWNLOAD}"
        )
    try:
        with urllib.request.urlopen(inception_url, timeout=60) as r, atomic_path(dest) as tmp:
            tmp.write_bytes(r.read())
    except OSError as e:
        raise MissingWeightsError(
            f"could not download clean-fid Inception weights {INCEPTION_FILE} ({e}); {how}"
        ) from e
    write_text(dest.with_name(dest.name + ".sha256"), _sha256(dest) + "\n")  # checked before every load


def check_inception_file(file: Path, trusted_dir: bool) -> None:
    """Before ``torch.jit.load`` runs a TorchScript file: it must be a regular file of this user (or root) that
    no one else may write, and match its expected sha256 — ``$CDMBENCH_INCEPTION_SHA256`` if set, else the
    ``.sha256`` recorded beside it at download (required in cdmbench's cache, ``trusted_dir``=False there)."""
    import os
    import stat

    st = file.stat()
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (os.getuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CdmbenchError(f"refusing to load TorchScript {file}: it must be a file owned by you that others "
                            f"cannot write (chmod go-w it, or pass another inception_path=)")
    side = file.with_name(file.name + ".sha256")
    want = os.environ.get(INCEPTION_SHA256_ENV) or (side.read_text().strip() if side.is_file() else None)
    if want is None:
        if trusted_dir:
            return  # a file the user named explicitly, with no recorded hash: their choice
        raise CdmbenchError(f"{file} has no recorded sha256 ({side.name}); delete it and let cdmbench download "
                            f"it again, or pass inception_path= (or set ${INCEPTION_SHA256_ENV})")
    got = _sha256(file)
    if got != want.lower():
        raise CdmbenchError(f"{file} does not match its expected sha256 ({got[:16]}… ≠ {want[:16]}…); refusing "
                            f"to load it; delete it or pass another inception_path=")


def load_clean_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> CleanInceptionFeatures:
    """clean-fid's TorchScript Inception from ``path`` (the .pt, or a folder holding it); None → cdmbench's cache
    (downloaded there once, only when the user opted in). TorchScript is the one weights format cdmbench loads
    that is not safetensors or ``weights_only``: the file is checked first (``check_inception_file``)."""
    from cleanfid.inception_torchscript import InceptionV3W

    if path is None:
        folder = _inception_cache_dir()
        if not (folder / INCEPTION_FILE).is_file():
            _download_inception(folder / INCEPTION_FILE)
    else:
        p = Path(path).expanduser()
        folder = p if p.is_dir() else p.parent
        if p.is_file() and p.name != INCEPTION_FILE:
            raise CdmbenchError(f"clean-fid loads its Inception from a file named {INCEPTION_FILE}; got {p}")
        if not (folder / INCEPTION_FILE).is_file():
            raise MissingWeightsError(
                f"clean-fid Inception weights {INCEPTION_FILE} not found at {p}; "
                f"pass inception_path= (the .pt or its folder) or set ${INCEPTION_ENV}"
            )
    check_inception_file(folder / INCEPTION_FILE, trusted_dir=path is not None)
    model = InceptionV3W(str(folder), download=False, resize_inside=False).to(device).eval()
    return CleanInceptionFeatures(model, device)


# --------------------------------------------------------------------------------------------------
# The metric


@METRICS.register("fid")
class FID(Metric):
    """Streaming FID: float64 running sums of features, outer products and count (torchmetrics-style),
    so states merge across processes; compared with fixed reference statistics.

    Args:
        feature_extractor: (B, 3, H, W) float [0, 1] → (B, F) features; an ``nn.Module`` is put in eval mode.
        reference: statistics of the reference set, F-dimensional.
        protocol: extractor + preprocessing identity; the reference name is appended.
    """

    higher_is_better: ClassVar[bool] = False
    per_image: ClassVar[bool] = False

    def __init__(self, feature_extractor: FeatureExtractor, reference: ReferenceStats, protocol: str):
        if isinstance(feature_extractor, torch.nn.Module):
            feature_extractor.eval()
        self.feature_extractor = feature_extractor
        self.reference = reference
        self.num_features = int(reference.mu.shape[0])
        self.protocol = f"{protocol}|ref={reference.name}"
        self.reset()

    def reset(self) -> None:
        f = self.num_features
        self.feat_sum = torch.zeros(f, dtype=torch.float64)
        self.feat_outer_sum = torch.zeros(f, f, dtype=torch.float64)
        self.count = 0
        self._features: list[torch.Tensor] = []  # per-image features, kept for resampling (eval/items.py)

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: Sequence[PromptLike]) -> None:
        check_batch(images, prompts)
        self.update_features(self.feature_extractor(images))

    def update_features(self, features: torch.Tensor) -> None:
        f = torch.as_tensor(_np(features)).double().cpu()
        if f.ndim != 2 or f.shape[1] != self.num_features:
            raise CdmbenchError(
                f"feature extractor returned {tuple(f.shape)}; the reference has {self.num_features} features"
            )
        self.feat_sum += f.sum(dim=0)
        self.feat_outer_sum += f.T @ f
        self.count += f.shape[0]
        self._features.append(f)

    def item_features(self) -> np.ndarray:
        """(n, F) float64 features of the images seen by this instance's ``update`` calls, in order."""
        if not self._features:
            raise CdmbenchError("FID.item_features called before any update")
        return torch.cat(self._features).numpy()

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the images seen so far (unbiased covariance, as np.cov)."""
        if self.count < 2:
            raise CdmbenchError(f"FID needs at least 2 images, got {self.count}")
        n = self.count
        mu = self.feat_sum / n
        sigma = (self.feat_outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()

    def compute(self) -> MetricResult:
        mu, sigma = self.stats()
        value = frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma)
        return MetricResult(value=value, per_image=None, n=self.count)

    def state_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "feat_sum": self.feat_sum.clone(),
            "feat_outer_sum": self.feat_outer_sum.clone(),
            "count": self.count,
        }

    def merge_state(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.feat_sum += torch.as_tensor(state["feat_sum"], dtype=torch.float64)
        self.feat_outer_sum += torch.as_tensor(state["feat_outer_sum"], dtype=torch.float64)
        self.count += int(state["count"])

    @classmethod
    def tiny(cls, workdir: Path) -> "FID":
        """Random-projection features against the statistics of 64 random images."""
        extractor = RandomFeatures()
        with torch.no_grad():
            ref = extractor(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
        return cls(extractor, ReferenceStats.from_features(ref, "tiny-random"), "fid|random-features")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "FID":
        """The declared ``evaluators.fid`` features with their own reference unless ``fid_reference`` is given;
        else clean-fid Inception ("clean" mode) from ``inception_path`` / $CDMBENCH_INCEPTION_PATH / clean-fid's
        cache, with the reference from ``fid_reference`` / $CDMBENCH_FID_REF (folder or .npz), required."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        spec: FIDFeatures | None = evaluators.fid(options.device) if evaluators.fid is not None else None
        if spec is not None and spec.reference is not None and options.fid_reference is None:
            return cls(spec.extractor, spec.reference(), f"fid|{spec.protocol}")
        ref_path = options.env("fid_reference", REFERENCE_ENV)
        if ref_path is None:
            raise MissingWeightsError(
                f"FID with {spec.protocol if spec else 'the default clean-fid Inception'} features needs a reference set: "
                f"pass fid_reference= (a folder of images or an .npz with mu/sigma) or set ${REFERENCE_ENV}"
            )
        extractor, protocol = (spec.extractor, spec.protocol) if spec else feature_extractor_for(evaluators, options)
        return cls(extractor, _load_reference(ref_path, extractor), f"fid|{protocol}")


def feature_extractor_for(evaluators: Evaluators, options: MetricOptions) -> tuple[FeatureExtractor, str]:
    """(extractor, protocol) of the FID feature space: the features ``evaluators.fid`` declares, else clean-fid's
    Inception ("clean" mode). Every feature-space metric (FID, Vendi, PRDC, the teacher distances) uses it."""
    if evaluators.fid is not None:
        spec: FIDFeatures = evaluators.fid(options.device)
        return spec.extractor, spec.protocol
    extractor = load_clean_inception(options.env("inception_path", INCEPTION_ENV), options.device)
    return extractor, "clean-fid-inception-2015-12-05|mode=clean|uint8"


def _load_reference(path: str, extractor: FeatureExtractor) -> ReferenceStats:
    p = Path(path).expanduser()
    if p.is_dir():
        return reference_from_folder(p, extractor)
    if p.suffix == ".npz":
        return ReferenceStats.load(p)
    raise MissingWeightsError(f"FID reference {p} is neither a folder of images nor an existing .npz of mu/sigma")


def compute_reference_stats(
    folder: str | Path, out_path: str | Path, evaluators: Evaluators | None = None,
    options: MetricOptions | None = None,
) -> ReferenceStats:
    """Precompute a folder's reference statistics once, with the FID extractor ``evaluators`` declares (None:
    clean-fid Inception), into an .npz that ``fid_reference`` can name later (its stem becomes the name)."""
    options = dataclasses.replace(options or MetricOptions(), fid_reference=str(folder))
    ref = FID.from_options(evaluators or Evaluators(), options).reference
    ref.save(out_path)
    return dataclasses.replace(ref, name=Path(out_path).stem)
