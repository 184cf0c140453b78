"""The metric registry (style.md principles 5, 9, 10).

``METRICS.get(name)`` is a ``Metric`` class; ``build_metric(name, backbone_name, options)`` builds it
with the real or toy model. Importing this package imports each metric module to register it, and no
metric module imports open_clip, torchmetrics, clean-fid, transformers or image-reward at import time.
"""

from __future__ import annotations

from cdmbench.registry import Registry

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


def build_metric(name: str, backbone_name: str, options: MetricOptions | None = None) -> Metric:
    """The registered metric ``name`` with the model for ``backbone_name`` (loads weights; nothing is
    downloaded unless the user opted in, ``base.downloads_allowed``)."""
    from cdmbench.eval.metrics.base import no_downloads_unless_allowed

    with no_downloads_unless_allowed():
        return METRICS.get(name).from_options(backbone_name, options)


__all__ = [
    "METRICS", "register", "build_metric", "Applicability", "Metric", "MetricOptions", "MetricResult",
    "PerImageMetric", "bootstrap_ci",
]
