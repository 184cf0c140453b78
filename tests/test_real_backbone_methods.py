"""Every registered method trains for two iterations on tiny local SD3 and LongCat pipelines (loaded
through the same from_pretrained path as a hub id) and is evaluated at 1 and 2 steps, all offline.
The CLIP score runs through the real open_clip code path with a local checkpoint."""

import subprocess
import sys

import pytest
import torch

from cdmbench.backbones.base import BackboneOptions
from cdmbench.methods import METHODS
from cdmbench.train import resolve_config, train
from conftest import tiny_overrides
from tiny_pipelines import TEXT_LEN, tiny_longcat_dir, tiny_sd3_dir  # noqa: F401

PROMPTS = ["a red apple on a table", "a blue car in the rain", "a cat wearing a hat", "a green mountain lake"]


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    from cdmbench.toy import evaluators

    model, _, _ = evaluators.load_toy_clip()
    path = tmp_path_factory.mktemp("clip") / "tiny_open_clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("arch", ["sd3", "longcat"])
def test_every_method_trains_and_evaluates_on_a_tiny_pipeline(arch, request, tmp_path, clip_checkpoint, monkeypatch):
    from cdmbench.eval.harness import EvalConfig, run_eval
    from cdmbench.eval.results import read_results
    from cdmbench.toy.evaluators import CLIP_MODEL_NAME, register_toy_clip_config

    folder = request.getfixturevalue(f"tiny_{arch}_dir")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    options = BackboneOptions(model=str(folder), resolution=32, max_sequence_length=TEXT_LEN)
    extra = {"cd": {"phases": "2"}, "dmd": {"regression_distance": "mse"}}
    for name in METHODS.names():
        overrides = {**tiny_overrides(name, steps=2, **extra.get(name, {})), "train.prompts": str(prompts),
                     "train.mixed_precision": "no", "backbone.gradient_checkpointing": "false"}
        cfg = resolve_config(name, arch, overrides, options)
        train(cfg, tmp_path / "ws" / "runs" / f"{name}-{arch}", progress=False)

    register_toy_clip_config()
    monkeypatch.setenv("CDMBENCH_CLIP_MODEL", CLIP_MODEL_NAME)
    monkeypatch.setenv("CDMBENCH_CLIP_PRETRAINED", str(clip_checkpoint))
    res = run_eval(EvalConfig(workspace=str(tmp_path / "ws"), steps=(1, 2), metrics=("clip",), prompts=str(prompts),
                              seeds=(0,), teacher_steps=(2,), progress=False))
    df = read_results(res)
    for name in METHODS.names():
        rows = df[df.method == name]
        assert sorted(rows.steps) == [1, 2], name
        for _, r in rows.iterrows():
            if r.status == "ok":
                assert 0 <= r.value <= 100 and r.n == len(PROMPTS) and "open_clip:" in r.protocol
            else:
                assert r.status.startswith("skipped:") and (name, r.steps) in {("dmd", 2), ("cd", 1)}
    assert (df[df.method == "teacher"].status == "ok").all()


def test_sd3_without_weights_is_one_clear_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cdmbench.cli", "train", "cdm", "--arch", "sd3", "--workspace",
                          str(tmp_path)], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "stabilityai/stable-diffusion-3-medium-diffusers" in lines[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()
