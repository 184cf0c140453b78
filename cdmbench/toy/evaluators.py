"""Toy evaluators: an attribute classifier and a tiny open_clip CLIP, trained on the procedural shapes.

They stand in for the real-world scorers on the toy backbone, through the same code paths: the toy
backbone declares them (``ToyBackbone.evaluators`` → ``fid_features``, ``clip_model``, ``attribute_model``)
and the eval metrics receive them injected, as they would receive any backbone's models.

- ``ShapeClassifier`` predicts the four caption attributes. Attribute accuracy is GenEval-like
  (Ghosh et al. 2023): an image counts as correct only if every attribute the prompt names is right.
  Its penultimate features are the toy FID's feature space (Heusel et al. 2017), with reference
  statistics of real images for the fixed eval prompt set shipped beside it; the distance is the eval
  layer's one ``cdmbench.eval.metrics.fid`` path.
- The toy CLIP is an ``open_clip.model.CLIP`` built from a small custom config
  (``assets/open_clip/toy-clip.json``) with open_clip's default BPE tokenizer, so the toy CLIP score
  runs the same ``encode_image``/``encode_text`` code as a real open_clip model.

All images are float32 in [0, 1], shape (B, 3, 32, 32). Weights ship in ``cdmbench/assets/``; rebuild
them from a seed with ``cdmbench toy train-evaluators --out-dir cdmbench/assets``
(see ``cdmbench/toy/EVALUATORS.md``).
"""

from __future__ import annotations

import functools

import hashlib
import json
import logging
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from cdmbench.errors import CdmbenchError, MissingWeightsError
from cdmbench.toy.shapes import ATTRIBUTES, NUM_CLASSES, RESOLUTION

CLASSIFIER_ASSET = "toy_classifier.safetensors"
CLIP_ASSET = "toy_clip.safetensors"
FID_REF_ASSET = "toy_fid_ref.safetensors"
CLIP_MODEL_NAME = "toy-clip"  # open_clip model name, registered from assets/open_clip/toy-clip.json
TOY_FID_VERSION = "toy-fid-v2"  # bump when the feature protocol (extractor, preprocessing) changes
REBUILD_COMMAND = "cdmbench toy train-evaluators --out-dir cdmbench/assets"
METADATA_KEY = "cdmbench"  # safetensors metadata key holding the JSON training/protocol record


def assets_dir() -> Path:
    """The package's asset folder (``cdmbench/assets``)."""
    return Path(str(resources.files("cdmbench") / "assets"))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes; names the exact extractor behind a set of FID statistics."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} not found at {path}; reinstall cdmbench or rebuild it with `{REBUILD_COMMAND}`"
        )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON record under ``METADATA_KEY``) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        record = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, record


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise unless ``images`` is a float (B, 3, 32, 32) tensor (values are expected in [0, 1])."""
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise CdmbenchError(f"{name}: expected a float tensor in [0, 1], got {type(images).__name__} "
                            f"{getattr(images, 'dtype', '')}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, RESOLUTION, RESOLUTION):
        raise CdmbenchError(f"{name}: expected shape (B, 3, {RESOLUTION}, {RESOLUTION}), got {tuple(images.shape)}")


# ----------------------------------------------------------------------------------------------------
# Attribute classifier: a small strided CNN with one linear head per attribute.


class ShapeClassifier(nn.Module):
    """Small CNN over (B, 3, 32, 32) images in [0, 1] with heads for shape, colour, position, size.

    The trunk keeps a 4×4 spatial map before the fully connected layer, so position is linearly
    readable. ``features`` (post-ReLU penultimate layer, ``num_features`` wide) feeds the toy FID.
    """

    def __init__(self, width: int = 32, num_features: int = 128):
        super().__init__()
        w = width
        self.width = width
        self.num_features = num_features  # torchmetrics' FID reads this from a custom extractor
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),  # 32×32
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 16×16
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 8×8
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # 4×4
            nn.Flatten(),
            nn.Linear(4 * w * 16, num_features), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(num_features, NUM_CLASSES[a]) for a in ATTRIBUTES})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_features) float32 penultimate features of images in [0, 1]."""
        return self.trunk(images.float() * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute, keyed and ordered as ``shapes.ATTRIBUTES``."""
        h = self.features(images)
        return {a: head(h) for a, head in self.heads.items()}

    def arch(self) -> dict:
        return {"width": self.width, "num_features": self.num_features}


def default_classifier_path() -> Path:
    return assets_dir() / CLASSIFIER_ASSET


def load_toy_classifier(path: str | Path | None = None) -> ShapeClassifier:
    """The trained attribute classifier in eval mode with frozen parameters.

    Args:
        path: a file written by ``train_evaluators.train_classifier``; None means the shipped asset.

    Raises:
        MissingWeightsError: the file does not exist.
    """
    path = Path(path) if path is not None else default_classifier_path()
    _require_file(path, "toy classifier weights")
    tensors, record = _read_safetensors(path)
    model = ShapeClassifier(**record.get("arch", {}))
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def attribute_predictions(classifier: ShapeClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(B, 4) int64 predicted labels, columns ordered as ``shapes.ATTRIBUTES``."""
    check_images(images)
    out = []
    for chunk in images.split(batch_size):
        logits = classifier(chunk)
        out.append(torch.stack([logits[a].argmax(1) for a in ATTRIBUTES], dim=1))
    return torch.cat(out)


def _check_labels(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 2 or pred.shape[1] != len(ATTRIBUTES):
        raise CdmbenchError(f"pred: expected shape (B, {len(ATTRIBUTES)}), got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise CdmbenchError(f"target: expected shape {tuple(pred.shape)} like pred, got {tuple(target.shape)}")


def attribute_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) float per-image accuracy: 1 only if all four attributes match (GenEval-like), else 0."""
    _check_labels(pred, target)
    return (pred == target).all(dim=1).float()


def per_attribute_accuracy(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean accuracy of each attribute separately, keyed as ``shapes.ATTRIBUTES``."""
    _check_labels(pred, target)
    hits = (pred == target).float().mean(dim=0)
    return {a: float(h) for a, h in zip(ATTRIBUTES, hits)}


# ----------------------------------------------------------------------------------------------------
# Toy FID: classifier features against shipped real-image statistics (the distance is eval's FID).


def default_fid_reference_path() -> Path:
    return assets_dir() / FID_REF_ASSET


def load_toy_fid_reference(path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(mu (F,) float64, sigma (F, F) float64, protocol record) of real images for the toy eval prompts.

    The record names what produced the statistics: ``version`` (TOY_FID_VERSION), ``extractor``
    and ``extractor_sha256`` (the classifier file), ``prompt_set`` (shapes.PROMPT_SET_VERSION),
    ``seeds`` and ``n``. Compare ``extractor_sha256`` with ``file_sha256`` of the classifier you score with.

    Args:
        path: a file written by ``train_evaluators.build_fid_reference``; None means the shipped asset.

    Raises:
        MissingWeightsError: the file does not exist.
    """
    path = Path(path) if path is not None else default_fid_reference_path()
    _require_file(path, "toy FID reference statistics")
    tensors, record = _read_safetensors(path)
    return tensors["mu"].double(), tensors["sigma"].double(), record


# ----------------------------------------------------------------------------------------------------
# Toy CLIP: open_clip's own CLIP class from a small custom config.


def default_clip_path() -> Path:
    return assets_dir() / CLIP_ASSET


def register_toy_clip_config() -> None:
    """Make ``CLIP_MODEL_NAME`` known to open_clip (idempotent)."""
    import open_clip

    if CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(assets_dir() / "open_clip")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"No pretrained weights loaded for model '{CLIP_MODEL_NAME}'" not in record.getMessage()


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Hide open_clip's random-init warning: the toy CLIP's weights are loaded right after creation."""
    f = _DropRandomInitWarning()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def build_toy_clip() -> nn.Module:
    """A randomly initialised toy CLIP (``open_clip.model.CLIP``) in fp32 on the CPU."""
    import open_clip

    register_toy_clip_config()
    with _quiet_random_init():
        return open_clip.create_model(CLIP_MODEL_NAME, pretrained=None)


class ToyClipPreprocess:
    """Float images in [0, 1] (B, 3, 32, 32) → the toy CLIP's input, normalised with the mean and std
    of the model's open_clip preprocess config. No resizing: the toy CLIP sees 32×32 as generated."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def for_model(cls, model: nn.Module) -> "ToyClipPreprocess":
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        return cls(cfg["mean"], cfg["std"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return (images.float() - self.mean.to(images.device)) / self.std.to(images.device)


def clip_state_dict_for_file(model: nn.Module, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state dict as stored: fp16, and only the token-embedding rows of ``token_ids``.

    The toy grammar uses ~20 of the BPE vocabulary's 49,408 tokens; storing the other rows would make
    the file ~10× larger (6.9 MB, not 0.65 MB). They are restored as zeros by ``clip_state_dict_from_file``,
    so words outside the grammar embed as zeros: the toy CLIP scores toy captions only.
    """
    sd = {k: v.detach().half() for k, v in model.state_dict().items()}
    sd["token_embedding.weight"] = sd["token_embedding.weight"][token_ids]
    sd["token_embedding.ids"] = token_ids.long()
    return sd


def clip_state_dict_from_file(tensors: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Inverse of ``clip_state_dict_for_file``: fp32 tensors with a full (vocab_size, width) embedding."""
    sd = {k: v.float() for k, v in tensors.items() if k != "token_embedding.ids"}
    rows = sd["token_embedding.weight"]
    full = torch.zeros(vocab_size, rows.shape[1])
    full[tensors["token_embedding.ids"].long()] = rows
    sd["token_embedding.weight"] = full
    return sd


Tokenizer = Callable[[list[str]], torch.Tensor]  # open_clip tokenizer: captions → (N, context_length) int64


def load_toy_clip(path: str | Path | None = None) -> tuple[nn.Module, ToyClipPreprocess, Tokenizer]:
    """(model, preprocess, tokenizer) of the trained toy CLIP; the model is fp32, eval, frozen.

    ``preprocess(images in [0, 1]) -> model input``; ``tokenizer(list[str]) -> (N, 16) int64``
    (open_clip's ``SimpleTokenizer``). Score with ``model.encode_image(preprocess(x), normalize=True)``
    and ``model.encode_text(tokenizer(texts), normalize=True)``, as with any open_clip model.

    Args:
        path: a file written by ``train_evaluators.train_clip``; None means the shipped asset.

    Raises:
        MissingWeightsError: the file does not exist.
    """
    import open_clip

    path = Path(path) if path is not None else default_clip_path()
    _require_file(path, "toy CLIP weights")
    tensors, _ = _read_safetensors(path)
    model = build_toy_clip()
    sd = clip_state_dict_from_file(tensors, vocab_size=model.token_embedding.num_embeddings)
    model.load_state_dict(sd, strict=True)
    model = model.eval().requires_grad_(False)
    return model, ToyClipPreprocess.for_model(model), open_clip.get_tokenizer(CLIP_MODEL_NAME)


# ----------------------------------------------------------------------------------------------------
# What the toy backbone declares to the eval layer (``ToyBackbone.evaluators``; cdmbench.types.Evaluators).


@functools.lru_cache(maxsize=4)
def fid_features(device: str = "cpu"):
    """The toy FID feature space: ``ShapeClassifier.features`` and the shipped reference statistics, which
    must come from the same classifier file (``extractor_sha256``). One per device and process: every
    feature-space metric shares the extractor (and a batch's features, ``FeatureSet.update``)."""
    import numpy as np

    from cdmbench.eval.metrics.fid import FIDFeatures, ReferenceStats

    clf = load_toy_classifier().to(device).eval()

    def shipped_reference() -> ReferenceStats:
        mu, sigma, meta = load_toy_fid_reference()
        meta = dict(meta or {})
        sha = meta.get("extractor_sha256")
        if sha is not None and sha != file_sha256(default_classifier_path()):
            raise CdmbenchError(
                "the shipped toy FID reference was computed with another toy classifier file; rebuild the assets"
            )
        name = f"toy-shipped:{meta.get('version', 'unversioned')}"
        mu, sigma = (np.asarray(t.detach().cpu().double().numpy(), np.float64) for t in (mu, sigma))
        return ReferenceStats(mu, sigma, name, meta.get("n"), meta)

    return FIDFeatures(lambda images: clf.features(images.to(device)),
                       f"toy-classifier-features-{clf.num_features}|float64", shipped_reference)


def clip_model(device: str = "cpu"):
    """The toy CLIP as the CLIP score's model (no resizing: it sees 32×32 as generated)."""
    from cdmbench.eval.metrics.clip_score import ClipModel

    model, preprocess, tokenizer = load_toy_clip()
    return ClipModel(model.to(device), preprocess, tokenizer, "toy-clip")


def attribute_model(device: str = "cpu"):
    """The toy classifier as attribute accuracy's predictor: (B, 4) labels ordered as ``shapes.ATTRIBUTES``,
    checked against the labels ``Prompt.meta[ATTRS]`` of the toy prompts."""
    from cdmbench.eval.metrics.attr_acc import AttributeModel

    clf = load_toy_classifier().to(device).eval()
    return AttributeModel(lambda images: attribute_predictions(clf, images.to(device)), "toy-classifier",
                          len(ATTRIBUTES))
