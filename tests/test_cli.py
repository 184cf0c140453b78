"""The CLI: help/listing from the registries, --dry-run, one-line errors with non-zero exits."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from cdmbench.cli import app

runner = CliRunner()


def test_help_lists_registry_choices():
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})  # rich wraps a long choice list at 80
    assert res.exit_code == 0
    from cdmbench.backbones import BACKBONES
    from cdmbench.methods import METHODS

    for name in METHODS.names() + BACKBONES.names():
        assert name in res.output


def test_listing_commands():
    from cdmbench.methods import METHODS

    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    assert [ln.split()[0] for ln in res.output.strip().splitlines()] == METHODS.names()
    res = runner.invoke(app, ["arches"])
    assert res.exit_code == 0 and "toy" in res.output


def test_dry_run_prints_the_resolved_config():
    res = runner.invoke(app, ["train", "cdm", "--arch", "toy", "--dry-run", "--set", "guidance=5", "--steps-budget", "7"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["method_config"]["guidance"] == 5.0 and cfg["train"]["steps"] == 7
    assert cfg["method_config"]["student_xt_mode"] == "trajectory_eps"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cdmbench.cli", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_bad_arch_is_one_clear_line_and_non_zero():
    res = _run("train", "cdm", "--arch", "nope", "--dry-run")
    assert res.returncode != 0
    assert "nope" in res.stderr and "toy" in res.stderr and "Traceback" not in res.stderr


def test_bad_steps_is_one_clear_line_and_non_zero():
    res = _run("eval", "--steps", "1,x")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "--steps" in lines[0] and "Traceback" not in res.stderr


def test_bad_setting_is_one_clear_line():
    res = _run("train", "cdm", "--set", "guidanse=3", "--dry-run")
    assert res.returncode == 2 and "guidanse" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from cdmbench.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('diffusers', 'open_clip', 'torchmetrics', 'transformers', 'cleanfid') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
