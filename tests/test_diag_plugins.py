"""A broken plug-in in any entry-point group warns one line naming it and never breaks the CLI or the built-ins."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdmbench.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"cdmbench.methods": "method", "cdmbench.backbones": "backbone", "cdmbench.metrics": "metric"}


def write_plugin(folder: Path, groups: dict[str, list[str]]) -> None:
    """A fake installed distribution whose entry points are ``groups`` (group → "name = module:attr" lines)."""
    pkg = folder / "brokenplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad_import.py").write_text("import a_module_that_does_not_exist_xyz\n")
    (pkg / "bad_syntax.py").write_text("def (:\n")
    (pkg / "good.py").write_text("class Good:\n    paper = 'a test plug-in'\n")
    dist = folder / "brokenplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "".join(f"{line}\n" for line in lines) for g, lines in groups.items())
    )


def test_broken_entry_point_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    write_plugin(tmp_path, {"cdmbench.test_widgets": ["bad = brokenplug.bad_import:X", "worse = brokenplug.bad_syntax:X",
                                                      "missing = brokenplug.good:NoSuchName", "good = brokenplug.good:Good"]})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widget", entry_point_group="cdmbench.test_widgets")
    reg.register("builtin")(dict)
    assert reg.names() == ["builtin", "good"]
    assert reg.get("builtin") is dict and reg.is_plugin("good")
    assert set(reg.broken()) == {"bad", "worse", "missing"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3, err
    assert all(line.startswith("warning: skipping widget plug-in '") for line in err)
    assert any("'bad' (brokenplug.bad_import:X): ModuleNotFoundError" in line for line in err)
    reg.names()  # loaded once: no second warning
    assert capsys.readouterr().err == ""


# One fresh interpreter (the registries are process-wide) runs the CLI four times through typer's runner.
_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from cdmbench.cli import app
out = {}
for args in (["--help"], ["methods"], ["arches"], ["metrics"]):
    r = CliRunner().invoke(app, args)
    out[args[0]] = [r.exit_code, r.stdout, repr(r.exception) if r.exception and r.exit_code else "", r.stderr]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def cli_with_broken_plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    write_plugin(folder, {g: [f"broken{kind} = brokenplug.bad_import:X"] for g, kind in GROUPS.items()})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=folder, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout.split("RESULT", 1)[1]), r.stderr


def test_cli_help_and_builtins_survive_a_broken_plugin_in_each_group(cli_with_broken_plugins):
    from cdmbench.backbones import BACKBONES
    from cdmbench.eval.metrics import METRICS
    from cdmbench.methods import METHODS

    out, stderr = cli_with_broken_plugins
    code, text, exc, _ = out["--help"]
    assert code == 0 and not exc and "train" in text
    stderr += "".join(o[3] for o in out.values())  # warnings printed while a command ran are captured by the runner
    warned = [line for line in stderr.splitlines() if line.startswith("warning: skipping")]
    for kind in GROUPS.values():
        assert sum(f"{kind} plug-in 'broken{kind}' (brokenplug.bad_import:X): ModuleNotFoundError" in line
                   for line in warned) == 1, stderr
    for command, reg in (("methods", METHODS), ("arches", BACKBONES), ("metrics", METRICS)):
        code, text, exc, _ = out[command]
        assert code == 0 and not exc, (command, exc)
        listed = {line.split()[0] for line in text.splitlines() if line.strip()}
        assert set(reg.names()) <= listed, (command, text)  # every built-in still listed
