"""Fidelity to the teacher: how far a distilled student's samples are from its OWN teacher's.

A plain FID mixes the teacher's error with the distillation's; these two numbers isolate the latter:

- ``teacher_frechet``: the Fréchet distance (Heusel et al., 2017) between features of the student's
  samples and of the teacher's samples at its reference steps and CFG for the same (prompt, seed) items.
  Its floor is the distance between two teacher sets of other seeds (finite-sample bias, falls like 1/n).
- ``paired_feature_distance``: per item, the Euclidean distance between the student's and the teacher's
  features for the same (prompt, seed), i.e. the same initial noise. Meaningful for students distilled to
  follow the teacher's ODE (consistency distillation, DMD's regression pairs); a distribution-matching
  student may land elsewhere on the same mode and still be good.
"""

from __future__ import annotations

import numpy as np

from cdmbench.errors import CdmbenchError
from cdmbench.eval.metrics.fid import frechet_distance


def _features(name: str, f) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise CdmbenchError(f"{name}: expected features (n >= 2, F), got {a.shape}")
    if not np.isfinite(a).all():
        raise CdmbenchError(f"{name}: features are not finite")
    return a


def teacher_frechet(student, teacher) -> float:
    """Fréchet distance between student features (n, F) and teacher features (m, F), float64."""
    s, t = _features("student", student), _features("teacher", teacher)
    if s.shape[1] != t.shape[1]:
        raise CdmbenchError(f"student features have {s.shape[1]} dims, teacher features {t.shape[1]}")
    return frechet_distance(s.mean(0), np.cov(s, rowvar=False), t.mean(0), np.cov(t, rowvar=False))


def paired_feature_distance(student, teacher) -> np.ndarray:
    """(n,) float64 ‖φ(student_i) − φ(teacher_i)‖₂ for row-aligned items (same prompt and seed)."""
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 2:
        raise CdmbenchError(f"paired distance needs row-aligned (n, F) features, got {s.shape} and {t.shape}")
    return np.linalg.norm(s - t, axis=1)


# --------------------------------------------------------------------------------------------------
# The registered metrics. The harness feeds, beside each batch of a row's images, the teacher's images for
# the same (prompt, seed) items at the backbone's reference steps and CFG (``update_teacher``).

from typing import Any, ClassVar  # noqa: E402

import torch  # noqa: E402

from cdmbench.eval.metrics import METRICS  # noqa: E402
from cdmbench.eval.metrics.base import MetricOptions, MetricResult  # noqa: E402
from cdmbench.eval.metrics.sets import Extractor, FeatureSet, MetricSkipped  # noqa: E402


class _TeacherFeatures(FeatureSet):
    needs_teacher: ClassVar[bool] = True
    higher_is_better: ClassVar[bool] = False

    def __init__(self, feature_extractor: Extractor, protocol: str):
        self.feature_extractor = feature_extractor
        self.protocol = f"{self.name}|{protocol}|vs-teacher-at-reference-steps-same-items"
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._teacher: list[np.ndarray] = []

    @torch.no_grad()
    def update_teacher(self, images: torch.Tensor) -> None:
        """The teacher's images (B, 3, H, W) for the items of the matching ``update`` call, in the same order."""
        self._teacher.append(self.extract(images, []))

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.features()
        if not self._teacher:
            raise MetricSkipped("no teacher reference images (evaluate with the teacher at its default steps)")
        t = np.concatenate(self._teacher)
        if t.shape != s.shape:
            raise CdmbenchError(f"{self.name}: {s.shape[0]} student items but {t.shape[0]} teacher items")
        return s, t

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["teacher"] = np.concatenate(self._teacher) if self._teacher else np.zeros((0, 0))
        return state

    def merge_state(self, state: dict[str, Any]) -> None:
        super().merge_state(state)
        if len(state["teacher"]):
            self._teacher.append(np.asarray(state["teacher"], dtype=np.float64))

    @classmethod
    def tiny(cls, workdir):
        from cdmbench.eval.metrics.fid import RandomFeatures

        return cls(RandomFeatures(), "random-features")

    @classmethod
    def from_options(cls, evaluators, options: MetricOptions | None = None):
        """The FID feature space ``evaluators`` declares, else clean-fid Inception (``fid.feature_extractor_for``)."""
        from cdmbench.eval.metrics.fid import feature_extractor_for

        cls._require_applicable(evaluators)
        return cls(*feature_extractor_for(evaluators, options or MetricOptions()))


@METRICS.register("teacher_fd")
class TeacherFD(_TeacherFeatures):
    """Fréchet distance of the row's images to the teacher's at its reference steps and CFG (same items, FID features)."""

    per_image: ClassVar[bool] = False

    def compute(self) -> MetricResult:
        s, t = self.pairs()
        return MetricResult(value=teacher_frechet(s, t), per_image=None, n=s.shape[0])


@METRICS.register("teacher_dist")
class TeacherDistance(_TeacherFeatures):
    """Per item, L2 distance in FID features to the teacher's image from the same noise (reference steps and CFG)."""

    per_image: ClassVar[bool] = True

    def compute(self) -> MetricResult:
        s, t = self.pairs()
        d = paired_feature_distance(s, t)
        return MetricResult(value=float(d.mean()), per_image=d, n=int(d.size))
