"""The bad-input and fault matrix (issue 14): every command with bad option values, every state file
corrupted, truncated or deleted, a workspace that is a file. Each case runs the CLI in-process
(``CliRunner``) and must exit non-zero with exactly one ``error:`` line on stderr, no traceback, and leave no
new or half-written file behind (stateful cases: no ``*.tmp`` file and nothing new outside the eval caches).
The cases that need a trained run share one (a two-iteration toy run, trained once for the module)."""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from cdmbench.cli import app
from cdmbench.eval.results import RESULT_COLUMNS

runner = CliRunner()
RUN = "dmd2-toy"  # the trained run's name
BIG = "99999999999999999999"


@dataclass
class Case:
    args: list[str]  # {ws}, {run}, {tmp} are filled in
    setup: Callable[[Path], None] | None = None  # damages a copy of the trained workspace (None: an empty one)
    match: str = ""  # regex the error line must contain
    trained: bool | None = None  # needs the trained workspace (default: when there is a setup)

    def __post_init__(self):
        if self.trained is None:
            self.trained = self.setup is not None


def _file(rel, text=""):
    def setup(ws):
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return setup


def _truncate(rel, keep=64):
    def setup(ws):
        for p in ws.glob(rel):
            p.write_bytes(p.read_bytes()[:keep])
    return setup


def _delete(rel):
    def setup(ws):
        for p in ws.glob(rel):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return setup


def _all(*fns):
    def setup(ws):
        for f in fns:
            f(ws)
    return setup


CK = f"runs/{RUN}/checkpoints"
LAST = f"{CK}/step_0000002"
HEADER = ",".join(RESULT_COLUMNS)
# the first 18 columns; the training-cost ones after them are left empty
ROW = 'a,cdm,toy,1,fid,1.5,nan,nan,10,False,p,1,"[1.0]","[1.0]",1.0,ck,t,ok' + "," * (len(RESULT_COLUMNS) - 18)
TRAIN = ["train", "dmd2", "--quiet", "--workspace", "{ws}"]
EVAL = ["eval", "--workspace", "{ws}", "--quiet", "--arch", "toy", "--prompts", "toy"]
EVAL_RUN = ["eval", "--workspace", "{ws}", "--quiet", "--runs", RUN, "--no-teacher", "--prompts", "toy",
            "--num-prompts", "2", "--steps", "1", "--metrics", "attr_acc"]
RESUME = [*TRAIN, "--resume", "--steps-budget", "2", "--set", "warmup=0", "--batch-size", "1",
          "--set", "train.checkpoint_every=1", "--set", "train.log_every=1"]
REPORT = ["report", "--workspace", "{ws}", "--out", "{tmp}/report"]
EXPORT = ["export", RUN, "--workspace", "{ws}", "--out", "{tmp}/exported"]


def _results(text):
    return _file("eval/results.csv", text)


CASES: dict[str, Case] = {}


def case(name, *args, **kw):
    assert name not in CASES, name
    if name.startswith("report/"):
        kw.setdefault("trained", False)  # reports need no run
    CASES[name] = Case(list(args), **kw)


# --- train: option values -----------------------------------------------------------------------
case("train/unknown-method", "train", "nope", "--workspace", "{ws}", match="nope")
case("train/unknown-arch", *TRAIN, "--arch", "nope", match="nope")
for v in ("abc", "0", "-1", BIG, "1000000000", "1.5"):
    case(f"train/steps-budget={v}", *TRAIN, "--steps-budget", v, match="steps")
for v in ("0", "abc", "10000000", "-3"):
    case(f"train/batch-size={v}", *TRAIN, "--batch-size", v, match="batch")
for s, m in [("foo", "key=value"), ("unknown=1", "unknown setting"), ("guidance=high", "guidance"),
             ("betas=0.9", "betas"), ("betas=a,b", "betas"), ("betas=0.9,0.9,0.9", "betas"),
             ("real_guidance=", "real_guidance"), ("train.mixed_precision=fp8", "mixed_precision"),
             ("train.ema_decay=1.5", "ema_decay"), ("train.ema_decay=nan", "ema_decay"),
             ("train.ema_decay=-0.1", "ema_decay"), ("train.seed=-1", "seed"), (f"train.seed={BIG}", "seed"),
             ("train.grad_clip=-1", "grad_clip"), ("train.grad_clip=nan", "grad_clip"),
             ("train.checkpoint_every=0", "checkpoint_every"), ("train.keep_checkpoints=0", "keep_checkpoints"),
             ("train.log_every=0", "log_every"), ("train.log_every=1e3", "log_every"),
             ("train.steps=1000000000", "train.steps"), ("train.batch_size=1000000", "batch_size"),
             ("train.prompts=/nonexistent/p.txt", "no such file"), ("train.prompts=", "train.prompts"),
             ("train.nope=1", "unknown setting"), ("backbone.dtype=int8", "dtype"),
             ("backbone.lora_rank=-1", "lora_rank"), ("backbone.resolution=0", "resolution"),
             ("backbone.nope=1", "unknown setting"), ("student_lr=-1", "learning rate"),
             ("student_lr=abc", "student_lr"), ("fake_lr=nan", "learning rate"), ("warmup=-5", "warm-up"),
             ("weight_decay=-1", "weight_decay"), ("update_ratio=0", "update_ratio")]:
    case(f"train/set {s}", *TRAIN, "--set", s, match=m)
for v in ("../x", "../../x", "/abs/x", ".", "..", "a/b", ".hidden", "", "x" * 300, "a b"):
    case(f"train/run-name={v[:20]!r}", *TRAIN, "--run-name", v, match="--run-name")
for v in ("tpu", "cuda:99", "cuda:x", "", "gpu:0"):
    case(f"train/device={v!r}", *TRAIN, "--device", v, match="--device")
case("train/dtype=int8", *TRAIN, "--dtype", "int8", match="dtype")
case("train/lora-rank=-1", *TRAIN, "--lora-rank", "-1", match="lora_rank")
case("train/lora-rank=abc", *TRAIN, "--lora-rank", "abc", match="lora-rank")
case("train/prompts-binary", *TRAIN, "--set", "train.prompts={ws}/binary.txt", match="binary.txt")
case("train/prompts-empty", *TRAIN, "--set", "train.prompts={ws}/empty.txt", match="empty.txt")
case("train/prompts-a-folder", *TRAIN, "--set", "train.prompts={ws}", match="no such file")
case("train/force-without-resume", *TRAIN, "--force", match="--force")
case("train/toy-remote-code", *TRAIN, "--allow-remote-code", match="remote code")
case("train/sd3-missing-model", "train", "cdm", "--arch", "sd3", "--workspace", "{ws}", "--model", "/nonexistent/sd3",
     "--set", "train.prompts={ws}/prompts.csv", match="does not exist")
case("train/sd3-default-weights-offline", "train", "cdm", "--arch", "sd3", "--workspace", "{ws}",
     "--set", "train.prompts={ws}/prompts.csv", match="sd3")
case("train/sd3-without-prompts", "train", "cdm", "--arch", "sd3", "--workspace", "{ws}", "--model", "/nonexistent/sd3",
     match="train.prompts")
case("train/log-with-unknown", *TRAIN, "--log-with", "nope", match="--log-with")
case("train/cpu-and-cuda", *TRAIN, "--cpu", "--device", "cuda", match="--device")
case("train/workspace-is-a-file", *TRAIN[:-1], "{tmp}/afile", setup=None, match="not a folder")
case("train/runs-is-a-file", *TRAIN, match="not a folder", setup=_file("runs", "x"), trained=False)

# --- train: run-folder state -------------------------------------------------------------------------
case("train/exists-without-resume", *TRAIN, match="already exists", trained=True)
case("train/resume-changed-seed", *RESUME, "--set", "train.seed=7", match="train.seed: 0 -> 7", trained=True)
case("train/resume-changed-budget", *TRAIN, "--resume", "--steps-budget", "5", "--set", "warmup=0",
     "--batch-size", "1", "--set", "train.checkpoint_every=1", "--set", "train.log_every=1",
     match="train.steps: 2 -> 5 \\(pass --force", trained=True)
case("train/resume-force-unsafe", *RESUME, "--force", "--set", "real_guidance=9", match="cannot change",
     trained=True)
case("train/resume-changed-method-config", *RESUME, "--set", "real_guidance=9", match="method.real_guidance",
     trained=True)
case("train/resume-other-method", "train", "ddmd", "--quiet", "--workspace", "{ws}", "--run-name", RUN, "--resume",
     match="method: 'dmd2' -> 'ddmd'", trained=True)
case("train/resume-other-arch-lora", *RESUME, "--lora-rank", "2", match="backbone.lora_rank", trained=True)
case("train/resume-config-garbage", *RESUME, setup=_file(f"runs/{RUN}/config.json", "{garbage"),
     match="config.json")
case("train/resume-config-empty", *RESUME, setup=_file(f"runs/{RUN}/config.json", ""), match="config.json")
case("train/resume-config-missing", *RESUME, setup=_delete(f"runs/{RUN}/config.json"), match="no config.json")
case("train/resume-config-list", *RESUME, setup=_file(f"runs/{RUN}/config.json", "[1]"), match="config.json")
case("train/resume-all-checkpoints-truncated", *RESUME, setup=_truncate(f"{CK}/step_*/student_ema.safetensors"),
     match="no intact checkpoint")
case("train/resume-all-training-states-empty", *RESUME, setup=_truncate(f"{CK}/step_*/training_state.pt", 0),
     match="no intact checkpoint")
case("train/resume-all-meta-deleted", *RESUME, setup=_delete(f"{CK}/step_*/meta.json"), match="no intact checkpoint")
case("train/resume-all-fake-score-deleted", *RESUME, setup=_delete(f"{CK}/step_*/fake_score.safetensors"),
     match="no intact checkpoint")

# --- eval: option values -----------------------------------------------------------------------------
for v in ("", "x", "0", "1-0", BIG, "1001", "0-99999999999999", "1,1", "-1", "1,,2"):
    case(f"eval/steps={v!r}", *EVAL, "--steps", v, match="--steps")
for v in ("x", "0-99999999999999", BIG, "", "1,1", "0-10001"):
    case(f"eval/seeds={v!r}", *EVAL, "--seeds", v, match="--seeds")
for v in ("0", "x", "5000"):
    case(f"eval/teacher-steps={v}", *EVAL, "--teacher-steps", v, match="--teacher-steps")
for v in ("0", "-1", "abc", "1000000000000"):
    case(f"eval/num-prompts={v}", *EVAL, "--num-prompts", v, match="num-prompts")
case("eval/num-prompts-over-the-set", *EVAL, "--num-prompts", "100000", match="requested but prompt set")
for v in ("0", "1000000000", "x"):
    case(f"eval/batch-size={v}", *EVAL, "--batch-size", v, match="batch")
case("eval/metrics-unknown", *EVAL, "--metrics", "nope", match="unknown metric")
case("eval/metrics-empty", *EVAL, "--metrics", ",", match="metrics")
for v in ("../x", "/abs", "a/b", ".."):
    case(f"eval/runs={v}", *EVAL, "--runs", v, match="--runs")
case("eval/runs-unknown", *EVAL, "--runs", "nope", match="no trained run 'nope'")
case("eval/runs-empty", *EVAL, "--runs", ",", match="--runs")
case("eval/prompts-empty", *EVAL[:-1], "", match="prompts")
case("eval/prompts-missing-file", *EVAL[:-1], "/nonexistent/p.txt", match="neither an existing file")
case("eval/prompts-empty-file", *EVAL[:-1], "{ws}/empty.txt", setup=None, match="is empty")
case("eval/prompts-bad-jsonl", *EVAL[:-1], "{ws}/bad.jsonl", match="not valid JSON")
case("eval/prompts-binary", *EVAL[:-1], "{ws}/binary.txt", match="not UTF-8")
case("eval/prompts-bad-suffix", *EVAL[:-1], "{ws}/p.xyz", match="neither an existing file|unsupported suffix")
for v, m in [("noequals", "NAME=PATH"), ("=x", "NAME=PATH|not a plain name"), ("name=", "NAME=PATH"),
             ("../../../esc=some/model", "--external NAME"), ("a/b=some/model", "--external NAME"),
             ("..=x", "--external NAME"), ("teacher-x=/nonexistent", "clashes"),
             ("ext=/nonexistent/folder", "does not exist"), ("ext=x@notnum", "guidance")]:
    case(f"eval/external={v}", *EVAL, "--external", v, match=m)
case("eval/external-without-arch", "eval", "--workspace", "{ws}", "--quiet", "--external", "e=some/model",
     match="--arch is needed")
for v in ("tpu", "cuda:99", "", "cuda:x"):
    case(f"eval/device={v!r}", *EVAL, "--device", v, match="--device")
case("eval/arch-unknown", *EVAL, "--arch", "nope", match="nope")
case("eval/nothing-to-evaluate", "eval", "--workspace", "{ws}", "--quiet", match="nothing to evaluate")
case("eval/workspace-is-a-file", "eval", "--workspace", "{tmp}/afile", "--arch", "toy", match="not a folder")
case("eval/out-is-a-file", *EVAL, "--out", "{tmp}/afile", match="not a folder")
case("eval/out-under-a-file", *EVAL, "--out", "{tmp}/afile/sub", match="not a folder")

# --- eval: run state -------------------------------------------------------------------------------
case("eval/student-ema-truncated", *EVAL_RUN, setup=_truncate(f"{LAST}/student_ema.safetensors"),
     match="student_ema.safetensors")
case("eval/student-ema-deleted", *EVAL_RUN, setup=_delete(f"{LAST}/student_ema.safetensors"),
     match="student_ema.safetensors")
case("eval/config-garbage", *EVAL_RUN, setup=_file(f"runs/{RUN}/config.json", "{x"), match="config.json")
case("eval/config-partial", *EVAL_RUN, setup=_file(f"runs/{RUN}/config.json", '{"method": "dmd2"}'),
     match="config.json")
case("eval/config-unknown-method", *EVAL_RUN,
     setup=_file(f"runs/{RUN}/config.json", '{"method": "nope", "arch": "toy", "method_config": {}, '
                                              '"train": {}, "backbone": {}}'), match="config.json")
case("eval/pointer-escapes", *EVAL_RUN, setup=_file(f"{CK}/latest", "../../../../etc\n"), match="pointer")
case("eval/pointer-garbage", *EVAL_RUN, setup=_file(f"{CK}/latest", "\x00\x01"), match="pointer")
case("eval/unfinished-meta-garbage", *EVAL_RUN,
     setup=_all(_delete(f"runs/{RUN}/done.json"), _file(f"{LAST}/meta.json", "{x")), match="meta.json")
case("eval/results-garbage", *EVAL_RUN, setup=_results("\x00garbage\n1,2,3\n"), match="results")
case("eval/score-cache-garbage", *EVAL_RUN, trained=True,
     setup=_file("eval/cache/scores/x.json", "{"), match="")  # not read for another key: must succeed

# --- report ------------------------------------------------------------------------------------------
case("report/no-results", *REPORT, match="no results")
case("report/empty", *REPORT, setup=_results(""), match="is empty")
case("report/header-only", *REPORT, setup=_results(HEADER + "\n"), match="no rows")
case("report/garbage", *REPORT, setup=_results("\x00\x01\x02garbage\n\"unterminated"), match="results file")
case("report/truncated", *REPORT, setup=_results(f"{HEADER}\n{ROW}\n{ROW[:30]}"), match="line 3")
case("report/non-numeric", *REPORT, setup=_results(f"{HEADER}\n{ROW.replace('1.5', 'abc')}\n"),
     match="line 2: column 'value'")
case("report/non-numeric-steps", *REPORT, setup=_results(f"{HEADER}\n{ROW.replace('toy,1,', 'toy,one,')}\n"),
     match="line 2: column 'steps'")
case("report/bad-status", *REPORT, setup=_results(f"{HEADER}\n{ROW.replace(',ok,', ',great,')}\n"),
     match="line 2: status")
case("report/other-columns", *REPORT, setup=_results("a,b\n1,2\n"), match="result columns")
case("report/extra-field", *REPORT, setup=_results(f"{HEADER}\n{ROW}\n{ROW},x,y\n"), match="results file")
case("report/binary", *REPORT, setup=lambda ws: ((ws / "eval").mkdir(),
                                                  (ws / "eval" / "results.csv").write_bytes(os.urandom(300))),
     match="results file")
case("report/results-wrong-suffix", "report", "--results", "{ws}/r.txt", "--out", "{tmp}/report",
     setup=_file("r.txt", "x"), match="must end in")
case("report/results-is-a-folder", "report", "--results", "{ws}", "--out", "{tmp}/report", match="no results")
case("report/out-is-a-file", "report", "--workspace", "{ws}", "--out", "{tmp}/afile",
     setup=_results(f"{HEADER}\n{ROW}\n"), match="not a folder")
case("report/manifest-bad-steps", *REPORT,
     setup=_all(_results(f"{HEADER}\n{ROW}\n"),
                _file("eval/manifest.jsonl", json.dumps({"run": "a", "method": "cdm", "arch": "toy", "steps": "x",
                                                         "prompt_id": "p", "prompt": "q", "seed": 0,
                                                         "path": "images/a.png"}) + "\n")),
     match="manifest")

# --- export ------------------------------------------------------------------------------------------
case("export/unknown-run", "export", "nope", "--workspace", "{ws}", "--out", "{tmp}/e", match="no run 'nope'")
for v in ("../x", "../../etc", "a/b/c"):
    case(f"export/run={v}", "export", v, "--workspace", "{ws}", "--out", "{tmp}/e", match="not a plain name|no run")
case("export/weights-bad", *EXPORT, "--weights", "best", match="--weights")
case("export/lora-bad", *EXPORT, "--lora", "maybe", match="--lora")
case("export/toy-run", *EXPORT, match="diffusers", trained=True)
case("export/out-exists", *EXPORT[:-1], "{ws}", match="already exists", trained=True)
case("export/out-under-a-file", *EXPORT[:-1], "{tmp}/afile/x", match="not a folder", trained=True)
case("export/no-checkpoint", *EXPORT, setup=_delete(CK), match="no checkpoint")
case("export/config-garbage", *EXPORT, setup=_file(f"runs/{RUN}/config.json", "{x"), match="config.json")
case("export/pointer-escapes", *EXPORT, setup=_file(f"{CK}/latest", "../../x"), match="pointer")
case("export/ema-truncated", *EXPORT, setup=_truncate(f"{LAST}/student_ema.safetensors"), match="step_0000002")
case("export/training-state-truncated", *EXPORT, setup=_truncate(f"{LAST}/training_state.pt"),
     match="step_0000002")

# --- bench ------------------------------------------------------------------------------------------
B = ["bench", "--workspace", "{ws}", "--out", "{tmp}/bench"]
case("bench/arch-unknown", *B, "--arch", "nope", match="nope")
case("bench/methods-unknown", *B, "--methods", "nope", match="nope")
case("bench/methods-empty-name", *B, "--methods", "cdm,,dmd", match="--methods")
for v in ("x", "0", BIG, ""):
    case(f"bench/steps={v!r}", *B, "--steps", v, match="--steps")
for v in ("x", "0-99999999999999"):
    case(f"bench/seeds={v}", *B, "--seeds", v, match="--seeds")
case("bench/workspace-is-a-file", "bench", "--workspace", "{tmp}/afile", "--out", "{tmp}/b", match="not a folder")
case("bench/out-is-a-file", "bench", "--workspace", "{ws}", "--out", "{tmp}/afile", match="not a folder")

# --- toy --------------------------------------------------------------------------------------------
T = ["toy", "train-teacher", "--out", "{tmp}/t.safetensors"]
for v in ("0", "x", BIG):
    case(f"toy/teacher-steps={v}", *T, "--steps", v, match="--steps")
for v in ("0", "-1", "nan", "x"):
    case(f"toy/teacher-lr={v}", *T, "--lr", v, match="--lr")
case("toy/teacher-seed=-1", *T, "--seed", "-1", match="--seed")
case("toy/teacher-init-missing", *T, "--init", "/nonexistent/t.safetensors", match="--init")
case("toy/teacher-out-is-a-folder", "toy", "train-teacher", "--out", "{tmp}", match="is a folder")
case("toy/teacher-out-under-a-file", "toy", "train-teacher", "--out", "{tmp}/afile/t.safetensors",
     match="not a folder")
case("toy/teacher-no-out", "toy", "train-teacher", match="--out")
case("toy/teacher-no-vae", *T, match="--vae: required")
case("toy/teacher-vae-missing", *T, "--vae", "/nonexistent/vae.safetensors", match="--vae")
case("toy/vae-steps=0", "toy", "train-vae", "--out", "{tmp}/v.safetensors", "--steps", "0", match="--steps")
case("toy/vae-decoder-only-without-init", "toy", "train-vae", "--out", "{tmp}/v.safetensors", "--decoder-only",
     match="--decoder-only")
case("toy/evaluators-out-is-a-file", "toy", "train-evaluators", "--out-dir", "{tmp}/afile", match="not a folder")
case("toy/evaluators-seed", "toy", "train-evaluators", "--out-dir", "{tmp}/ev", "--seed", "-2", match="--seed")
case("toy/unknown-command", "toy", "nope", match="No such command")
case("cli/unknown-command", "nope", match="No such command")
case("cli/unknown-option", "eval", "--bogus", match="No such option")


def _prepare_prompt_files(ws: Path):
    (ws / "empty.txt").write_text("")
    (ws / "bad.jsonl").write_text('{"caption": "x"}\n{not json\n')
    (ws / "p.xyz").write_text("a prompt\n")
    (ws / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 50)
    (ws / "prompts.csv").write_text("id,prompt\n1,a red circle\n")


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory):
    """A workspace with one finished two-iteration dmd2 run (checkpoints at 1 and 2)."""
    from conftest import tiny_overrides

    from cdmbench.run import resolve_config
    from cdmbench.train import train

    ws = tmp_path_factory.mktemp("matrix") / "ws"
    cfg = resolve_config("dmd2", "toy", tiny_overrides("dmd2", steps=2, batch=1))
    train(cfg, ws / "runs" / RUN, progress=False)
    return ws


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_the_matrix_is_large():
    assert len(CASES) >= 200


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_error_line(name, tmp_path, request):
    c = CASES[name]
    if c.trained:
        ws = tmp_path / "ws"
        shutil.copytree(request.getfixturevalue("trained_ws"), ws)
    else:
        ws = tmp_path / "ws"
        ws.mkdir()
    _prepare_prompt_files(ws)
    if c.setup is not None:
        c.setup(ws)
    (tmp_path / "afile").write_text("not a folder")
    before = _files(tmp_path)
    args = [a.replace("{ws}", str(ws)).replace("{tmp}", str(tmp_path)) for a in c.args]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each case is a fresh CLI process
    res = runner.invoke(app, args)
    after = _files(tmp_path)
    if name == "eval/score-cache-garbage":  # a stray cache file is never read: success is right
        assert res.exit_code == 0, res.output
        return
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code != 0, res.output
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    if c.match:
        import re

        assert re.search(c.match, err[0]), err[0]
    leftovers = [p for p in after if p.endswith(".tmp") or ".tmp/" in p or "/.tmp" in p]
    assert not leftovers, leftovers
    new = sorted(p for p in after - before if "/cache/" not in p and not p.endswith(".lock")
                 and not p.endswith("/cache") and not p.endswith("/locks"))
    assert not new, new
