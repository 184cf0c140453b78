"""Registries: errors listing valid names, plug-ins through entry points, the README example."""

import re
import sys
import textwrap
from pathlib import Path

import pytest

from cdmbench.errors import CdmbenchError, UnknownNameError
from cdmbench.registry import Registry


def test_unknown_name_lists_valid_ones():
    reg = Registry("widget")
    reg.register("a")(object)
    reg.register("b")(dict)
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; valid widgets: a, b"):
        reg.get("c")
    with pytest.raises(CdmbenchError, match="twice"):
        reg.register("a")(list)


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    pkg = tmp_path / "myplugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("class Thing:\n    pass\n")
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cdmbench.test_things]\nthing = myplugin:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("thing", entry_point_group="cdmbench.test_things")
    assert reg.names() == ["thing"] and reg.is_plugin("thing")
    assert reg.get("thing").__name__ == "Thing"


def test_readme_adding_a_method_example_runs(toy, tmp_path):
    """The README's "Adding a method" example is real code: register it, train it, sample it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 25 <= len(code.strip().splitlines()) <= 60
    namespace: dict = {}
    exec(compile(code, "README-example", "exec"), namespace)
    from cdmbench.methods import METHODS
    from cdmbench.run import resolve_config
    from cdmbench.train import train

    assert "flowdistill" in METHODS.names()
    cfg = resolve_config("flowdistill", "toy", {"train.steps": "2", "train.batch_size": "2"})
    ckpt = train(cfg, tmp_path / "run", progress=False)
    assert (ckpt / "student_ema.safetensors").exists()
    import torch

    method = METHODS.get("flowdistill")(toy, cfg.method_config, training=False)
    x = method.sample(torch.randn(1, *toy.latent_shape), toy.encode_prompts(["a small red circle in the top left"]), 2)
    assert torch.isfinite(x).all()
    METHODS._entries.pop("flowdistill")
