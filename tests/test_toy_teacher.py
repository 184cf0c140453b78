"""Guards on the shipped toy teacher: it follows its prompts at the full step count, its full-step samples
are no further from the data than its 4-step ones, and few-step sampling without distillation is
measurably worse (what the distillation methods must fix).

Scored through the eval harness with the protocol of ``reports/toy`` (``cdmbench bench --arch toy
--seeds 0-4``: 96 eval prompts × seeds 0–4, the backbone's default CFG and shifted schedule), so the
numbers are the README's (toy backbone section).
"""

from __future__ import annotations

import pandas as pd
import pytest

from cdmbench.backbones.toy import ToyBackbone
from cdmbench.eval.harness import EvalConfig, run_eval
from cdmbench.toy.shapes import DATA_VERSION


@pytest.fixture(scope="module")
def teacher_rows(tmp_path_factory) -> pd.DataFrame:
    ws = tmp_path_factory.mktemp("teacher-eval")  # no runs in it: teacher rows only
    cfg = EvalConfig(workspace=str(ws), arch="toy", steps=(1,), teacher_steps=(1, 4, 28),
                     seeds=tuple(range(5)), metrics=("attr_acc", "fid"), batch_size=96, progress=False)
    df = pd.read_csv(run_eval(cfg))
    assert (df["n"] == 480).all(), df
    return df.set_index(["steps", "metric"])["value"]


def test_teacher_was_trained_on_the_current_data():
    assert ToyBackbone().record["data"] == DATA_VERSION


def test_teacher_follows_prompts_at_28_steps(teacher_rows):
    """Issue criterion: attribute accuracy >= 0.90 at 28 steps with CFG (480 images)."""
    assert teacher_rows[(28, "attr_acc")] >= 0.90, teacher_rows


def test_one_step_teacher_is_far_worse_than_28(teacher_rows):
    one, full = teacher_rows[(1, "fid")], teacher_rows[(28, "fid")]
    assert one > 2.5 * full, (one, full)


def test_full_step_samples_are_no_worse_than_four_step(teacher_rows):
    """A teacher close to its data: more steps must not move the samples away from it (toy FID)."""
    assert teacher_rows[(28, "fid")] <= teacher_rows[(4, "fid")], teacher_rows
