"""The verdict report from synthetic rows and per-item data: seeds aggregated, paired verdicts, compact
ranks, compute table, header facts, hidden n/a metrics, empty-cell reasons once; bench run naming."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from cdmbench.errors import CdmbenchError  # noqa: E402
from cdmbench.eval.items import load_items, save_items  # noqa: E402
from cdmbench.eval.metrics.base import MetricResult  # noqa: E402
from cdmbench.eval.results import append_rows  # noqa: E402
from cdmbench.reports import build_report  # noqa: E402
from cdmbench.reports.aggregate import aggregate  # noqa: E402
from cdmbench.reports.tables import load_results  # noqa: E402

ITEMS = [(f"p{i}", s) for i in range(40) for s in range(2)]  # 80 items
NAN = float("nan")


class FakeMetric:
    def __init__(self, name, protocol):
        self.name, self.protocol = name, protocol


def row(run, method, steps, value, seed, *, status="ok", metric="acc", tflops=1.0, step=8, ckpt="abc"):
    return {"run": run, "method": method, "arch": "toy", "steps": steps, "metric": metric, "value": value,
            "ci_low": NAN, "ci_high": NAN, "n": len(ITEMS), "higher_is_better": True,
            "protocol": f"{metric}|v1" if status == "ok" else "", "nfe": steps, "sigmas_nominal": [1.0],
            "sigmas_effective": [1.0], "guidance": 1.0, "checkpoint": f"step sha256:{ckpt * 4}",
            "timestamp": "2026-12-01T00:00:00", "status": status, "train_seed": seed, "train_step": step,
            "train_tflops": tflops, "train_teacher_fwd": 100, "train_minutes": 0.5, "global_batch": 16}


@pytest.fixture
def eval_dir(tmp_path):
    """good > same == twin at 1 step (2 seeds each); 'dmdlike' skipped at 2 steps; an n/a metric; a
    teacher row; an older checkpoint of 'good' for the curve."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, len(ITEMS))
    rows = []
    for seed in (0, 1):
        for run_method, shift in (("good", 0.2), ("same", 0.0), ("twin", 0.0)):
            run = f"{run_method}-toy-s{seed}"
            values = base + shift + rng.normal(0, 0.01, len(ITEMS))
            save_items(tmp_path, run, 1, FakeMetric("acc", "acc|v1"), MetricResult(values.mean(), values, len(ITEMS)),
                       ITEMS, "abc" * 4 + "0" * 52)
            rows.append(row(run, run_method, 1, values.mean(), seed, tflops=2.0 if run_method == "good" else 1.0))
            rows.append(row(run, run_method, 1, NAN, seed, status="not_applicable: natural images only", metric="hps"))
            rows.append(row(run, run_method, 2, NAN, seed, status=f"skipped: {run_method} cannot sample with 2 steps"))
        rows.append(row(f"good-toy-s{seed}", "good", 1, 0.3, seed, tflops=1.0, step=4))  # older checkpoint: no items
    t = base + 0.1
    for steps in (1, 28):
        save_items(tmp_path, "teacher-toy", steps, FakeMetric("acc", "acc|v1"), MetricResult(t.mean(), t, len(ITEMS)),
                   ITEMS, "abc" * 4 + "0" * 52)
        rows.append({**row("teacher-toy", "teacher", steps, t.mean(), None), "train_step": None, "train_tflops": None,
                     "train_teacher_fwd": None, "train_minutes": None, "global_batch": None})
    append_rows(tmp_path / "results.csv", rows)
    (tmp_path / "eval_config.json").write_text('{"prompts": "toy", "seeds": [0, 1], "num_prompts_used": {"toy": 40}}')
    return tmp_path


def test_items_round_trip(tmp_path):
    v = np.arange(len(ITEMS), dtype=float)
    save_items(tmp_path, "r", 1, FakeMetric("acc", "acc|v1"), MetricResult(v.mean(), v, len(ITEMS)), ITEMS, "h")
    it = load_items(tmp_path, "r", 1, "acc")
    assert it.items == tuple(ITEMS) and (it.data == v).all() and it.statistic == "mean" and it.checkpoint == "h"
    assert load_items(tmp_path, "r", 2, "acc") is None


def test_aggregate_cells_pairs_and_ranks(eval_dir):
    agg = aggregate(load_results(eval_dir / "results.csv"), eval_dir)
    c = agg.cells.set_index(["label", "steps", "metric"])
    assert c.loc[("good", 1, "acc"), "n_seeds"] == 2 and c.loc[("good", 1, "acc"), "interval"] == "hierarchical bootstrap"
    assert c.loc[("good", 1, "acc"), "train_tflops"] == 2.0  # the latest checkpoint, not the older one
    p = agg.pairs.set_index(["a", "b"])
    assert p.loc[("good", "same"), "verdict"] == "better" and p.loc[("same", "twin"), "verdict"] == "tie"
    assert p.loc[("good", "same"), "diff"] == pytest.approx(0.2, abs=0.01)
    ranks = agg.ranks.set_index("label")["rank"].to_dict()
    assert ranks == {"good": 1, "same": 2, "twin": 2}  # teacher: never ranked
    curve = agg.curves[agg.curves["label"] == "good"]
    assert list(curve["train_step"]) == [4, 8] and list(curve["train_tflops"]) == [1.0, 2.0]


def test_report_sections(eval_dir, tmp_path):
    report = build_report(eval_dir / "results.csv", tmp_path / "rep", argv=["cdmbench", "report"])
    text = report.read_text()
    assert "| **command** | cdmbench report |" in text
    assert "| **training seeds** | 0-1 |" in text and "| **global batch** | 16 |" in text
    assert "| **k (training seeds per cell)** | 2 |" in text and "(k=1)" not in text
    assert "| **prompt set** | toy: 40 prompts |" in text and "| **seeds per prompt** | 0-1 |" in text
    assert "hps ↑" not in text and "n/a" not in text  # not applicable anywhere on the toy: hidden, named once
    assert text.count("natural images only") == 1 and "Left out, as they do not apply to this backbone: hps" in text
    assert text.count("cannot sample with 2 steps") == 3  # once per method, not under every table
    assert "| good vs same | ▲ +0.2" in text and "| same vs twin | = " in text
    assert "| good | 1 (" in text and "| teacher | ref (" in text
    assert "### Training compute" in text and "| good | 1 | good-toy-s0, good-toy-s1 | 2 | 8 | 2 |" in text
    assert "| good | 1 | 1 | 80 | **0.7" in text  # bold = rank 1
    for f in ("results.csv", "tables/pairs.csv", "tables/ranks.csv", "tables/cells.csv", "plots/toy_acc_vs_compute.png"):
        assert (tmp_path / "rep" / f).is_file(), f
    assert len(pd.read_csv(tmp_path / "rep" / "results.csv")) == len(pd.read_csv(eval_dir / "results.csv"))


def test_small_n_warning(eval_dir, tmp_path):
    text = build_report(eval_dir / "results.csv", tmp_path / "rep").read_text()
    assert "warning" not in text  # 80 items: enough for a per-image mean
    df = pd.read_csv(eval_dir / "results.csv")
    df["n"] = 10
    df.to_csv(eval_dir / "small.csv", index=False)
    text = build_report(eval_dir / "small.csv", tmp_path / "rep2").read_text()
    assert "acc at n = 10 < 30" in text


def test_bench_runs_one_per_seed_and_step_count_for_phase_methods():
    from cdmbench.bench import bench_config, bench_runs

    runs = bench_runs("toy", ["dmd2", "cd"], [1, 2, 4], [0, 1], {"train.steps": "40"})
    names = [r.name for r in runs]
    assert names == ["dmd2-toy-s0", "dmd2-toy-s1", "cd-toy-phases1-s0", "cd-toy-phases2-s0", "cd-toy-phases4-s0",
                     "cd-toy-phases1-s1", "cd-toy-phases2-s1", "cd-toy-phases4-s1"]
    cfg = bench_config(runs[3], "toy")
    assert cfg.method_config.phases == 2 and cfg.train.seed == 0 and cfg.train.steps == 40
    assert cfg.train.checkpoint_every == 10 and cfg.train.keep_checkpoints == 4
    three = bench_config(runs[3], "toy", curve_checkpoints=3)
    assert three.train.checkpoint_every == 14 and three.train.keep_checkpoints == 3


def test_budget_config_lets_the_budget_stop_the_run_and_spaces_checkpoints_in_compute():
    from cdmbench.bench import BUDGET_STEPS_FACTOR, bench_runs, budget_config, budget_tag

    run = bench_runs("toy", ["cdm"], [1], [2])[0]
    cfg = budget_config(run, "toy", 3.0)
    assert cfg.train.steps == BUDGET_STEPS_FACTOR * 400  # cdm's toy preset: 400 iterations
    assert cfg.train.budget_tflops == 3.0 and cfg.train.checkpoint_every_tflops == 0.75
    assert cfg.train.checkpoint_every == cfg.train.steps and cfg.train.keep_checkpoints == 4 and cfg.train.seed == 2
    capped = budget_config(bench_runs("toy", ["cdm"], [1], [0], {"train.steps": "7"})[0], "toy", 3.0, 2)
    assert capped.train.steps == 7 and capped.train.checkpoint_every_tflops == 1.5  # an explicit --set wins
    assert budget_tag(3.3904672194559997) == "3.39tf"
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CdmbenchError, match="budget_tflops must be a positive number"):
            budget_config(run, "toy", bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"reference": "cdm", "budget_tflops": 2.0}, "--reference and --budget-tflops both set the matched budget"),
    ({"reference": "cd"}, "--reference: 'cd' is not a benched method; valid: cdm, dmd2"),
    ({"budget_tflops": -2.0}, "--budget-tflops: expected a positive number"),
    ({"budget_tflops": float("nan")}, "--budget-tflops: expected a positive number"),
])
def test_bench_protocol_errors_name_the_option_before_anything_is_written(kwargs, match, tmp_path):
    from cdmbench.bench import run_bench

    with pytest.raises(CdmbenchError, match=re.escape(match)):
        run_bench("toy", ["cdm", "dmd2"], [1], tmp_path / "ws", tmp_path / "rep", [0], ["cdmbench"], **kwargs)
    assert not (tmp_path / "ws").exists() and not (tmp_path / "rep").exists()


def test_curves_come_from_the_runs_scored_at_several_checkpoints():
    from cdmbench.reports.aggregate import _curves

    rows = []
    for run, seed, steps_kept in (("a-s0", 0, (10, 20, 30)), ("a-s1", 1, (30,)), ("b-s0", 0, (5, 10)), ("b-s1", 1, (10,))):
        for st in steps_kept:
            rows.append({"arch": "toy", "label": run[0], "run": run, "steps": 1, "metric": "fid", "status": "ok",
                         "train_step": st, "train_tflops": st / 10, "train_seed": seed, "value": float(st + seed)})
    curves = _curves(pd.DataFrame(rows))
    assert set(zip(curves["label"], curves["train_step"])) == {("a", 10), ("a", 20), ("a", 30), ("b", 5), ("b", 10)}
    assert set(curves["seeds"]) == {"0"} and set(curves["n_seeds"]) == {1}
    assert curves.loc[(curves["label"] == "a") & (curves["train_step"] == 30), "value"].item() == 30.0  # seed 0 only
    latest_only = _curves(pd.DataFrame([r for r in rows if r["train_step"] == 30]))
    assert set(latest_only["seeds"]) == {"0,1"}  # no run has a curve: every run's point, over its seeds


def _plain_rows(rows, tmp_path, name="results.csv"):
    append_rows(tmp_path / name, rows)
    return tmp_path / name


def test_a_method_trained_per_step_count_is_one_row_without_leaked_skip_notes(tmp_path):
    """CD-like: one run per step count, each sampling only its own; its other rows say "cannot sample"."""
    rows = []
    for run, own in (("cd-toy-phases1-s0", 1), ("cd-toy-phases2-s0", 2)):
        for steps in (1, 2):
            if steps == own:
                rows.append(row(run, "cd", steps, 0.5 + steps / 10, 0))
                rows.append(row(run, "cd", steps, NAN, 0, status="not_applicable: natural images only", metric="hps"))
            else:
                for metric in ("acc", "hps"):
                    rows.append(row(run, "cd", steps, NAN, 0, status=f"skipped: cd cannot sample with {steps} steps; "
                                    f"supported: {own}", metric=metric))
    rows.append(row("dmd-toy-s0", "dmd", 1, 0.4, 0))
    rows.append(row("dmd-toy-s0", "dmd", 1, NAN, 0, status="not_applicable: natural images only", metric="hps"))
    for metric in ("acc", "hps"):
        rows.append(row("dmd-toy-s0", "dmd", 2, NAN, 0, status="skipped: dmd cannot sample with 2 steps; supported: 1",
                        metric=metric))
    text = build_report(_plain_rows(rows, tmp_path), tmp_path / "rep", argv=["cdmbench", "report"]).read_text()
    assert "| cd | 1 | 1 | 80 | **0.600** | 1 |" in text and "| cd | 2 | 2 | 80 | 0.700 | 1 |" in text  # one row each
    assert "cd cannot sample" not in text  # covered by the run trained for that step count
    assert "hps ↑" not in text and "n/a" not in text  # n/a everywhere it was sampled: hidden, despite dmd's skip
    assert text.count("natural images only") == 1
    assert "- dmd, 2 steps: skipped — dmd cannot sample with 2 steps; supported: 1" in text


def test_one_step_reads_as_one_step(tmp_path):
    rows = [row("a-toy-s0", "a", 2, 0.5, 0), row("a-toy-s0", "a", 1, NAN, 0,
                                                  status="skipped: a cannot sample with 1 steps; supported: 2")]
    text = build_report(_plain_rows(rows, tmp_path), tmp_path / "rep").read_text()
    assert "cannot sample with 1 step;" in text and "1 steps" not in text


def test_the_teacher_is_never_bold(tmp_path):
    """The teacher has the best value in every cell; bold goes to the best student only."""
    rows = []
    for steps in (1, 2):
        rows.append({**row("teacher-toy", "teacher", steps, 0.99, None), "train_step": None, "train_tflops": None,
                     "train_teacher_fwd": None, "train_minutes": None, "global_batch": None})
        rows.append(row("a-toy-s0", "a", steps, 0.6, 0))
        rows.append(row("b-toy-s0", "b", steps, 0.5, 0))
    text = build_report(_plain_rows(rows, tmp_path), tmp_path / "rep").read_text()
    teacher_lines = [ln for ln in text.splitlines() if ln.startswith("| teacher |")]
    assert len(teacher_lines) == 3 and not any("**" in ln for ln in teacher_lines)  # summary ×2, acc table
    assert "| a | 1 | 1 | 80 | **0.600** |" in text and "| b | 1 | 1 | 80 | 0.500 |" in text
    assert "| a | **0.600** | **0.600** |" in text


def test_small_n_warning_names_the_set_metric_threshold(tmp_path):
    rows = [{**row("a-toy-s0", "a", 1, 50.0, 0, metric="fid"), "n": 100, "higher_is_better": False},
            {**row("b-toy-s0", "b", 1, 60.0, 0, metric="fid"), "n": 100, "higher_is_better": False},
            {**row("a-toy-s0", "a", 1, 0.5, 0), "n": 400}]
    text = build_report(_plain_rows(rows, tmp_path), tmp_path / "rep").read_text()
    assert "| **warning: small n** | fid at n = 100 < 300, the least for a set-level metric" in text
    assert "acc at n" not in text  # 400 items: enough for a per-image mean


def test_cli_report_writes_the_header(eval_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cdmbench.cli import app

    out = tmp_path / "cli-rep"
    monkeypatch.setattr("sys.argv", ["cdmbench", "report", "--results", "r.csv"])  # what the header shows
    res = CliRunner().invoke(app, ["report", "--results", str(eval_dir / "results.csv"), "--out", str(out)])
    assert res.exit_code != 0 and "no image manifest" in res.output  # the grid needs the images: one line
    res = CliRunner().invoke(app, ["report", "--results", str(eval_dir / "results.csv"), "--out", str(out), "--no-grid"])
    assert res.exit_code == 0, res.output
    text = (out / "report.md").read_text()
    for fact in ("command", "versions", "date", "n (eval items per cell)", "prompt set", "seeds per prompt",
                 "training seeds", "global batch"):
        assert f"| **{fact}** |" in text, fact
    assert "report --results" in text and "| **n (eval items per cell)** | 80 |" in text


def test_bench_log_sums_every_invocation(eval_dir):
    import json
    import time

    from cdmbench.bench import bench_log
    from cdmbench.reports.markdown import report_facts

    first = bench_log(eval_dir, time.time() - 120, ["good-toy-s0"], 10)
    assert first.startswith("2.0 (this invocation), 2.0 (all 1 invocations")
    second = bench_log(eval_dir, time.time() - 6, [], 0)  # a re-run that only rebuilds the report
    assert second.startswith("0.1 (this invocation), 2.1 (all 2 invocations")
    lines = [json.loads(x) for x in (eval_dir / "bench_log.jsonl").read_text().splitlines()]
    assert lines[0]["runs_trained"] == ["good-toy-s0"] and lines[0]["images_generated"] == 10
    assert set(lines[1]) == {"start", "end", "minutes", "runs_trained", "images_generated"}
    facts = report_facts(load_results(eval_dir / "results.csv"), eval_dir, ["cdmbench", "report"])
    assert facts["wall minutes"] == "2.1 (all 2 bench invocations into this workspace)"
