"""An exported student works in stock diffusers, as its model card says (issue 13, item 1).

cdm and dmd2 train two iterations on the tiny SD3 pipeline, ``cdmbench export`` writes the folders, and a fresh
Python process that never imports cdmbench reads the calls from the model card (README.md: the Python code
blocks, cross-checked with the card's YAML header), runs them with stock ``StableDiffusion3Pipeline`` on the
noise cdmbench sampled from, and counts the transformer's forward passes. The images must equal cdmbench's
sampler (``Method.sample``, the harness's path) on the same noise. DMD2 re-noises between steps: the stock
pipeline draws that noise from torch's global generator (it does not pass ``generator=`` to the scheduler),
so the child seeds it as the card says — ``torch.manual_seed(s)``, latents drawn first — which on the CPU, one
image per call, gives exactly the draws of cdmbench's per-image generator seeded ``s``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pipelines import TEXT_LEN, tiny_sd3_dir  # noqa: F401 (fixture)
from typer.testing import CliRunner

from cdmbench.backbones import build_backbone
from cdmbench.backbones.base import BackboneOptions
from cdmbench.cli import app
from cdmbench.methods import METHODS
from cdmbench.run import RunDir, resolve_config
from cdmbench.seeding import StackedGenerator
from cdmbench.train import train
from conftest import tiny_overrides

PROMPT = "a red apple on a table"
STEPS = (1, 2, 4)
METHOD_NAMES = ("cdm", "dmd2")
SEED = {1: 11, 2: 12, 4: 14}  # the generator seed of each step count's image

# The child process: stock diffusers only. It takes the calls from the card's code blocks (literals only,
# parsed with ast, never executed) and checks them against the card's YAML header.
CHILD = r'''
import ast, json, re, sys
import torch
from diffusers import StableDiffusion3Pipeline
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

jobs, prompt = json.loads(sys.argv[1]), sys.argv[2]


def run(folder, refs_path, out_path):
    text = open(f"{folder}/README.md").read()
    calls, loads = {}, []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe":
                kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                calls[kw["num_inference_steps"]] = kw
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                loads.append([k.arg for k in node.keywords])
    header = ModelCard.load(f"{folder}/README.md").data.to_dict()["cdmbench"]
    assert {int(k): v for k, v in header["calls"].items()} == calls, (header["calls"], calls)
    assert loads == [[]], loads  # the card loads the folder with no extra options
    stochastic = header["stochastic_sampling"]
    seeded = "torch.manual_seed(" in text
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls_made, rows = [0], [0]  # transformer forward calls, and latent rows through them (CFG doubles the batch)

    def count(module, args, kwargs):
        calls_made[0] += 1
        rows[0] += kwargs["hidden_states"].shape[0]

    pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    refs = load_file(refs_path)
    images, report = {}, {"calls": {}, "rows": {}, "stochastic": stochastic, "card_seeds": seeded,
                          "scheduler": dict(pipe.scheduler.config)}
    for n, kw in sorted(calls.items()):
        seed = int(refs[f"seed_{n}"])
        torch.manual_seed(seed)  # as the card says: seed torch's global generator, then draw the latents from it
        latents = torch.randn(refs[f"noise_{n}"].shape)
        assert torch.equal(latents, refs[f"noise_{n}"])  # the same noise cdmbench's per-image generator drew
        calls_made[0] = rows[0] = 0
        images[f"out_{n}"] = pipe(prompt, latents=latents, output_type="latent", **kw).images.contiguous()
        report["calls"][n], report["rows"][n] = calls_made[0], rows[0]
    calls_made[0] = rows[0] = 0
    pipe(prompt, num_inference_steps=1, latents=refs["noise_1"], output_type="latent")  # the pipeline's defaults
    report["default_call"] = [calls_made[0], rows[0]]
    save_file(images, out_path)
    return report


reports = {folder: run(folder, refs, out) for folder, refs, out in jobs}
reports["cdmbench_imported"] = any(m == "cdmbench" or m.startswith("cdmbench.") for m in sys.modules)
print(json.dumps(reports, default=str))
'''


@pytest.fixture(scope="module")
def workspace(tiny_sd3_dir, tmp_path_factory):  # noqa: F811
    """cdm and dmd2, two iterations each on tiny SD3 (warm-up 0, so the student moves; the SD3 presets' warm-up
    would leave it equal to the teacher and export would refuse; dmd2 without its GAN, which would need real
    images), then ``cdmbench export`` of each run."""
    ws = tmp_path_factory.mktemp("ws")
    prompts = ws / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na blue car in the rain\n")
    options = BackboneOptions(model=str(tiny_sd3_dir), resolution=32, max_sequence_length=TEXT_LEN)
    # a large student learning rate, so two iterations move the samples far beyond the comparison's tolerance
    extra = {"cdm": {"student_lr": "1e-3"}, "dmd2": {"gan_weight": "0", "student_lr": "1e-3"}}
    for name in METHOD_NAMES:
        overrides = {**tiny_overrides(name, steps=2, **extra.get(name, {})), "train.prompts": str(prompts),
                     "train.mixed_precision": "no", "backbone.gradient_checkpointing": "false"}
        train(resolve_config(name, "sd3", overrides, options), ws / "runs" / name, progress=False)
        res = CliRunner().invoke(app, ["export", name, "--workspace", str(ws), "--out", str(ws / "exported" / name)])
        assert res.exit_code == 0, res.output  # warm-up 0: the student moved, so export does not refuse
    return ws


def _cdmbench_samples(run_dir, out_path):
    """cdmbench's own sampler (``Method.sample`` with the run's EMA student, as the eval harness runs it) and
    the same sampler with the untrained student (= the teacher's weights), per step count."""
    cfg = RunDir(run_dir).config()
    backbone = build_backbone(cfg.arch, cfg.backbone)
    method = METHODS.get(cfg.method)(backbone, cfg.method_config, training=False)
    untrained = METHODS.get(cfg.method)(backbone, cfg.method_config, training=False)
    method.nets["student"] = backbone.load_net(load_file(str(RunDir(run_dir).weights(which="ema"))))
    cond = backbone.encode_prompts([PROMPT])
    tensors, teacher = {}, {}
    for n in STEPS:
        rng = StackedGenerator([SEED[n]])
        noise = rng.randn(tuple(backbone.latent_shape))
        rng_teacher = StackedGenerator([SEED[n]])
        rng_teacher.randn(tuple(backbone.latent_shape))
        tensors[f"noise_{n}"], tensors[f"seed_{n}"] = noise, torch.tensor(SEED[n])
        tensors[f"ours_{n}"] = method.sample(noise, cond, n, rng)
        teacher[n] = untrained.sample(noise, cond, n, rng_teacher)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_path))
    return tensors, teacher, method


def test_the_model_cards_call_in_stock_diffusers_reproduces_cdmbench(workspace, tmp_path):
    ours, teacher, methods, jobs = {}, {}, {}, []
    for name in METHOD_NAMES:
        refs = tmp_path / f"{name}-refs.safetensors"
        ours[name], teacher[name], methods[name] = _cdmbench_samples(workspace / "runs" / name, refs)
        jobs.append([str(workspace / "exported" / name), str(refs), str(tmp_path / f"{name}-stock.safetensors")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs), PROMPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    assert reports.pop("cdmbench_imported") is False  # the child ran stock diffusers only
    for (folder, _, stock_path), name in zip(jobs, METHOD_NAMES):
        report, method = reports[folder], methods[name]
        assert report["scheduler"]["shift"] == 1.0 and report["scheduler"]["use_dynamic_shifting"] is False
        assert report["stochastic"] is report["scheduler"]["stochastic_sampling"] is method.stochastic_sampling
        assert report["card_seeds"] is method.stochastic_sampling  # the card tells DMD2 users to seed torch
        # the transformer runs once per step on the one image: no CFG pass (which would double the rows)
        assert report["calls"] == report["rows"] == {str(n): n for n in STEPS}, name
        assert report["default_call"] == [1, 2]  # the counter sees CFG: the stock defaults run [uncond; cond]
        stock = load_file(stock_path)
        for n in STEPS:
            torch.testing.assert_close(stock[f"out_{n}"], ours[name][f"ours_{n}"], rtol=1e-4, atol=2e-5,
                                       msg=lambda m: f"{name}, {n} steps: {m}")
            assert (teacher[name][n] - ours[name][f"ours_{n}"]).abs().max() > 1e-2, (name, n)  # the student moved
        record = json.loads((workspace / "exported" / name / "cdmbench_student.json").read_text())
        assert record["meta"]["method"] == name and record["training"]["train_step"] == 2
        assert record["calls"]["4"]["sigmas"] == [1.0, 0.9, 0.75, 0.5]  # nominal [1, .75, .5, .25] after shift 3


def test_the_card_states_the_training_record_from_the_run(workspace):
    from huggingface_hub import ModelCard

    card = ModelCard.load(workspace / "exported" / "dmd2" / "README.md")
    cfg = RunDir(workspace / "runs" / "dmd2").config()
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "dmd2" in card.data.tags and card.data.cdmbench["steps"] == list(STEPS)
    text = card.text
    assert f"| training seed | {cfg.train.seed} |" in text and f"| global batch | {cfg.train.batch_size} |" in text
    assert "| iterations | 2 of 2 planned, finished |" in text and "TFLOPs |" in text
    assert "stochastic_sampling: true" in text and "not drawn from the same place" in text
    cdm = ModelCard.load(workspace / "exported" / "cdm" / "README.md").text
    assert "Deterministic sampling" in cdm and "torch.manual_seed" not in cdm


def test_push_to_hub_offline_is_one_line_before_anything_is_written(workspace, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = workspace / "exported" / "pushed"
    res = CliRunner().invoke(app, ["export", "cdm", "--workspace", str(workspace), "--out", str(out),
                                   "--push-to-hub", "someone/cdm-student"])
    assert res.exit_code == 2 and not out.exists()
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "offline" in lines[0] and "hf upload someone/cdm-student" in lines[0], res.output
    res = CliRunner().invoke(app, ["export", "cdm", "--workspace", str(workspace), "--out", str(out),
                                   "--push-to-hub", "not a repo//"])
    assert res.exit_code == 2 and "repository id" in res.output and not out.exists()
