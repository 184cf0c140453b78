"""Intra-prompt LPIPS diversity: the mean LPIPS distance (Zhang et al., 2018) between the images of one
prompt drawn from different seeds, averaged over prompts (DMD2's and the CDM code's ``intra_lpips``).

LPIPS comes from the ``lpips`` package (v0.1 linear heads, which ship in its wheel) on an ImageNet trunk
(AlexNet by default) whose torchvision weights are read from a local file: nothing is downloaded when
HF_HUB_OFFLINE=1. Each image's normalised trunk activations are computed once and every pair of the
prompt is scored from them, with the same arithmetic as ``lpips.LPIPS.forward``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import torch

from cdmbench.errors import CdmbenchError, MissingWeightsError

LPIPS_NETS = ("alex", "squeeze", "vgg")
# torchvision's ImageNet weights of each trunk (the files ``lpips`` would download through torchvision)
TRUNK_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}
LPIPS_TRUNK_ENV = "CDMBENCH_LPIPS_TRUNK_PATH"


def _lpips():
    try:
        import lpips
    except ImportError as e:
        raise CdmbenchError("intra-prompt LPIPS needs the `lpips` package: pip install lpips==0.1.4") from e
    return lpips


def trunk_file(net: str) -> str:
    return TRUNK_URLS[net].rsplit("/", 1)[1]


def resolve_trunk(path: str | None, net: str) -> Path:
    """The torchvision weights of the LPIPS trunk: ``path`` (file or folder holding the file), else torch's
    hub cache (``torch.hub.get_dir()/checkpoints``), downloaded there once unless HF_HUB_OFFLINE=1."""
    from cdmbench.eval.metrics.base import offline

    name = trunk_file(net)
    how = f"download {TRUNK_URLS[net]} and pass lpips_trunk_path= (the file or its folder) or set ${LPIPS_TRUNK_ENV}"
    if path is not None:
        p = Path(path).expanduser()
        p = p / name if p.is_dir() else p
        if not p.is_file():
            raise MissingWeightsError(f"LPIPS {net} trunk weights not found at {p}; {how}")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        return cached
    if offline():
        raise MissingWeightsError(f"LPIPS {net} trunk weights {name} are not cached (HF_HUB_OFFLINE=1); {how}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(TRUNK_URLS[net], str(cached), progress=False)
    except OSError as e:
        raise MissingWeightsError(f"could not download LPIPS {net} trunk weights ({e}); {how}") from e
    return cached


def build_lpips(net: str = "alex", trunk_state: dict | None = None) -> torch.nn.Module:
    """``lpips.LPIPS`` (v0.1 heads from the wheel) with a random trunk, then ``trunk_state`` loaded into it.

    Args:
        net: one of ``LPIPS_NETS``.
        trunk_state: a torchvision state dict of the trunk (``features.<i>.weight`` keys; the classifier is
            ignored); None keeps the random trunk (tests).
    """
    if net not in LPIPS_NETS:
        raise CdmbenchError(f"lpips net must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
    lpips = _lpips()
    model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, verbose=False)
    if trunk_state is not None:
        by_index = {}
        for name, module in model.net.named_children():  # slice<k> keeps torchvision's feature indices
            for idx, _ in module.named_children():
                by_index[idx] = name
        mapped = {}
        for k, v in trunk_state.items():
            if not k.startswith("features."):
                continue
            idx, rest = k[len("features."):].split(".", 1)
            if idx not in by_index:
                raise CdmbenchError(f"LPIPS {net} trunk weights have an unexpected layer {k!r}")
            mapped[f"{by_index[idx]}.{idx}.{rest}"] = v
        missing, unexpected = model.net.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise CdmbenchError(f"LPIPS {net} trunk weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval().requires_grad_(False)


def load_lpips(net: str = "alex", trunk_path: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """The real LPIPS: v0.1 heads from the ``lpips`` wheel on the ImageNet trunk from ``trunk_path`` /
    $CDMBENCH_LPIPS_TRUNK_PATH / torch's hub cache."""
    path = resolve_trunk(trunk_path if trunk_path is not None else os.environ.get(LPIPS_TRUNK_ENV) or None, net)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return build_lpips(net, state).to(device)


@torch.no_grad()
def lpips_features(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Per trunk layer, unit-normalised activations of images (B, 3, H, W) in [0, 1] (``LPIPS.forward``'s
    ``feats``, with ``normalize=True``)."""
    lpips = _lpips()
    device = next(model.parameters()).device
    x = model.scaling_layer(images.to(device).float() * 2 - 1)
    return [lpips.normalize_tensor(o) for o in model.net.forward(x)]


@torch.no_grad()
def pairwise_lpips(model: torch.nn.Module, feats: list[torch.Tensor], pairs: list[tuple[int, int]]) -> np.ndarray:
    """(P,) LPIPS of image pairs (i, j) from ``lpips_features`` of the same batch (sum over layers of the
    spatial mean of the linear head applied to the squared feature difference)."""
    if not pairs:
        return np.zeros(0)
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    total = 0.0
    for layer, f in enumerate(feats):
        d = (f[i.to(f.device)] - f[j.to(f.device)]).square()
        total = total + model.lins[layer](d).mean(dim=(2, 3), keepdim=True)
    return total.reshape(-1).double().cpu().numpy()


def mean_pairwise_lpips(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean LPIPS over all unordered pairs of the n >= 2 images of one prompt."""
    if images.shape[0] < 2:
        raise CdmbenchError(f"intra-prompt LPIPS needs at least 2 images per prompt, got {images.shape[0]}")
    pairs = list(itertools.combinations(range(images.shape[0]), 2))
    return float(pairwise_lpips(model, lpips_features(model, images), pairs).mean())


# --------------------------------------------------------------------------------------------------
# The registered metric

from typing import Any, ClassVar, Sequence  # noqa: E402

from cdmbench.eval.metrics import METRICS  # noqa: E402
from cdmbench.eval.metrics.base import (  # noqa: E402
    Metric,
    MetricOptions,
    MetricResult,
    PromptLike,
    check_batch,
)
from cdmbench.eval.metrics.sets import MIN_SEEDS, MetricSkipped, per_prompt_result  # noqa: E402
from cdmbench.types import Evaluators  # noqa: E402


@METRICS.register("intra_lpips")
class IntraLPIPS(Metric):
    """Intra-prompt LPIPS (v0.1, AlexNet): mean distance over pairs of one prompt's seeds; mean over prompts.

    A prompt's images must arrive together (the harness feeds them prompt-major); each prompt is scored when
    the next one starts, so only one prompt's images are held.

    Args:
        model: an ``lpips.LPIPS`` module (``build_lpips`` / ``load_lpips``).
        protocol: identity of its weights.
    """

    higher_is_better: ClassVar[bool] = True
    per_image: ClassVar[bool] = True  # one value per prompt

    def __init__(self, model: torch.nn.Module, protocol: str):
        self.model = model.eval()
        self.protocol = f"intra_lpips|{protocol}|all-pairs|per-prompt-mean"
        self.reset()

    def reset(self) -> None:
        self.values: dict[str, float] = {}
        self.sizes: dict[str, int] = {}
        self._prompt: str | None = None
        self._pending: list[torch.Tensor] = []

    def _flush(self) -> None:
        if self._prompt is None:
            return
        images = torch.cat(self._pending)
        self.sizes[self._prompt] = images.shape[0]
        if images.shape[0] >= MIN_SEEDS:
            self.values[self._prompt] = mean_pairwise_lpips(self.model, images)
        self._prompt, self._pending = None, []

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: Sequence[PromptLike]) -> None:
        for i, p in enumerate(p.text for p in check_batch(images, prompts)):
            if p != self._prompt:
                self._flush()
                if p in self.sizes:
                    raise CdmbenchError(f"intra_lpips: the images of prompt {p!r} did not arrive together")
                self._prompt = p
            self._pending.append(images[i:i + 1].detach().float().cpu())

    def compute(self) -> MetricResult:
        self._flush()
        if not self.sizes:
            raise CdmbenchError("IntraLPIPS.compute called before any update")
        fewest = min(self.sizes.values())
        if fewest < MIN_SEEDS:
            raise MetricSkipped(f"needs >= {MIN_SEEDS} seeds per prompt, got {fewest} (e.g. --seeds 0-4)")
        return per_prompt_result(list(self.values.values()), sum(self.sizes.values()))

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"protocol": self.protocol, "values": dict(self.values), "sizes": dict(self.sizes)}

    def merge_state(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self._flush()
        self.values.update(state["values"])
        self.sizes.update(state["sizes"])

    @classmethod
    def tiny(cls, workdir) -> "IntraLPIPS":
        """A random SqueezeNet trunk with the wheel's v0.1 heads (no download)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls(build_lpips("squeeze"), "tiny-random-squeeze")

    @classmethod
    def from_options(cls, evaluators: Evaluators, options: MetricOptions | None = None) -> "IntraLPIPS":
        """``lpips_net`` (default alex) with its ImageNet trunk from ``lpips_trunk_path`` /
        $CDMBENCH_LPIPS_TRUNK_PATH / torch's hub cache."""
        cls._require_applicable(evaluators)
        options = options or MetricOptions()
        model = load_lpips(options.lpips_net, options.lpips_trunk_path, options.device)
        return cls(model, f"lpips-0.1.4|v0.1|{options.lpips_net}")
