"""Device and precision follow accelerate; failed starts write nothing; one prompt reader; trackers; help text."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from tiny_pipelines import tiny_sd3_dir  # noqa: F401 (fixture)

from cdmbench.cli import app
from cdmbench.errors import CdmbenchError

runner = CliRunner()
TINY = ["--steps-budget", "2", "--batch-size", "2", "--set", "train.checkpoint_every=1", "--set", "train.log_every=1",
        "--set", "warmup=0", "--set", "max_rollout_steps=3", "--quiet"]


@pytest.fixture(autouse=True)
def fresh_accelerate(monkeypatch):
    """Each test is a fresh process for accelerate (its state is a process-wide singleton)."""
    from accelerate.state import AcceleratorState

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _one_error_line(res) -> str:
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    return err[0]


# --------------------------------------------------------------------------------------------------
# device


def test_default_device_is_accelerates(tmp_path):
    from accelerate import PartialState

    from cdmbench.accel import select_device

    res = runner.invoke(app, ["train", "cdm", "--dry-run", "--workspace", str(tmp_path / "ws")])
    assert res.exit_code == 0, res.output
    expected = str(PartialState(cpu=not torch.accelerator.is_available()).device)
    assert json.loads(res.stdout)["backbone"]["device"] == expected == select_device(None)
    assert select_device(None, cpu=True) == "cpu" and select_device("cpu") == "cpu"
    assert not (tmp_path / "ws").exists()


def test_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for cmd in (["train", "cdm", "--workspace", str(tmp_path / "ws"), *TINY],
                ["eval", "--workspace", str(tmp_path / "ws"), "--arch", "toy", "--quiet"]):
        err = _one_error_line(runner.invoke(app, [*cmd, "--device", "cuda"]))
        assert "--device" in err and "not available" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu"])
def test_an_unknown_device_is_an_error(bad):
    from cdmbench.accel import select_device

    with pytest.raises(CdmbenchError, match="--device"):
        select_device(bad)


def test_accelerate_launch_cpu_forces_the_cpu(monkeypatch):
    from cdmbench.accel import select_device

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert select_device(None) == "cpu"


# --------------------------------------------------------------------------------------------------
# precision


def test_launch_precision_overrides_presets_and_loses_to_set(monkeypatch):
    from cdmbench.run import resolve_config

    assert resolve_config("cdm", "sd3").train.mixed_precision == "bf16"  # the backbone's default
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision no`
    assert resolve_config("cdm", "sd3").train.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "FP16")
    assert resolve_config("dmd2", "toy").train.mixed_precision == "fp16"
    assert resolve_config("dmd2", "toy", {"train.mixed_precision": "bf16"}).train.mixed_precision == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(CdmbenchError, match="ACCELERATE_MIXED_PRECISION"):
        resolve_config("cdm", "toy")


def test_launch_mixed_precision_is_honoured_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["train", "dmd2", "--workspace", str(ws), "--log-with", "none", "--quiet", "--steps-budget",
                              "1", "--batch-size", "1", "--set", "warmup=0", "--set", "update_ratio=1"])
    assert res.exit_code == 0, res.output
    saved = json.loads((ws / "runs" / "dmd2-toy" / "config.json").read_text())
    assert saved["train"]["mixed_precision"] == "bf16"  # the toy's own default is "no"
    assert saved["backbone"]["device"] == "cpu" and saved["as_run"]["device"] == "cpu"
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"  # what the loop's autocast ran


# --------------------------------------------------------------------------------------------------
# fail before writing; one prompt reader


def test_sd3_without_prompts_fails_before_the_pipeline_loads_or_anything_is_written(tiny_sd3_dir, tmp_path,
                                                                                       monkeypatch):
    import cdmbench.backbones as backbones

    def no_build(*a, **k):
        raise AssertionError("the backbone was built before the prompt check")

    monkeypatch.setattr(backbones, "build_backbone", no_build)
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["train", "cdm", "--arch", "sd3", "--model", str(tiny_sd3_dir), "--workspace", str(ws),
                              "--quiet", "--cpu"])
    err = _one_error_line(res)
    assert "train.prompts" in err and "sd3" in err
    assert not ws.exists()


PROMPTS = ["a red circle", "two blue squares, small", 'a "quoted" green triangle']


def _prompt_files(d):
    files = {
        "p.txt": "\n".join(PROMPTS) + "\n\n",
        "p.jsonl": "\n".join(json.dumps({"caption": p}) for p in PROMPTS),
        "p.json": json.dumps(PROMPTS),
        "p.csv": "id,Prompt,category\n" + "".join(f'{i},"{p.replace(chr(34), 2 * chr(34))}",x\n'
                                                   for i, p in enumerate(PROMPTS)),
        "p.tsv": "Prompt\tcategory\n" + "".join(f"{p}\tx\n" for p in PROMPTS),
    }
    for name, text in files.items():
        (d / name).write_text(text)
    return [d / n for n in files]


def test_train_and_eval_read_the_same_prompt_formats(tmp_path):
    from cdmbench.backbones import BACKBONES
    from cdmbench.prompts import load_prompt_set
    from cdmbench.train import read_train_prompts

    for path in _prompt_files(tmp_path):
        train_prompts = read_train_prompts(str(path), BACKBONES.get("toy"))
        assert train_prompts == [p.text for p in load_prompt_set(str(path), "toy")] == PROMPTS, path.name
    assert "Prompt" not in read_train_prompts(str(tmp_path / "p.csv"), BACKBONES.get("sd3"))  # no header prompt
    with pytest.raises(CdmbenchError, match="train.prompts"):
        read_train_prompts(None, BACKBONES.get("sd3"))
    assert read_train_prompts(None, BACKBONES.get("toy")) is None  # the toy's own grammar


def test_a_csv_prompt_file_trains(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\na red circle\na blue square\n")
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["train", "cdm", "--workspace", str(ws), "--log-with", "none", "--set",
                              f"train.prompts={tmp_path / 'p.csv'}", *TINY])
    assert res.exit_code == 0, res.output


def test_export_refusal_names_the_warmup():
    from cdmbench.export import _check_full_differs

    net = torch.nn.Linear(2, 2)
    meta = {"method": "cdm", "checkpoint": "step_0000002", "step": 2, "method_config": {"warmup": 100}}
    with pytest.raises(CdmbenchError) as e:
        _check_full_differs(net, net, meta)
    msg = str(e.value)
    assert "warmup=100" in msg and "2 training iterations" in msg and "--set warmup=0" in msg and "\n" not in msg


def test_locked_leaves_no_lock_file(tmp_path):
    from cdmbench.io import locked

    with locked(tmp_path / "results.csv"):
        assert (tmp_path / "results.csv.lock").exists()
        with pytest.raises(BlockingIOError):  # held: another open file description cannot take it
            import fcntl

            with open(tmp_path / "results.csv.lock") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# trackers


def test_a_toy_run_logs_scalars_an_image_and_hparams_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = tmp_path / "ws"
    res = runner.invoke(app, ["train", "cdm", "--workspace", str(ws), "--sample-images", "2", *TINY])
    assert res.exit_code == 0, res.output
    run = ws / "runs" / "cdm-toy"
    assert (run / "metrics.csv").read_text().startswith("step,key,value")  # the CSV health log stays
    events = sorted((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    tags = {"images": set(), "scalars": set(), "plugins": set()}
    images = []
    for ev in events:
        acc = EventAccumulator(str(ev.parent), size_guidance={"images": 0}).Reload()
        t = acc.Tags()
        tags["images"] |= set(t["images"])
        tags["scalars"] |= set(t["scalars"])
        try:
            tags["plugins"] |= set(acc.PluginTagToContent("hparams"))
        except KeyError:  # no hparams in this events file
            pass
        images += [im for tag in t["images"] for im in acc.Images(tag)]
    assert "loss/student" in tags["scalars"] or any(s.startswith("loss/") for s in tags["scalars"])
    assert any(tag.startswith("samples/") for tag in tags["images"]), tags
    assert sorted({im.step for im in images}) == [1, 2]  # one grid per checkpoint
    assert images[0].height > images[0].width > 0  # a row per step count (1, 2, 4), two prompts across
    assert "_hparams_/session_start_info" in tags["plugins"], tags
    hp = next((run / "tensorboard").rglob("hparams.yml")).read_text()
    assert "train.steps: 2" in hp and "method.warmup: 0" in hp and "backbone.device: cpu" in hp


def test_wandb_asked_but_not_installed_is_one_line(tmp_path):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    err = _one_error_line(runner.invoke(app, ["train", "cdm", "--workspace", str(tmp_path / "ws"), "--log-with",
                                              "wandb", *TINY]))
    assert "wandb" in err and "not installed" in err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", ["train", "eval", "report", "export"])
def test_every_option_has_help_and_flags_show_no_bool_metavar(command):
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    missing = [p.name for p in cmd.params if not getattr(p, "help", None) and p.param_type_name == "option"]
    assert not missing, f"{command}: options without help: {missing}"
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    lines = [ln for ln in res.stdout.splitlines() if "<bool>" in ln and "--help" not in ln]
    assert not lines, lines


def test_eval_scorer_options_reach_metric_options(tmp_path, monkeypatch):
    import cdmbench.eval.harness as harness

    seen = {}

    def fake_run_eval(cfg):
        seen["cfg"] = cfg
        return tmp_path / "results.csv"

    monkeypatch.setattr(harness, "run_eval", fake_run_eval)
    (tmp_path / "ws").mkdir()
    res = runner.invoke(app, ["eval", "--workspace", str(tmp_path / "ws"), "--arch", "toy", "--quiet", "--cpu",
                              "--fid-reference", "/refs/coco.npz", "--hps-weights", "/w/hps.pt", "--clip-prefix",
                              "A photo depicts ", "--lpips-net", "vgg"])
    assert res.exit_code == 0, res.output
    opts = seen["cfg"].metric_options
    assert (opts.fid_reference, opts.hps_path, opts.clip_prefix, opts.lpips_net) == (
        "/refs/coco.npz", "/w/hps.pt", "A photo depicts ", "vgg")
    assert seen["cfg"].device == "cpu"
    assert re.search("results", res.stdout)
