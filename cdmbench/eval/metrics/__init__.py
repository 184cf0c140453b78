"""The metric registry (style.md principles 5, 9, 10).

``METRICS.get(name)`` is a ``Metric`` class; ``build_metric(name, evaluators, options)`` builds it with
the models a backbone declares (``Backbone.evaluators()``) or the real defaults. Importing this package
imports each metric module to register it; no metric module imports open_clip, torchmetrics, clean-fid,
transformers or image-reward at import time, and none imports a backbone.
"""

from __future__ import annotations

from cdmbench.registry import Registry
from cdmbench.types import Evaluators

METRICS: Registry = Registry("metric", entry_point_group="cdmbench.metrics")
register = METRICS.register

from cdmbench.eval.metrics.base import (  # noqa: E402
    Applicability,
    Metric,
    MetricOptions,
    MetricResult,
    PerImageMetric,
    bootstrap_ci,
)
from cdmbench.eval.metrics import (  # noqa: E402,F401  (register)
    aesthetic, attr_acc, clip_score, detail, factor_coverage, fid, hps, image_reward, lpips_div, pickscore, prdc,
    teacher_fd, vendi,
)


def build_metric(name: str, evaluators: Evaluators | None = None, options: MetricOptions | None = None) -> Metric:
    """The registered metric ``name`` with the models ``evaluators`` declares (None: the real defaults); loads
    weights, and nothing is downloaded unless the user opted in (``base.downloads_allowed``)."""
    from cdmbench.eval.metrics.base import no_downloads_unless_allowed

    with no_downloads_unless_allowed():
        return METRICS.get(name).from_options(evaluators or Evaluators(), options)


__all__ = [
    "METRICS", "register", "build_metric", "Applicability", "Metric", "MetricOptions", "MetricResult",
    "PerImageMetric", "bootstrap_ci",
]
