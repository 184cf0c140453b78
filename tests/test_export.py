"""Exported students load as stock diffusers pipelines and reproduce cdmbench's own few-step sampling."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from tiny_pipelines import LONGCAT_RES, TEXT_LEN, perturb_, tiny_longcat_dir, tiny_sd3_dir  # noqa: F401 (fixtures)

from cdmbench.backbones import build_backbone
from cdmbench.backbones.base import BackboneOptions
from cdmbench.errors import CdmbenchError
from cdmbench.export import LORA_WEIGHT_NAME, STUDENT_FILE, export_student, load_exported_pipeline
from cdmbench.sampling import Denoiser, sample_euler

PROMPT = "a red circle"
STEPS = (1, 2, 4)


def _sd3(folder, **kw):
    return build_backbone("sd3", BackboneOptions(model=str(folder), max_sequence_length=TEXT_LEN, **kw))


def _student(backbone, only=None):
    """A trained-looking student: the trainable copy with seeded noise, loaded back from its state dict."""
    state = backbone.net_state_dict(perturb_(backbone.trainable_copy(), scale=0.05, only=only))
    return backbone.load_net(state), state


def _assert_pipeline_matches(backbone, student, pipe, record):
    cond = backbone.encode_prompts([PROMPT])
    for n in STEPS:
        schedule = backbone.schedule(n)
        assert record["schedules"][str(n)] == {"nominal": list(schedule.nominal), "effective": list(schedule.effective)}
        noise = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(n))
        ours = sample_euler(Denoiser(backbone, student, cond), noise, schedule.sigmas())
        call = record["calls"][str(n)]
        assert call["guidance_scale"] == 1.0 and call["num_inference_steps"] == n
        theirs = pipe(PROMPT, latents=noise, output_type="latent", **call).images
        assert torch.equal(pipe.scheduler.sigmas.cpu(), schedule.sigmas())  # exactly cdmbench's float32 σ
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=2e-5)
        teacher = sample_euler(Denoiser(backbone, backbone.teacher, cond), noise, schedule.sigmas())
        assert (teacher - ours).abs().max() > 1e-3  # the student really differs from the base


def pipe_config(folder):
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def sd3_full(tiny_sd3_dir):
    return _sd3(tiny_sd3_dir)


def test_sd3_full_student_round_trips_through_the_stock_pipeline(sd3_full, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    student, state = _student(sd3_full)
    schedules = {n: sd3_full.schedule(n) for n in STEPS}
    out = export_student(sd3_full, state, tmp_path / "student", schedules, {"run": "test", "ema": True})
    assert out == tmp_path / "student" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    record = json.loads((out / STUDENT_FILE).read_text())
    assert record["weights"] == "full" and record["meta"] == {"run": "test", "ema": True}
    assert record["scheduler"]["shift"] == 3.0 and record["pipeline_class"] == "StableDiffusion3Pipeline"
    assert pipe_config(out)["shift"] == 1.0 and pipe_config(out)["stochastic_sampling"] is False
    assert "guidance_scale=1.0" in (out / "README.md").read_text()
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    _assert_pipeline_matches(sd3_full, student, pipe, record)


def test_sd3_export_is_strict_and_atomic(sd3_full, tiny_sd3_dir, tmp_path):
    schedules = {4: sd3_full.schedule(4)}
    teacher_state = sd3_full.net_state_dict(sd3_full.teacher)
    with pytest.raises(CdmbenchError, match="equal the base"):
        export_student(sd3_full, teacher_state, tmp_path / "same", schedules, {})
    _, state = _student(sd3_full)
    with pytest.raises(CdmbenchError, match="do not match"):
        export_student(sd3_full, {k: v for k, v in state.items() if not k.startswith("proj_out")},
                       tmp_path / "partial", schedules, {})
    with pytest.raises(CdmbenchError, match="lora_rank"):
        export_student(sd3_full, state, tmp_path / "lora", schedules, {}, lora_mode="lora")
    with pytest.raises(CdmbenchError, match="shift"):
        export_student(sd3_full, state, tmp_path / "shift", {2: sd3_full.schedule(2).__class__((1.0, 0.5), (1.0, 0.5))}, {})
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    first = export_student(sd3_full, state, tmp_path / "s", schedules, {"n": 1})
    with pytest.raises(CdmbenchError, match="already exists"):
        export_student(sd3_full, state, first, schedules, {})
    export_student(sd3_full, state, first, schedules, {"n": 2}, overwrite=True)
    assert json.loads((first / STUDENT_FILE).read_text())["meta"] == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.fixture(scope="module")
def sd3_lora(tiny_sd3_dir):
    return _sd3(tiny_sd3_dir, lora_rank=4, lora_alpha=8)


@pytest.mark.parametrize("lora_mode", ["merge", "lora"])
def test_sd3_lora_student_exports_merged_or_as_lora_file(sd3_lora, lora_mode, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    student, state = _student(sd3_lora, only="lora_B")
    out = export_student(sd3_lora, state, tmp_path / lora_mode, {n: sd3_lora.schedule(n) for n in STEPS}, {},
                         lora_mode=lora_mode)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert (out / LORA_WEIGHT_NAME).exists() == (lora_mode == "lora")
    if lora_mode == "lora":
        pipe.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
    else:
        assert not any("lora" in k for k in pipe.transformer.state_dict())
    record = json.loads((out / STUDENT_FILE).read_text())
    assert record["weights"] == {"merge": "lora_merged", "lora": "lora"}[lora_mode] and record["lora_alpha"] == 8
    _assert_pipeline_matches(sd3_lora, student, pipe, record)


def test_sd3_untrained_lora_is_refused(sd3_lora, tmp_path):
    state = sd3_lora.net_state_dict(sd3_lora.trainable_copy())  # lora_B = 0
    with pytest.raises(CdmbenchError, match="equals the base"):
        export_student(sd3_lora, state, tmp_path / "x", {1: sd3_lora.schedule(1)}, {}, lora_mode="lora")


def test_longcat_merged_export_round_trips(tiny_longcat_dir, tmp_path):
    bb = build_backbone("longcat", BackboneOptions(model=str(tiny_longcat_dir), resolution=LONGCAT_RES,
                                                   max_sequence_length=TEXT_LEN, lora_rank=2))
    student, state = _student(bb, only="lora_B")
    out = export_student(bb, state, tmp_path / "lc", {n: bb.schedule(n) for n in STEPS}, {})
    pipe, record = load_exported_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    assert record["scheduler"]["use_dynamic_shifting"] and record["call_kwargs"]["enable_prompt_rewrite"] is False
    _assert_pipeline_matches(bb, student, pipe, record)
    with pytest.raises(CdmbenchError, match="load_lora_weights"):
        export_student(bb, state, tmp_path / "lc_lora", {1: bb.schedule(1)}, {}, lora_mode="lora")
