"""`--external NAME=PATH[@CFG]`: an already-distilled checkpoint evaluated next to the runs."""

import pytest

from cdmbench.errors import CdmbenchError
from cdmbench.eval.harness import EvalConfig, run_eval
from cdmbench.eval.results import read_results


def test_external_rows_use_their_own_guidance(tmp_path):
    from cdmbench.backbones.toy import default_teacher_path

    cfg = EvalConfig(workspace=str(tmp_path), arch="toy", steps=(1,), teacher=False, metrics=("attr_acc",),
                     num_prompts=2, external=(f"shipped={default_teacher_path()}@2.5",), progress=False)
    df = read_results(run_eval(cfg))
    assert list(df.run) == ["shipped"] and list(df.method) == ["external"]
    assert df.guidance.iloc[0] == 2.5 and df.nfe.iloc[0] == 2 and df.status.iloc[0] == "ok"


def test_external_needs_an_arch(tmp_path):
    with pytest.raises(CdmbenchError, match="--arch"):
        run_eval(EvalConfig(workspace=str(tmp_path), teacher=False, external=("x=/nowhere",), progress=False))
