"""The run folder (``cdmbench.run.RunDir``) and the resolved run config: one home for both."""

import dataclasses

import pytest

from cdmbench.backbones import BACKBONES
from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.run import RunDir, resolve_config
from cdmbench.train import train
from conftest import tiny_overrides


def test_a_trained_run_folder_reads_back_through_run_dir(tmp_path):
    cfg = resolve_config("cdm", "toy", tiny_overrides("cdm", steps=2))
    rd = RunDir.named(tmp_path, "r")
    assert not rd.exists and not rd.finished and rd.latest_checkpoint() is None
    with pytest.raises(CdmbenchError, match="config.json not found"):
        RunDir.find("r", tmp_path)
    with pytest.raises(CdmbenchError, match="no checkpoint yet"):
        rd.weights()
    final = train(cfg, rd.path, progress=False)
    # the saved config is the one that ran: the device accelerate chose (the library default is None: its choice)
    ran = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, device="cpu"))
    assert rd.exists and rd.finished and rd.config() == ran and cfg.backbone.device is None
    assert rd.config_dict()["world_size"] == 1 and "as_run" in rd.config_dict()
    assert rd.latest_checkpoint() == final and rd.checkpoint_meta(final)["step"] == 2
    assert rd.weights().name == "student_ema.safetensors" and rd.weights(which="raw").name == "student.safetensors"
    assert rd.train_minutes() is not None and rd.train_minutes() >= 0
    assert rd.metrics_csv.is_file()
    assert [r.name for r in RunDir.in_workspace(tmp_path)] == ["r"]
    assert RunDir.find("r", tmp_path).path == RunDir.find(rd.path, "elsewhere").path == rd.path
    with pytest.raises(CdmbenchError, match="'ema' or 'raw'"):
        rd.weights(which="best")


@pytest.mark.parametrize("arch", BACKBONES.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_backbone_training_defaults_reach_every_method(method, arch):
    """Precision, checkpointing and batch come from the backbone; a method's preset and --set go on top."""
    defaults = BACKBONES.get(arch).training_defaults
    cfg = resolve_config(method, arch)
    preset = METHODS.get(method).presets.get(arch, {})
    for key, value in defaults.items():
        group, field = key.split(".", 1)
        if key not in preset:
            got = getattr(cfg.train if group == "train" else cfg.backbone, field)
            assert str(got).lower() == value.lower(), key
    assert resolve_config(method, arch, {"train.mixed_precision": "no"}).train.mixed_precision == "no"


def test_no_method_preset_repeats_a_backbone_fact():
    facts = ("train.mixed_precision", "backbone.gradient_checkpointing")
    for name, cls in METHODS.items():
        for arch, preset in cls.presets.items():
            assert not set(preset) & set(facts), f"{name}'s {arch} preset sets {set(preset) & set(facts)}"
