"""Set-level and per-prompt metrics: shared state for metrics that need a whole image set (PRDC, the
teacher Fréchet distance) or every seed of a prompt together (Vendi, intra-prompt LPIPS, free-factor
coverage).

A metric that cannot give a meaningful number for the images it saw (e.g. one seed per prompt for a
diversity metric) raises ``MetricSkipped`` from ``compute``; the harness writes a "skipped: <reason>" row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.eval.metrics.base import Metric, MetricResult, PromptLike, check_batch
from cdmbench.types import ATTRS, Prompt

MIN_SEEDS = 2  # seeds per prompt a per-prompt diversity metric needs (the step-sweep default gives 5)


class MetricSkipped(CdmbenchError):
    """``compute`` has no meaningful value for these images; the message is the one-line reason."""


@dataclass(frozen=True)
class ReferenceImages:
    """Real images of a given prompt (what ``Evaluators.references`` loads), e.g. the toy's real renders.

    Args:
        render: (prompt, n) → (n, 3, H, W) float [0, 1] real images of that prompt, deterministic per prompt.
        per_prompt: how many a per-prompt reference uses by default.
        name: identity for the protocol string, e.g. "real-renders".
    """

    render: Callable[[Prompt, int], torch.Tensor]
    per_prompt: int
    name: str


_BATCH: dict = {}  # the last batch of images: (extract, extractor id) → (extractor, its features)


class FeatureSet(Metric):
    """Accumulates per-image feature rows (``self.extract(images, prompts) -> (B, F)``) with their prompt
    texts and attribute labels (``Prompt.meta[ATTRS]`` or None); subclasses implement ``compute`` from
    ``self.features()``, ``self.prompts`` and ``self.attrs``."""

    per_image: ClassVar[bool] = False

    def reset(self) -> None:
        self._feats: list[np.ndarray] = []
        self.prompts: list[str] = []
        self.attrs: list[tuple | None] = []

    def extract(self, images: torch.Tensor, prompts: list[Prompt]) -> np.ndarray:
        """(B, F) features; by default ``self.feature_extractor``'s (the backbone's FID feature space)."""
        return self.feature_extractor(images).detach().double().cpu().numpy()

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: Sequence[PromptLike]) -> None:
        prompts = check_batch(images, prompts)
        # the feature-space metrics (PRDC's four numbers, Vendi, the teacher distances) extract one batch alike
        held = getattr(self, "feature_extractor", self)
        key = (type(self).extract, id(held))
        if _BATCH.get("images") is not images or _BATCH.get("version") != images._version:
            _BATCH.clear()
            _BATCH.update(images=images, version=images._version)
        if key not in _BATCH:
            _BATCH[key] = (held, np.asarray(self.extract(images, prompts), dtype=np.float64))  # held: ids stay
        f = _BATCH[key][1]
        if f.ndim != 2 or f.shape[0] != images.shape[0]:
            raise CdmbenchError(f"{type(self).__name__}: feature extractor returned {f.shape} for {images.shape[0]} images")
        self._feats.append(f)
        self.prompts.extend(p.text for p in prompts)
        self.attrs.extend(None if p.meta.get(ATTRS) is None else tuple(int(v) for v in p.meta[ATTRS]) for p in prompts)

    def features(self) -> np.ndarray:
        if not self._feats:
            raise CdmbenchError(f"{type(self).__name__}.compute called before any update")
        return np.concatenate(self._feats)

    def groups(self) -> dict[str, np.ndarray]:
        """Prompt → indices of its images, in first-seen order."""
        out: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            out.setdefault(p, []).append(i)
        return {p: np.asarray(ix) for p, ix in out.items()}

    def require_seeds(self, minimum: int = MIN_SEEDS) -> dict[str, np.ndarray]:
        """``groups()``, or MetricSkipped when some prompt has fewer than ``minimum`` images."""
        g = self.groups()
        fewest = min(len(ix) for ix in g.values())
        if fewest < minimum:
            raise MetricSkipped(f"needs >= {minimum} seeds per prompt, got {fewest} (e.g. --seeds 0-4)")
        return g

    def state_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "features": self.features() if self._feats else np.zeros((0, 0)),
                "prompts": list(self.prompts), "attrs": list(self.attrs)}

    def merge_state(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        if len(state["prompts"]):
            self._feats.append(np.asarray(state["features"], dtype=np.float64))
            self.prompts.extend(state["prompts"])
            self.attrs.extend(state["attrs"])


def per_prompt_result(values: list[float], n_images: int) -> MetricResult:
    """A result whose interval is the bootstrap over prompts: ``per_image`` holds one value per prompt."""
    v = np.asarray(values, dtype=np.float64)
    return MetricResult(value=float(v.mean()), per_image=v, n=int(n_images))


Extractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float [0, 1] -> (B, F)
