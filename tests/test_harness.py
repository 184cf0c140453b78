"""The eval harness on the toy: batch- and shard-independent images, resumable phases, status rows, bad input."""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdmbench.errors import CdmbenchError
from cdmbench.eval.harness import EvalConfig, generate, row_sources, run_eval, score
from cdmbench.eval.results import read_results
from cdmbench.run import resolve_config
from cdmbench.train import train
from conftest import tiny_overrides

# Real registry metrics: toy FID and CLIP (set-level and per-image), attribute accuracy, and HPS, which
# does not apply to the toy backbone.
METRICS = ("fid", "clip", "attr_acc", "hps")
BASE = dict(steps=(1, 2, 4), metrics=METRICS, num_prompts=6, seeds=(0, 1), teacher_steps=(2,), progress=False)
EXACT = ["run", "method", "arch", "steps", "metric", "n", "higher_is_better", "protocol", "nfe", "sigmas_nominal",
         "sigmas_effective", "guidance", "checkpoint", "status"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny toy models: one intra-op thread avoids oversubscribing a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Finished tiny runs of cdm (any step count), dmd (supported_steps = (1,), a ClassVar) and cd
    (supported_steps = (phases,), a property), plus a cdm run killed before its last iteration."""
    ws = tmp_path_factory.mktemp("ws")
    for name in ("cdm", "dmd", "cd"):
        train(resolve_config(name, "toy", tiny_overrides(name)), ws / "runs" / f"{name}-toy", progress=False)
    cfg = resolve_config("cdm", "toy", tiny_overrides("cdm", steps=4))
    train(cfg, ws / "runs" / "cdm-unfinished", progress=False, stop_after=2)
    return ws


@pytest.fixture(scope="module")
def reference(workspace):
    """A straight single-process eval at batch size 16."""
    cfg = EvalConfig(workspace=str(workspace), runs=("cd-toy", "cdm-toy", "dmd-toy"), out=str(workspace / "ref"),
                     batch_size=16, **BASE)
    return cfg, read_results(run_eval(cfg))


def pngs(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(Image.open(p)).astype(int) for p in sorted((out / "images").rglob("*.png"))}


def assert_same_images(a: Path, b: Path):
    """Identical up to float rounding: CPU GEMM kernels depend on the batch size, so a pixel may differ by
    one level where a value sits on a rounding boundary (so scores agree to about 1e-4 relative)."""
    ia, ib = pngs(a), pngs(b)
    assert ia.keys() == ib.keys() and ia
    diff = np.stack([np.abs(ia[k] - ib[k]) for k in ia])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def assert_same_rows(df_a, df_b):
    a = df_a.sort_values(["run", "steps", "metric"]).reset_index(drop=True)
    b = df_b.sort_values(["run", "steps", "metric"]).reset_index(drop=True)
    assert a[EXACT].astype(str).equals(b[EXACT].astype(str))
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-3, atol=1e-6, equal_nan=True)


def test_rows_cover_runs_teacher_skips_and_not_applicable(reference):
    cfg, df = reference
    assert len(df) == (1 + 3 * 3) * len(METRICS)  # teacher at 2 steps + 3 runs × 3 step counts
    by = {(r.run, r.steps, r.metric): r for r in df.itertuples()}
    t = by[("teacher-toy", 2, "fid")]
    assert t.method == "teacher" and t.guidance == 4.0 and t.nfe == 4 and t.status == "ok"  # CFG counts twice
    assert json.loads(t.sigmas_nominal) == [1.0, 0.5] and json.loads(t.sigmas_effective) == [1.0, 0.75]
    assert by[("dmd-toy", 2, "clip")].status == "skipped: dmd cannot sample with 2 steps; supported: 1"
    assert by[("cd-toy", 1, "fid")].status.startswith("skipped: cd cannot sample with 1 steps; supported: 4")
    assert by[("cd-toy", 4, "fid")].status == "ok" and by[("dmd-toy", 1, "fid")].status == "ok"
    assert all(r.status.startswith("not_applicable: ") for r in df.itertuples() if r.metric == "hps" and r.steps == 1
               and r.run != "cd-toy")
    ok = df[df.status == "ok"]
    assert (ok.n == 12).all() and ok.value.notna().all()
    assert ok[ok.metric == "clip"].ci_low.notna().all() and ok[ok.metric == "fid"].ci_low.isna().all()
    assert "sha256:" in by[("cdm-toy", 1, "fid")].checkpoint
    manifest = [json.loads(line) for line in (Path(cfg.out) / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 12 * (1 + 3 + 1 + 1)  # teacher@2, cdm@1,2,4, dmd@1, cd@4
    rec = manifest[0]
    assert {"run", "method", "arch", "checkpoint", "steps", "sigmas_nominal", "sigmas_effective", "guidance", "nfe",
            "prompt_id", "prompt", "seed", "resolution", "path"} <= rec.keys()
    assert rec["path"] == f"images/{rec['run']}/{rec['steps']}/{rec['prompt_id']}_s{rec['seed']}.png"


def test_images_and_scores_do_not_depend_on_batch_size(workspace, reference):
    cfg, df = reference
    one = dataclasses.replace(cfg, batch_size=1, out=str(workspace / "bs1"))
    rows = read_results(run_eval(one))
    assert_same_images(Path(cfg.out), Path(one.out))
    assert_same_rows(df, rows)


def test_sharded_generation_gives_the_single_process_rows(workspace, reference):
    cfg, df = reference
    sharded = dataclasses.replace(cfg, out=str(workspace / "sharded"))
    n0 = generate(sharded, process_index=0, num_processes=2)
    n1 = generate(sharded, process_index=1, num_processes=2)
    assert n0 == n1 == 36
    assert_same_images(Path(cfg.out), Path(sharded.out))
    assert_same_rows(df, read_results(score(sharded)))


def test_a_killed_generation_resumes_with_only_the_missing_images(workspace, reference):
    cfg, df = reference
    killed = dataclasses.replace(cfg, out=str(workspace / "killed"), batch_size=4)

    class Kill(Exception):
        pass

    def die_after(k):
        seen = []

        def hook(record):
            seen.append(record["path"])
            if len(seen) == k:
                raise Kill

        return hook, seen

    hook, first = die_after(7)  # after the second batch's lines (a batch of 4 is appended at once), mid-hooks
    with pytest.raises(Kill):
        run_eval(killed, on_image=hook)
    assert not (Path(killed.out) / "results.csv").exists()
    mtimes = {p: os.stat(Path(killed.out) / p).st_mtime_ns for p in first}
    again = []
    path = run_eval(killed, on_image=lambda r: again.append(r["path"]))
    assert len(again) == 72 - 8 and not set(again) & set(first)  # the 8th image's line was written with its batch
    assert all(os.stat(Path(killed.out) / p).st_mtime_ns == t for p, t in mtimes.items())
    assert_same_rows(df, read_results(path))

    before = (Path(killed.out) / "results.csv").read_bytes()
    none = []
    run_eval(killed, on_image=lambda r: none.append(r))
    assert none == [] and (Path(killed.out) / "results.csv").read_bytes() == before  # finished: nothing new


def test_a_killed_scoring_resumes_with_the_same_rows(workspace, reference, monkeypatch):
    cfg, df = reference
    out = workspace / "killed-score"
    shutil.copytree(cfg.out, out, ignore=shutil.ignore_patterns("cache", "results.csv*"))
    again = dataclasses.replace(cfg, out=str(out))
    from cdmbench.eval.metrics import METRICS as REGISTRY

    fid = REGISTRY.get("fid")
    calls = []
    original = fid.compute

    def flaky(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(fid, "compute", flaky)
    with pytest.raises(KeyboardInterrupt):
        score(again)
    partial = read_results(out / "results.csv")
    assert 0 < len(partial) < len(df)
    monkeypatch.setattr(fid, "compute", original)
    assert_same_rows(df, read_results(run_eval(again)))


def test_unfinished_run_is_evaluated_at_its_latest_checkpoint(workspace):
    cfg = EvalConfig(workspace=str(workspace), runs=("cdm-unfinished",), steps=(1,), metrics=("attr_acc",),
                     num_prompts=2, teacher=False, out=str(workspace / "unfinished"), progress=False)
    row = read_results(run_eval(cfg)).iloc[0]
    assert row.status == "ok" and "step_0000002" in row.checkpoint and "unfinished run" in row.checkpoint


def test_default_sources_every_run_and_teacher_at_its_own_steps(workspace):
    sources = row_sources(EvalConfig(workspace=str(workspace), steps=(1, 2), progress=False))
    assert [s.name for s in sources] == ["teacher-toy", "cd-toy", "cdm-toy", "cdm-unfinished", "dmd-toy"]
    assert sources[0].method == "teacher" and sources[0].steps == (1, 2, 28)  # --steps plus default_teacher_steps
    assert all(s.steps == (1, 2) for s in sources[1:])
    only = row_sources(EvalConfig(workspace=str(workspace / "empty"), arch="toy", progress=False))
    assert [s.name for s in only] == ["teacher-toy"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": (0, 1)}, r"steps: every value must be an integer >= 1, got 0"),
        ({"steps": ()}, r"steps: expected a non-empty tuple"),
        ({"seeds": (-1,)}, r"seeds: every value must be an integer >= 0"),
        ({"metrics": ("fid", "nosuchmetric")}, r"metrics: unknown metric 'nosuchmetric'; valid metrics: aesthetic, attr_acc, clip, "),
        ({"batch_size": 0}, r"batch_size must be a positive integer"),
        ({"num_prompts": 0}, r"num_prompts must be a positive integer"),
        ({"arch": "sdxl"}, r"arch: unknown backbone 'sdxl'; valid backbones: .*toy"),
        ({"external": ("nopath",)}, r"external: expected NAME=PATH_OR_ID"),
        ({"device": "gpu0"}, r"device: 'gpu0' is not a torch device"),
    ],
)
def test_bad_config_fails_at_construction(kwargs, message):
    with pytest.raises(CdmbenchError, match=message):
        EvalConfig(**kwargs)


def test_bad_inputs_fail_with_a_clear_message(workspace, tmp_path):
    available = "available runs: cd-toy, cdm-toy, cdm-unfinished, dmd-toy"
    with pytest.raises(CdmbenchError, match=f"runs: no trained run 'cdm-sd3' .*{available}"):
        run_eval(EvalConfig(workspace=str(workspace), runs=("cdm-sd3",), progress=False))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CdmbenchError, match="prompt file .*empty.txt is empty"):
        run_eval(EvalConfig(workspace=str(workspace), runs=("cdm-toy",), prompts=str(empty), progress=False))
    with pytest.raises(CdmbenchError, match="nothing to evaluate: no trained runs"):
        run_eval(EvalConfig(workspace=str(tmp_path / "nowhere"), progress=False))
    with pytest.raises(CdmbenchError, match="num_prompts: 500 requested but prompt set 'default' has 96"):
        run_eval(EvalConfig(workspace=str(workspace), runs=("cdm-toy",), num_prompts=500, progress=False))


def test_bench_keeps_finished_runs_and_reports_command_versions_and_times(workspace, tmp_path):
    import shutil

    from cdmbench.bench import run_bench

    bench_ws = tmp_path / "bench-ws"  # the bench names its runs <method>-<arch>-s<train seed>
    for name in ("cdm", "dmd"):
        shutil.copytree(workspace / "runs" / f"{name}-toy", bench_ws / "runs" / f"{name}-toy-s0")
    workspace = bench_ws
    argv = ["/venv/bin/cdmbench", "bench", "--methods", "cdm,dmd", "--steps", "1"]
    report = run_bench("toy", ["cdm", "dmd"], [1], workspace, workspace / "report", [0], argv,
                       num_prompts=4, teacher_steps=(1,), metrics=("attr_acc", "hps"), progress=False)
    text = report.read_text()
    assert "cdmbench bench --methods cdm,dmd --steps 1" in text
    for package in ("cdmbench", "torch", "diffusers", "transformers"):
        assert package in text
    assert "eval minutes" in text and "kept" in text and "(all 1 invocations into this workspace" in text
    assert "global batch (processes × batch × accumulation)" in text and "(1 × 2 × 1), lr student" in text
    df = read_results(workspace / "eval" / "bench-toy" / "results.csv")
    assert set(df.run) == {"teacher-toy", "cdm-toy-s0", "dmd-toy-s0"}


def test_matched_bench_trains_every_method_to_the_reference_compute(tmp_path):
    """--reference dmd2: dmd2 at its (tiny) preset, cdm from scratch to dmd2's mean compute;
    one eval folder named by the budget; curves from training seed 0 only; the header says the protocol."""
    from cdmbench.bench import budget_tag, run_bench
    from cdmbench.io import read_json

    ws = tmp_path / "ws"
    over = {"train.steps": "2", "train.batch_size": "2", "warmup": "0", "train.log_every": "1"}
    report = run_bench("toy", ["dmd2", "cdm"], [1], ws, tmp_path / "report", [0], ["cdmbench", "bench"],
                       train_seeds=[0, 1], reference="dmd2", overrides=over, num_prompts=4,
                       teacher_steps=(1,), metrics=("attr_acc",), progress=False)
    budget = sum(read_json(ws / "runs" / f"dmd2-toy-s{s}" / "done.json")["compute"]["train_tflops"]
                 for s in (0, 1)) / 2
    tag = budget_tag(budget)
    for s in (0, 1):
        done = read_json(ws / "runs" / f"cdm-toy-s{s}-{tag}" / "done.json")
        spent, per_iter = done["compute"]["train_tflops"], done["compute"]["train_tflops"] / done["steps"]
        assert done["stopped_by"] == f"budget_tflops={budget!r}" and budget <= spent < budget + per_iter
    df = read_results(ws / "eval" / f"bench-toy-{tag}" / "results.csv")
    assert set(df.run) == {"teacher-toy", "dmd2-toy-s0", "dmd2-toy-s1", f"cdm-toy-s0-{tag}", f"cdm-toy-s1-{tag}"}
    kept = df[df.status == "ok"].groupby("run")["train_step"].nunique()
    assert kept["dmd2-toy-s0"] == 2 and kept["dmd2-toy-s1"] == 1  # every kept checkpoint of seed 0 only
    text = report.read_text()
    assert f"every method trained to **{budget:.3g} TFLOPs**" in text and "the mean of **dmd2**" in text
    assert "iterations (mean per run)" in text and "dmd2 2" in text
