"""Results file (schema, atomic append, formats) and the report builder (golden markdown, files)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cdmbench.errors import CdmbenchError  # noqa: E402
from cdmbench.eval.results import RESULT_COLUMNS, append_rows, read_results  # noqa: E402
from cdmbench.reports import build_report, markdown, tables  # noqa: E402

NAN = float("nan")


def row(run, method, steps, metric, value, hib, ci=None, status="ok", protocol=None, arch="toy"):
    return {
        "run": run, "method": method, "arch": arch, "steps": steps, "metric": metric, "value": value,
        "ci_low": NAN if ci is None else value - ci, "ci_high": NAN if ci is None else value + ci, "n": 64,
        "higher_is_better": hib, "protocol": protocol if protocol is not None else (f"{metric}|v1" if status == "ok" else ""),
        "nfe": steps, "sigmas_nominal": [1.0, 0.5][:steps], "sigmas_effective": [1.0, 0.25][:steps], "guidance": 1.0,
        "checkpoint": f"runs/{run}/ema.safetensors", "timestamp": "2026-11-25T12:00:00", "status": status,
    }


def fixed_rows() -> list[dict]:
    """Teacher at 28 steps, two students at 1/2/4 steps; FID (lower better), CLIP (higher better),
    ImageReward not applicable, one skipped step count, one superseded row."""
    return [
        row("teach", "teacher", 28, "fid", 2.125, False),
        row("teach", "teacher", 28, "clip", 30.5, True, ci=0.25),
        row("r-cdm", "cdm", 1, "fid", 9.0, False),  # superseded below
        row("r-cdm", "cdm", 1, "fid", 5.5, False),
        row("r-cdm", "cdm", 2, "fid", 3.25, False),
        row("r-cdm", "cdm", 4, "fid", 2.5, False),
        row("r-dmd", "dmd2", 1, "fid", 4.75, False),
        row("r-dmd", "dmd2", 2, "fid", 3.5, False),
        row("r-dmd", "dmd2", 4, "fid", NAN, None, status="skipped: dmd2 supports steps 1, 2"),
        row("r-cdm", "cdm", 1, "clip", 28.0, True, ci=0.5),
        row("r-cdm", "cdm", 2, "clip", 29.25, True, ci=0.375),
        row("r-dmd", "dmd2", 1, "clip", 29.5, True, ci=0.5),
        row("r-dmd", "dmd2", 2, "clip", 28.75, True, ci=0.25),
        row("r-cdm", "cdm", 1, "imagereward", NAN, None, status="not_applicable: rates natural images; toy draws shapes"),
    ]


GOLDEN_SUMMARY = """\
| method | steps | NFE | n | fid ↓ | clip ↑ | imagereward ↑ |
|:--|--:|--:|--:|--:|--:|--:|
| cdm | 1 | 1 | 64 | 5.50 | 28.00 | n/a |
| dmd2 | 1 | 1 | 64 | **4.75** | **29.50** | – |
| cdm | 2 | 2 | 64 | **3.25** | **29.25** | – |
| dmd2 | 2 | 2 | 64 | 3.50 | 28.75 | – |
| cdm | 4 | 4 | 64 | 2.50 | – | – |
| dmd2 | 4 |  |  | skipped | – | – |
| teacher | 28 | 28 | 64 | 2.12 | 30.50 | – |"""

GOLDEN_FID = """\
### fid ↓ — toy

protocol: `fid|v1`

| method | 1 step | 2 steps | 4 steps | 28 steps |
|:--|--:|--:|--:|--:|
| teacher | – | – | – | 2.12 |
| cdm | 5.50 | **3.25** | 2.50 | – |
| dmd2 | **4.75** | 3.50 | skipped | – |

- skipped: dmd2 supports steps 1, 2

![fid vs steps](plots/toy_fid.png)"""

GOLDEN_CLIP = """\
### clip ↑ — toy

protocol: `clip|v1`

| method | 1 step | 2 steps | 28 steps |
|:--|--:|--:|--:|
| teacher | – | – | 30.50 ± 0.25 |
| cdm | 28.00 ± 0.50 | **29.25** ± 0.38 | – |
| dmd2 | **29.50** ± 0.50 | 28.75 ± 0.25 | – |

![clip vs steps](plots/toy_clip.png)"""

GOLDEN_IMAGEREWARD = """\
### imagereward ↑ — toy

| method | 1 step |
|:--|--:|
| cdm | n/a |

- n/a: rates natural images; toy draws shapes"""


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.csv"
    append_rows(path, fixed_rows())
    return path


# --------------------------------------------------------------------------------------------------
# results file


def test_append_is_atomic_and_concatenates(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    append_rows(path, fixed_rows()[:4])
    append_rows(path, fixed_rows()[4:])
    df = read_results(path)
    assert list(df.columns) == list(RESULT_COLUMNS) and len(df) == len(fixed_rows())
    before = path.read_bytes()

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        append_rows(path, fixed_rows()[:1])
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temp file, no lock file left


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_formats_roundtrip_the_same_table(tmp_path, suffix):
    append_rows(tmp_path / f"r{suffix}", fixed_rows())
    df = read_results(tmp_path / f"r{suffix}")
    ref = read_results(_csv(tmp_path))
    pd.testing.assert_frame_equal(df, ref)
    assert df.loc[0, "sigmas_nominal"] == "[1.0, 0.5]" and json.loads(df.loc[2, "sigmas_effective"]) == [1.0]
    assert str(df["steps"].dtype) == "Int64" and str(df["higher_is_better"].dtype) == "boolean"


def _csv(tmp_path):
    p = tmp_path / "ref.csv"
    append_rows(p, fixed_rows())
    return p


def test_rows_are_validated(tmp_path):
    good = fixed_rows()[0]
    with pytest.raises(CdmbenchError, match=r"missing \['status'\]"):
        append_rows(tmp_path / "r.csv", [{k: v for k, v in good.items() if k != "status"}])
    with pytest.raises(CdmbenchError, match=r"unexpected \['extra'\]"):
        append_rows(tmp_path / "r.csv", [{**good, "extra": 1}])
    with pytest.raises(CdmbenchError, match="status must be"):
        append_rows(tmp_path / "r.csv", [{**good, "status": "failed"}])
    with pytest.raises(CdmbenchError, match="must end in one of"):
        append_rows(tmp_path / "r.txt", [good])
    assert not (tmp_path / "r.csv").exists()


# --------------------------------------------------------------------------------------------------
# tables and markdown


def test_golden_markdown(results):
    df = tables.load_results(results)
    ts = tables.metric_tables(df)
    assert [t.key for t in ts] == ["toy_fid", "toy_clip", "toy_imagereward"]
    assert markdown.summary_markdown(tables.summary(df, ts, "toy")) == GOLDEN_SUMMARY
    sections = [markdown.metric_section(t, f"plots/{t.key}.png" if t.value.notna().any().any() else None) for t in ts]
    assert sections == [GOLDEN_FID, GOLDEN_CLIP, GOLDEN_IMAGEREWARD]


def test_bold_follows_higher_is_better():
    df = tables.tidy(read_results_frame([row("a", "a", 1, "m", 1.0, True), row("b", "b", 1, "m", 2.0, True)]))
    up = markdown.metric_table_markdown(tables.metric_tables(df)[0])
    assert "| b | **2.00** |" in up and "| a | 1.00 |" in up
    df = tables.tidy(read_results_frame([row("a", "a", 1, "m", 1.0, False), row("b", "b", 1, "m", 2.0, False)]))
    down = markdown.metric_table_markdown(tables.metric_tables(df)[0])
    assert "| a | **1.00** |" in down and "| b | 2.00 |" in down


def read_results_frame(rows):
    from cdmbench.eval.results import _frame

    return _frame(rows)


def test_protocols_are_never_mixed_in_one_table():
    rows = [
        row("a", "cdm", 1, "clip", 20.0, True, protocol="clip|ViT-L-14"),
        row("b", "dmd2", 1, "clip", 0.3, True, protocol="clip|ViT-g-14"),
        row("c", "cd", 1, "clip", NAN, None, status="skipped: weights missing"),
    ]
    ts = tables.metric_tables(tables.tidy(read_results_frame(rows)))
    assert [(t.key, t.title, t.protocol, list(t.value.index)) for t in ts] == [
        ("toy_clip-p1", "clip [1]", "clip|ViT-L-14", ["cdm", "cd"]),
        ("toy_clip-p2", "clip [2]", "clip|ViT-g-14", ["dmd2", "cd"]),
    ]


def test_several_runs_of_one_method_get_run_labels():
    rows = [row("r1", "cdm", 1, "fid", 3.0, False), row("r2", "cdm", 1, "fid", 4.0, False)]
    t = tables.metric_tables(tables.tidy(read_results_frame(rows)))[0]
    assert list(t.value.index) == ["cdm (r1)", "cdm (r2)"]


# --------------------------------------------------------------------------------------------------
# build_report


def write_images(root, runs_steps, prompt_ids=(0, 1, 2), seeds=(0, 1)):
    rng = np.random.default_rng(0)
    manifest = []
    for run, method, steps in runs_steps:
        for pid in prompt_ids:
            for seed in seeds:
                rel = f"{run}/steps{steps}/{pid}-{seed}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / rel)
                manifest.append({"run": run, "method": method, "arch": "toy", "steps": steps, "prompt_id": str(pid),
                                 "prompt": f"a red circle {pid}", "seed": seed, "path": rel, "nfe": steps})
    pd.DataFrame(manifest).to_json(root / "manifest.jsonl", orient="records", lines=True)


def test_build_report_writes_every_file(results, tmp_path):
    root = tmp_path / "images"
    write_images(root, [("teach", "teacher", 28), ("r-cdm", "cdm", 1), ("r-cdm", "cdm", 2), ("r-dmd", "dmd2", 1), ("r-dmd", "dmd2", 2)])
    out = tmp_path / "report"
    report = build_report(results, out, images_root=root, title="Toy sweep", header={"commit": "abc123", "machine": "cpu"})
    assert report == out / "report.md"
    text = report.read_text()
    assert text.startswith("# Toy sweep\n\n|  |  |\n|:--|:--|\n| **command** |")
    assert "| **commit** | abc123 |" in text and "| **n (eval items per cell)** | 64 |" in text
    # the report hides a metric that applies nowhere on the arch and lists empty-cell reasons once
    summary = "\n".join(line[:-4] if line.startswith("|:") else line.rsplit(" |", 2)[0] + " |"
                        for line in GOLDEN_SUMMARY.splitlines())
    fid = GOLDEN_FID.replace("\n\n- skipped: dmd2 supports steps 1, 2", "")
    for part in (summary, fid, GOLDEN_CLIP, "Empty cells (each reason once):\n\n- dmd2, 4 steps (fid): skipped — dmd2 supports steps 1, 2",
                 "![samples](grid.png)"):
        assert part in text
    assert "imagereward ↑" not in text and text.count("dmd2 supports steps 1, 2") == 1
    assert "Left out, as they do not apply to this backbone: imagereward (rates natural images; toy draws shapes)." in text
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["toy_clip.png", "toy_fid.png"]
    assert sorted(p.name for p in (out / "tables").iterdir()) == [
        "cells.csv", "curves.csv", "pairs.csv", "ranks.csv", "summary_toy.csv", "toy_clip.csv", "toy_fid.csv"]
    assert (out / "results.csv").read_bytes() == results.read_bytes()
    for png in [out / "grid.png", *(out / "plots").iterdir()]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    fid = pd.read_csv(out / "tables" / "toy_fid.csv", index_col=0)
    assert fid.loc["cdm", "steps=1"] == 5.5 and np.isnan(fid.loc["dmd2", "steps=4"])
    assert not [p for p in out.rglob("*.tmp")]


def test_grid_picks_distinct_prompts_spread_over_the_set_and_common_seeds():
    from cdmbench.reports.grid import choose_prompts_and_seeds

    rows = []
    for pid in range(8):
        caption = "same caption" if pid < 2 else f"caption {pid}"  # p0 and p1 read the same: one column
        for seed in (0, 1, 2):
            if pid == 5 and seed == 0:
                continue  # seed 0 missing for one chosen prompt: not a common seed
            rows.append({"run": "r", "steps": 1, "prompt_id": f"p{pid}", "prompt": caption, "seed": seed})
    prompts, seeds = choose_prompts_and_seeds(pd.DataFrame(rows), 3, 2)
    captions = {f"p{i}": ("same caption" if i < 2 else f"caption {i}") for i in range(8)}
    assert len(prompts) == 3 and len({captions[p] for p in prompts}) == 3
    assert prompts == ["p0", "p3", "p5"]  # 7 distinct captions, every 7/3-th one
    assert seeds == [1, 2]


def test_grid_merges_a_per_step_count_method_into_one_row_per_step(tmp_path):
    from cdmbench.reports.grid import _row_labels, _rows

    root = tmp_path / "images"
    write_images(root, [("teach", "teacher", 1), ("teach", "teacher", 28), ("cd-p1-s0", "cd", 1),
                        ("cd-p2-s0", "cd", 2), ("cd-p1-s1", "cd", 1), ("cdm-s0", "cdm", 1), ("cdm-s0", "cdm", 2)])
    m = pd.read_json(root / "manifest.jsonl", lines=True, dtype=False)
    labelled = _row_labels(m, {"cd-p1-s0": 0, "cd-p2-s0": 0, "cd-p1-s1": 1, "cdm-s0": 0})
    assert set(labelled["run"]) == {"teach", "cd-p1-s0", "cd-p2-s0", "cdm-s0"}  # the lowest training seed
    assert _rows(labelled) == [("teacher", 28, True), ("teacher", 1, False), ("cd", 1, False), ("cdm", 1, False),
                               ("cd", 2, False), ("cdm", 2, False)]
    build_grid = __import__("cdmbench.reports.grid", fromlist=["sample_grid"]).sample_grid
    out = build_grid(m, root, tmp_path / "grid.png", num_prompts=2, num_seeds=2)
    with Image.open(out) as im:
        assert im.size[0] > 400 and im.size[1] > 400


def test_build_report_without_a_manifest_fails_clearly(results, tmp_path):
    with pytest.raises(CdmbenchError, match="no image manifest"):
        build_report(results, tmp_path / "out", images_root=tmp_path)
