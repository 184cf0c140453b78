"""Metric contract over every registered metric, each on its own tiny instance (``Metric.tiny``: random or
dummy models, no downloads); the checks are ``cdmbench.testing.METRIC_CHECKS``."""

import copy

import pytest

from cdmbench.eval.metrics import METRICS
from cdmbench.testing import METRIC_CHECKS


@pytest.fixture(scope="module", params=METRICS.names())
def factory(request, tmp_path_factory):
    cls, workdir = METRICS.get(request.param), tmp_path_factory.mktemp(request.param)
    try:
        pristine = cls.tiny(workdir)
    except ImportError as e:  # an optional scorer package that is not installed
        pytest.skip(f"{request.param}: {e}")
    return lambda: copy.deepcopy(pristine)  # a fresh instance, without rebuilding its models


@pytest.mark.parametrize("check", METRIC_CHECKS, ids=lambda f: f.__name__.removeprefix("check_metric_"))
def test_metric_contract(factory, check):
    check(factory)
