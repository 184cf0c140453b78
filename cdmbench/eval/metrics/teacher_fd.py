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
