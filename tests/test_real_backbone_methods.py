"""Every registered method trains for two iterations on tiny local SD3 and LongCat pipelines (loaded
through the same from_pretrained path as a hub id), with a tiny local image–caption folder as the real
training data (DMD2's GAN, CD), and is evaluated at 1 and 2 steps, all offline. The CLIP score runs
through the real open_clip code path with a local checkpoint."""

import subprocess
import sys

import pytest
import torch

from cdmbench.backbones.base import BackboneOptions
from cdmbench.methods import METHODS
from cdmbench.run import resolve_config
from cdmbench.train import train
from conftest import tiny_overrides
from tiny_data import make_image_caption_folder
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
    data = make_image_caption_folder(tmp_path / "images", n=5)
    extra = {"cd": {"phases": "2"}, "dmd": {"regression_distance": "mse"}}
    for name in METHODS.names():
        overrides = {**tiny_overrides(name, steps=2, **extra.get(name, {})), "train.prompts": str(prompts),
                     "train.data": str(data), "train.mixed_precision": "no",
                     "backbone.gradient_checkpointing": "false"}
        cfg = resolve_config(name, arch, overrides, options)
        train(cfg, tmp_path / "ws" / "runs" / f"{name}-{arch}", progress=False)
    dmd2 = resolve_config("dmd2", arch, overrides={}, backbone_options=options).method_config
    assert dmd2.gan_weight > 0  # the DMD2 run above trained its GAN head on the folder's images

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


def test_dmd2_gan_and_cd_read_the_image_folder_on_tiny_sd3(tiny_sd3_dir, tmp_path, monkeypatch):  # noqa: F811
    """Two iterations each; the latents the GAN discriminator and CD see are the folder's images, encoded by
    the SD3 VAE (``ImageCaptionSource.next`` is where they come from)."""
    from cdmbench.data import ImageCaptionSource

    data = make_image_caption_folder(tmp_path / "images", n=5)
    seen = []
    real = ImageCaptionSource.next
    monkeypatch.setattr(ImageCaptionSource, "next", lambda self, n: seen.append(n) or real(self, n))
    options = BackboneOptions(model=str(tiny_sd3_dir), resolution=32, max_sequence_length=TEXT_LEN)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    for name, extra in (("dmd2", {"update_ratio": "1"}), ("cd", {"phases": "2"})):
        seen.clear()
        cfg = resolve_config(name, "sd3", {**tiny_overrides(name, steps=2, **extra), "train.data": str(data),
                                           "train.mixed_precision": "no", "backbone.gradient_checkpointing": "false",
                                           "train.prompts": str(tmp_path / "p.txt")}, options)
        ckpt = train(cfg, tmp_path / "runs" / name, progress=False)
        assert ckpt.name == "step_0000002" and seen == [2, 2], (name, seen)


def test_dmd2_gan_without_real_data_is_one_clear_line(tiny_sd3_dir, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"  # sd3 has no training prompts of its own (checked first)
    prompts.write_text("a red apple\na blue car\n")
    res = subprocess.run([sys.executable, "-m", "cdmbench.cli", "train", "dmd2", "--arch", "sd3", "--model",
                          str(tiny_sd3_dir), "--workspace", str(tmp_path), "--set", "backbone.resolution=32",
                          "--set", f"train.prompts={prompts}"],
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                              "PYTHONPATH": ":".join(sys.path)})
    assert res.returncode == 2, res.stderr[-2000:]
    # what is left after the loading progress bars of diffusers / transformers (the weights did load)
    lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "dmd2 (gan_weight > 0) needs real training images" in lines[0] and "--set train.data=PATH" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_sd3_without_weights_is_one_clear_line(tmp_path):
    prompts = tmp_path / "prompts.txt"  # sd3 has no training prompts of its own (checked first)
    prompts.write_text("a red apple\na blue car\n")
    res = subprocess.run([sys.executable, "-m", "cdmbench.cli", "train", "cdm", "--arch", "sd3", "--workspace",
                          str(tmp_path), "--set", f"train.prompts={prompts}"], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "stabilityai/stable-diffusion-3-medium-diffusers" in lines[0]
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()
