"""Adapter contract over every registered backbone, each on its own tiny instance (``Backbone.tiny``: the real
diffusers adapters on tiny local pipelines); the checks are ``cdmbench.testing.BACKBONE_CHECKS``."""

import pytest

from cdmbench.backbones import BACKBONES
from cdmbench.testing import BACKBONE_CHECKS


@pytest.fixture(scope="module", params=BACKBONES.names())
def backbone(request, tmp_path_factory):
    return BACKBONES.get(request.param).tiny(tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("check", BACKBONE_CHECKS, ids=lambda f: f.__name__.removeprefix("check_backbone_"))
def test_backbone_contract(backbone, check):
    check(backbone)
