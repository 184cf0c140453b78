"""The metric protocol: update/compute/reset plus declared metadata (style.md principle 9; torchmetrics).

Every metric takes a batch of images ``(B, 3, H, W)`` float in [0, 1] and the batch's prompts
(``cdmbench.types.Prompt``, whose free-form ``meta`` carries what a backbone attached, or plain strings).
Heavy models are injected into the constructor (principle 10); ``from_options(evaluators, options)``
builds the metric with the models a backbone declares (``cdmbench.types.Evaluators``), falling back to
the real defaults from local paths, and is the only place that loads weights. Nothing heavy is imported
at module import, and no metric knows any backbone.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.types import Evaluators, Prompt

PromptLike = Prompt | str  # a plain string is a prompt without metadata


# --------------------------------------------------------------------------------------------------
# Results and applicability


@dataclass(frozen=True)
class MetricResult:
    """What ``Metric.compute`` returns.

    Args:
        value: the metric (mean of ``per_image`` for per-image metrics).
        per_image: float64 ``(n,)`` per-image scores, or None for set-level metrics such as FID.
        n: number of images scored.
    """

    value: float
    per_image: np.ndarray | None
    n: int

    def interval(self, seed: int = 0, n_resamples: int = 1000) -> tuple[float, float]:
        """95 % bootstrap interval of the mean; (nan, nan) for set-level metrics."""
        if self.per_image is None:
            return (float("nan"), float("nan"))
        return bootstrap_ci(self.per_image, seed=seed, n_resamples=n_resamples)


@dataclass(frozen=True)
class Applicability:
    """Whether a metric applies to a backbone; ``bool(a)`` is ``a.ok``. A metric that does not apply
    is reported with status ``"not_applicable: <reason>"``, never dropped."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @property
    def status(self) -> str:
        return "ok" if self.ok else f"not_applicable: {self.reason}"


APPLIES = Applicability(True)


def bootstrap_ci(
    values: np.ndarray | list[float], seed: int = 0, n_resamples: int = 1000, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (fixed seed, so reruns agree).

    Args:
        values: per-image scores, shape (n,), n >= 1.
        seed: seed of the resampling generator (numpy PCG64).
        n_resamples: bootstrap resamples.
        confidence: coverage of the interval (0.95 → 2.5 % and 97.5 % percentiles).

    Returns:
        (low, high) as floats; (v, v) when n == 1.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise CdmbenchError("bootstrap_ci needs at least one value")
    if not np.isfinite(x).all():
        raise CdmbenchError("bootstrap_ci got non-finite values")
    if not 0.0 < confidence < 1.0:
        raise CdmbenchError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // x.size)  # bound the (chunk, n) index matrix to ~16 MB
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------------
# Options: where the real scorers' weights live


@dataclass(frozen=True)
class MetricOptions:
    """How ``Metric.from_options`` finds models and references. ``None`` means "the environment variable
    named in the comment, else the documented default"; see each metric's ``from_options``."""

    device: str = "cpu"  # torch device the scorer runs on
    # FID. The reference: a folder of images or an .npz with mu/sigma; $CDMBENCH_FID_REF; a backbone's declared stats win over the env
    fid_reference: str | None = None
    inception_path: str | None = None  # clean-fid's inception-2015-12-05.pt (file or folder); $CDMBENCH_INCEPTION_PATH
    # CLIP score (open_clip)
    clip_model: str | None = None  # open_clip architecture; $CDMBENCH_CLIP_MODEL; default "ViT-L-14"
    clip_pretrained: str | None = None  # tag or local checkpoint; $CDMBENCH_CLIP_PRETRAINED; default "openai"
    clip_prefix: str = ""  # text put before every prompt (GigaGAN/DMD2 use "A photo depicts ")
    # HPS v2.1
    hps_path: str | None = None  # HPS_v2.1_compressed.pt; $CDMBENCH_HPS_PATH; else hub xswu/HPSv2 (cache)
    hps_model: str = "ViT-H-14"  # open_clip architecture the HPS checkpoint was trained from
    # ImageReward v1.0
    imagereward_path: str | None = None  # ImageReward.pt; $CDMBENCH_IMAGEREWARD_PATH; else ~/.cache/ImageReward or hub
    imagereward_med_config: str | None = None  # med_config.json; $CDMBENCH_IMAGEREWARD_MED_CONFIG; same fallbacks
    bert_tokenizer_path: str | None = None  # bert-base-uncased folder or vocab.txt; $CDMBENCH_BERT_TOKENIZER_PATH
    # PickScore v1 (transformers CLIPModel + CLIPProcessor): hub ids or local folders
    pickscore_model: str | None = None  # $CDMBENCH_PICKSCORE_MODEL; default yuvalkirstain/PickScore_v1
    pickscore_processor: str | None = None  # $CDMBENCH_PICKSCORE_PROCESSOR; default laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    # LAION improved aesthetic predictor
    aesthetic_path: str | None = None  # aesthetic-model.pth; $CDMBENCH_AESTHETIC_PATH; else hub trl-lib/ddpo-aesthetic-predictor
    aesthetic_clip: str | None = None  # CLIP ViT-L/14 folder or hub id; $CDMBENCH_AESTHETIC_CLIP; default openai/clip-vit-large-patch14
    # intra-prompt LPIPS
    lpips_net: str = "alex"  # LPIPS trunk: alex | squeeze | vgg
    lpips_trunk_path: str | None = None  # torchvision weights of the trunk (file or folder); $CDMBENCH_LPIPS_TRUNK_PATH

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_path", "_config", "_reference")) and v is not None and not str(v).strip():
                raise CdmbenchError(f"MetricOptions.{f.name} is an empty string; pass a path or leave it None")

    def env(self, field_name: str, env_var: str, default: str | None = None) -> str | None:
        """The option if set, else ``$env_var`` (read now, never at import time), else ``default``."""
        value = getattr(self, field_name)
        return value if value is not None else (os.environ.get(env_var) or default)


def offline() -> bool:
    """True when the user asked for no network (the same switch the HF hub honours)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


DOWNLOAD_ENV = "CDMBENCH_ALLOW_DOWNLOAD"
HOW_TO_DOWNLOAD = f"or let cdmbench download it once: `cdmbench eval --allow-download` (or ${DOWNLOAD_ENV}=1)"


def downloads_allowed() -> bool:
    """True only when the user opted in to downloading scorer weights (``--allow-download`` or
    ``$CDMBENCH_ALLOW_DOWNLOAD=1``) and did not ask for no network (``HF_HUB_OFFLINE``)."""
    return (os.environ.get(DOWNLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}) and not offline()


class DownloadBlocked(OSError):
    """A scorer tried to reach the network while downloads are not allowed."""


@contextmanager
def no_downloads_unless_allowed():
    """Within the block, no scorer loader reaches the network unless ``downloads_allowed()``: the HF hub is
    put in offline mode (cached files still resolve) and ``urllib`` refuses to open URLs (open_clip's and
    clean-fid's own downloads, torchvision's weight cache). Weight files already on disk load as usual."""
    if downloads_allowed():
        yield
        return
    import urllib.request

    from huggingface_hub import constants

    def refuse(url, *args, **kwargs):
        raise DownloadBlocked(f"download of {getattr(url, 'full_url', url)} refused: downloads are off")

    import torch.hub

    saved = constants.HF_HUB_OFFLINE, urllib.request.urlopen, torch.hub.urlopen, torch.hub.download_url_to_file
    # torch.hub (torchvision's and torchmetrics' weights) bound urlopen at import: patched where it is used
    (constants.HF_HUB_OFFLINE, urllib.request.urlopen, torch.hub.urlopen,
     torch.hub.download_url_to_file) = True, refuse, refuse, refuse
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, urllib.request.urlopen, torch.hub.urlopen, torch.hub.download_url_to_file = saved


def resolve_weights(explicit: str | None, repo: str, filename: str, what: str, how: str,
                    cache_dir: Path | None = None) -> Path:
    """An explicit path (must exist), else ``cache_dir/filename``, else the HF hub cache (downloaded there only
    when the user opted in: ``downloads_allowed()``)."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise MissingWeightsError(f"{what} not found at {p}; {how}")
        return p
    if cache_dir is not None and (cache_dir / filename).is_file():
        return cache_dir / filename
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=not downloads_allowed()))
    except Exception as e:
        raise MissingWeightsError(
            f"{what} ({repo}/{filename}) is not available locally ({type(e).__name__}); {how}, {HOW_TO_DOWNLOAD}"
        ) from e


# --------------------------------------------------------------------------------------------------
# The protocol


def check_batch(images: torch.Tensor, prompts: Sequence[PromptLike]) -> list[Prompt]:
    """Validate the common ``update`` arguments (principle 15: fail loudly, never correct); the prompts as
    ``Prompt`` objects (a string becomes a prompt with no id and no metadata)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CdmbenchError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise CdmbenchError(f"images must be float in [0, 1], got dtype {images.dtype}")
    if len(prompts) != images.shape[0]:
        raise CdmbenchError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    out = []
    for p in prompts:
        if not isinstance(p, (Prompt, str)):
            raise CdmbenchError(f"prompts must be Prompt objects or strings, got {type(p).__name__}")
        out.append(Prompt("", p) if isinstance(p, str) else p)
    return out


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] → (B, H, W, 3) uint8, rounded as a PNG writer would store them."""
    x = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) float [0, 1] → list of RGB PIL images (the form scorers' preprocess expects)."""
    from PIL import Image

    return [Image.fromarray(a, mode="RGB") for a in to_uint8_hwc(images)]


class Metric(ABC):
    """A streaming metric: ``update`` per batch, ``compute`` once, ``reset`` to reuse.

    Class metadata:
        name: registry name (set by ``METRICS.register``).
        higher_is_better: direction, used for ↑/↓ and best-in-bold in reports.
        per_image: True when ``compute`` returns per-image scores (and so a bootstrap interval).
    Instance metadata:
        protocol: everything that defines the number (extractor, weights, resize mode, reference set,
            prompt prefix, scale); stored with every result row. ``version`` is the same string.
    """

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    per_image: ClassVar[bool]
    protocol: str

    @property
    def version(self) -> str:
        return self.protocol

    @classmethod
    def applies_to(cls, evaluators: Evaluators) -> Applicability:
        """Whether this metric is meaningful for a backbone's images, from what the backbone declares (its
        ``not_applicable`` reasons); a metric that needs a declared model also checks that it is there."""
        reason = evaluators.not_applicable.get(cls.name)
        return Applicability(False, reason) if reason else APPLIES

    @classmethod
    @abstractmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "Metric":
        """Build the metric with the model ``evaluators`` declares, else its real default; loads weights."""

    @classmethod
    def tiny(cls, workdir: Path) -> "Metric":
        """A small instance with random or dummy models and no downloads, for the contract checks
        (``cdmbench.testing.METRIC_CHECKS``); any files it needs go under ``workdir``."""
        raise NotImplementedError(f"{cls.__name__} has no tiny() test instance; the metric contract tests need one")

    @classmethod
    def _require_applicable(cls, evaluators: Evaluators) -> None:
        a = cls.applies_to(evaluators)
        if not a:
            raise CdmbenchError(f"metric {cls.name!r} does not apply to these images: {a.reason}")

    @abstractmethod
    def update(self, images: torch.Tensor, prompts: Sequence[PromptLike]) -> None:
        """Accumulate a batch: images (B, 3, H, W) float [0, 1] and their B prompts."""

    @abstractmethod
    def compute(self) -> MetricResult: ...

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The accumulated state (tensors/arrays and the protocol), e.g. to gather from other processes."""

    @abstractmethod
    def merge_state(self, state: dict[str, Any]) -> None:
        """Add a ``state_dict()`` of another instance with the same protocol into this one."""

    def merge(self, other: "Metric") -> None:
        """Add another instance's state (e.g. from another process) into this one."""
        self.merge_state(other.state_dict())

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("protocol") != self.protocol:
            raise CdmbenchError(
                f"cannot merge a {state.get('protocol')!r} state into {type(self).__name__}[{self.protocol}]"
            )


class PerImageMetric(Metric):
    """A metric whose value is the mean of a per-image score; subclasses implement ``score_batch``."""

    per_image: ClassVar[bool] = True

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []

    @abstractmethod
    def score_batch(self, images: torch.Tensor, prompts: list[Prompt]) -> np.ndarray:
        """Per-image scores (B,) float64 for one validated batch."""

    def update(self, images: torch.Tensor, prompts: Sequence[PromptLike]) -> None:
        prompts = check_batch(images, prompts)
        s = np.asarray(self.score_batch(images, prompts), dtype=np.float64).reshape(-1)
        if s.shape[0] != images.shape[0]:
            raise CdmbenchError(
                f"{type(self).__name__}.score_batch returned {s.shape[0]} scores for {images.shape[0]} images"
            )
        self._scores.append(s)

    def compute(self) -> MetricResult:
        if not self._scores:
            raise CdmbenchError(f"{type(self).__name__}.compute called before any update")
        per_image = np.concatenate(self._scores)
        return MetricResult(value=float(per_image.mean()), per_image=per_image, n=int(per_image.size))

    def reset(self) -> None:
        self._scores = []

    def state_dict(self) -> dict[str, Any]:
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        return {"protocol": self.protocol, "scores": scores}

    def merge_state(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self._scores.append(np.asarray(state["scores"], dtype=np.float64).reshape(-1))
