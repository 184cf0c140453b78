"""Reliability and security, one test per failure class (issue 14): names that would escape their folder,
unbounded counts, corrupt results and manifests, concurrent appends and evals, crafted export folders,
downloads without opt-in, file modes. Training-state faults are in test_reliability_train.py, the CLI
bad-input matrix in test_reliability_matrix.py."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdmbench.errors import CdmbenchError, CorruptStateError, MissingWeightsError
from cdmbench.eval.results import RESULT_COLUMNS, append_rows, read_results
from cdmbench.paths import check_count, check_device, check_name, check_writable_dir
from cdmbench.seeding import parse_int_list

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# 1. names that become paths


@pytest.mark.parametrize("bad", ["../x", "../../x", "/abs", ".", "..", "", "a/b", ".hidden", "a\\b", "x" * 200,
                                 "a\x00b", "ü", " lead", "run name"])
def test_a_name_that_is_not_a_plain_name_is_refused(bad):
    with pytest.raises(CdmbenchError, match="--run-name.*not a plain name"):
        check_name(bad, "--run-name")


@pytest.mark.parametrize("good", ["cdm-toy", "run_1", "a.b", "x@2", "A=B", "7"])
def test_plain_names_pass(good):
    assert check_name(good, "--run-name") == good


def test_the_checkpoint_pointer_is_never_joined_into_a_path(tmp_path):
    from cdmbench.checkpoint import latest_checkpoint

    (tmp_path / "outside").mkdir()
    ptr = tmp_path / "run" / "checkpoints" / "latest"
    ptr.parent.mkdir(parents=True)
    for content in ("../../outside", "/etc", "step_1/../../x"):
        ptr.write_text(content + "\n")
        with pytest.raises(CorruptStateError, match="not a checkpoint folder name"):
            latest_checkpoint(tmp_path / "run")


def test_external_names_are_validated_by_the_eval_config():
    from cdmbench.eval.harness import EvalConfig

    with pytest.raises(CdmbenchError, match="external NAME.*not a plain name"):
        EvalConfig(external=("../../../esc=some/model",), arch="toy")
    with pytest.raises(CdmbenchError, match="runs.*not a plain name"):
        EvalConfig(runs=("../x",))


# --------------------------------------------------------------------------------------------------
# 3. bounded counts


@pytest.mark.parametrize("text", ["0-99999999999999", "99999999999999999999", "0-10001", "1," * 10001 + "1"])
def test_huge_lists_fail_before_they_are_built(text):
    with pytest.raises(CdmbenchError, match="--seeds"):
        parse_int_list(text, name="seeds")


def test_step_and_batch_bounds():
    from cdmbench.eval.harness import EvalConfig

    with pytest.raises(CdmbenchError, match="at most 1000"):
        EvalConfig(steps=(1001,))
    with pytest.raises(CdmbenchError, match="batch_size"):
        EvalConfig(batch_size=10**9)
    with pytest.raises(CdmbenchError, match="num_prompts"):
        EvalConfig(num_prompts=10**12)
    assert check_count(None, "x", maximum=3) is None
    with pytest.raises(CdmbenchError, match="x must be an integer in"):
        check_count(True, "x", maximum=3)


# --------------------------------------------------------------------------------------------------
# 7. devices


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "", "gpu", "cpu:0:1"])
def test_unknown_devices_are_errors(bad):
    with pytest.raises(CdmbenchError, match="--device"):
        check_device(bad)


def test_an_absent_accelerator_is_an_error_not_the_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CdmbenchError, match="not available on this machine"):
        check_device("cuda")
    assert check_device("cpu") == "cpu"


# --------------------------------------------------------------------------------------------------
# 4. results: which line is bad; idempotent, locked appends

HEADER = ",".join(RESULT_COLUMNS)
ROW = 'a,cdm,toy,1,fid,1.5,nan,nan,10,False,p,1,"[1.0]","[1.0]",1.0,ck,t,ok' + "," * (len(RESULT_COLUMNS) - 18)


@pytest.mark.parametrize("text,match", [
    ("", "is empty"),
    ("\x00\x01garbage\"\n,,", "cannot be parsed|lacks [0-9]+ of"),
    (f"{HEADER}\n{ROW}\n{ROW[:25]}", "line 3: column 'ci_high'"),
    (f"{HEADER}\n{ROW}\n{ROW.replace('1.5', 'abc')}\n", "line 3: column 'value' holds 'abc'"),
    (f"{HEADER}\n{ROW.replace(',10,', ',ten,')}\n", "line 2: column 'n'"),
    (f"{HEADER}\n{ROW},extra\n", "cannot be parsed|line 2"),
    ("x,y\n1,2\n", "lacks [0-9]+ of the result columns"),
    (f"{HEADER}\n{ROW.replace(',ok,', ',fine,')}\n", "line 2: status must be"),
])
def test_a_bad_results_file_names_the_file_and_the_line(tmp_path, text, match):
    p = tmp_path / "results.csv"
    p.write_text(text)
    with pytest.raises(CorruptStateError, match=match) as e:
        read_results(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def _rows(n, run="r"):
    return [dict(zip(RESULT_COLUMNS, [run, "cdm", "toy", s, "fid", 1.0 + s, float("nan"), float("nan"), 4, False,
                                      "p", s, "[1.0]", "[1.0]", 1.0, "ck", f"t{s}", "ok"])) for s in range(1, n + 1)]


def _key(r):
    return tuple(str(v) for k, v in r.items() if k != "timestamp")


def test_keyed_appends_are_idempotent(tmp_path):
    p = tmp_path / "results.csv"
    append_rows(p, _rows(3), key=_key)
    again = [{**r, "timestamp": "later"} for r in _rows(3)]
    append_rows(p, again + _rows(4)[3:], key=_key)
    df = read_results(p)
    assert len(df) == 4 and list(df["steps"]) == [1, 2, 3, 4]


def test_two_processes_appending_the_same_rows_write_them_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_reliability import _rows, _key
        from cdmbench.eval.results import append_rows
        for i in range(1, 21):
            append_rows({str(tmp_path / 'results.csv')!r}, _rows(i), key=_key)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    df = read_results(tmp_path / "results.csv")
    assert len(df) == 20 and sorted(df["steps"]) == list(range(1, 21))


# --------------------------------------------------------------------------------------------------
# 7. the image manifest: torn lines


def test_a_torn_manifest_line_is_repaired_and_a_damaged_one_ignored(tmp_path, caplog):
    from cdmbench.eval.generate import Manifest

    m = Manifest(tmp_path / "manifest.jsonl")
    m.append({"path": "images/a/1/p_s0.png", "x": 1})
    with open(m.path, "a") as f:
        f.write('{"path": "images/a/1/p_s1.png", "x"')  # a kill mid-line
    assert set(m.read()) == {"images/a/1/p_s0.png"}  # a torn final line is an append in progress
    m.append({"path": "images/a/1/p_s2.png", "x": 2})  # the next append cuts the torn tail first
    lines = m.path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(ln) for ln in lines)
    with open(m.path, "a") as f:
        f.write("\x00\x00 not json\n[1, 2]\n")  # damage in the middle
    m.append({"path": "images/a/1/p_s3.png", "x": 3})
    with caplog.at_level("WARNING"):
        records = m.read()
    assert set(records) == {"images/a/1/p_s0.png", "images/a/1/p_s2.png", "images/a/1/p_s3.png"}
    assert "ignoring 2 unreadable line(s) (line 3, 4)" in caplog.text


def test_report_reads_a_manifest_with_a_torn_line(tmp_path):
    from cdmbench.eval.results import read_manifest

    rec = {"run": "r", "method": "m", "arch": "toy", "steps": 1, "prompt_id": "p", "prompt": "x", "seed": 0,
           "path": "images/r/1/p_s0.png"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(rec) + "\n" + '{"run": "r", "meth')
    assert len(read_manifest(tmp_path / "manifest.jsonl")) == 1


# --------------------------------------------------------------------------------------------------
# 7. two concurrent evals on one workspace (two real processes)


def test_two_concurrent_evals_make_each_image_once_and_no_duplicate_rows(tmp_path):
    args = [sys.executable, "-m", "cdmbench.cli", "eval", "--workspace", str(tmp_path), "--arch", "toy",
            "--steps", "1", "--teacher-steps", "1,2", "--prompts", "toy", "--num-prompts", "6", "--seeds", "0-1",
            "--metrics", "fid,attr_acc", "--batch-size", "4", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = [json.loads(ln) for ln in (tmp_path / "eval" / "manifest.jsonl").read_text().splitlines()]
    paths = [r["path"] for r in lines]
    assert len(paths) == len(set(paths)) == 12 * 2  # 6 prompts x 2 seeds, at 1 and 2 teacher steps
    df = read_results(tmp_path / "eval" / "results.csv")
    assert len(df) == len(df.drop_duplicates(["run", "steps", "metric"])) == 2 * 2


# --------------------------------------------------------------------------------------------------
# 2. an exported folder is data, never loader options or code


def _fake_export(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format_version": 1, "arch": "sd3", "pipeline_class": "StableDiffusion3Pipeline",
              "from_pretrained_kwargs": {}, "attributes": {}, "lora_weight_name": None, "call_kwargs": {}}
    record.update(changes)
    (folder / "cdmbench_student.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize("changes,match", [
    ({"from_pretrained_kwargs": {"trust_remote_code": True}}, "loader options"),
    ({"from_pretrained_kwargs": {"custom_pipeline": "evil"}}, "loader options"),
    ({"attributes": {"__class__": "x"}}, "attribute '__class__'"),
    ({"attributes": {"tokenizer_max_length": "512; import os"}}, "attribute 'tokenizer_max_length'"),
    ({"attributes": {"encode_prompt": 1}}, "attribute 'encode_prompt'"),
    ({"pipeline_class": "DiffusionPipeline"}, "pipeline_class"),
    ({"arch": "evil"}, "not a registered backbone"),
    ({"arch": "toy"}, "does not export diffusers"),
    ({"lora_weight_name": "../../weights.safetensors"}, "lora_weight_name"),
])
def test_a_crafted_export_record_cannot_set_loader_options(tmp_path, changes, match):
    from cdmbench.export import load_exported_pipeline

    with pytest.raises(CdmbenchError, match=match):
        load_exported_pipeline(_fake_export(tmp_path / "x", **changes))


def test_code_in_an_exported_folder_does_not_run(tmp_path):
    """A model_index.json naming a component class from a .py file in the folder: refused without
    --allow-remote-code, and the file is never imported."""
    from cdmbench.export import load_exported_pipeline

    folder = _fake_export(tmp_path / "x")
    marker = tmp_path / "ran"
    (folder / "transformer").mkdir()
    (folder / "transformer" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n")
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                         "_diffusers_version": "0.42.1",
                                                         "transformer": ["evil", "Evil"]}))
    with pytest.raises(Exception):
        load_exported_pipeline(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# 8. weights: nothing downloads unless asked; the Inception TorchScript is checked before it runs


@pytest.fixture
def online_but_watched(monkeypatch):
    """An online machine (HF_HUB_OFFLINE unset) where any network connection is recorded and refused."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CDMBENCH_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("CDMBENCH_INCEPTION_PATH", "CDMBENCH_HPS_PATH", "CDMBENCH_IMAGEREWARD_PATH",
                "CDMBENCH_CLIP_PRETRAINED", "CDMBENCH_FID_REF"):
        monkeypatch.delenv(var, raising=False)
    attempts = []

    def connect(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))
    return attempts


def test_no_scorer_downloads_without_opt_in(online_but_watched, tmp_path, monkeypatch):
    from cdmbench.eval.metrics import METRICS, MetricOptions, build_metric
    from cdmbench.eval.scoring import evaluators_for

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ref = tmp_path / "ref.npz"
    import numpy as np

    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    sd3 = evaluators_for("sd3")
    checked = 0
    for name in METRICS.names():
        if not METRICS.get(name).applies_to(sd3):
            continue
        with pytest.raises(CdmbenchError):  # missing weights (or a missing package), never a download
            build_metric(name, sd3, MetricOptions(fid_reference=str(ref)))
        checked += 1
    assert checked >= 5  # fid, clip, hps, imagereward, pickscore, aesthetic, ... apply to sd3
    assert online_but_watched == []


def test_resolve_weights_asks_the_hub_cache_only(online_but_watched, monkeypatch):
    import huggingface_hub

    from cdmbench.eval.metrics.base import resolve_weights

    seen = {}

    def fake(repo, filename, local_files_only=False, **kw):
        seen["local_files_only"] = local_files_only
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    with pytest.raises(MissingWeightsError, match="--allow-download"):
        resolve_weights(None, "o/r", "f.pt", "weights f.pt", "pass a path")
    assert seen["local_files_only"] is True
    monkeypatch.setenv("CDMBENCH_ALLOW_DOWNLOAD", "1")
    with pytest.raises(MissingWeightsError):
        resolve_weights(None, "o/r", "f.pt", "weights f.pt", "pass a path")
    assert seen["local_files_only"] is False


def test_the_inception_torchscript_is_checked_before_it_runs(tmp_path, monkeypatch):
    from cdmbench.eval.metrics.fid import INCEPTION_FILE, check_inception_file

    f = tmp_path / INCEPTION_FILE
    f.write_bytes(b"not really torchscript")
    f.chmod(0o644)
    check_inception_file(f, trusted_dir=True)  # the user named it; no recorded hash
    with pytest.raises(CdmbenchError, match="no recorded sha256"):
        check_inception_file(f, trusted_dir=False)  # cdmbench's cache: a hash is recorded at download
    (tmp_path / (INCEPTION_FILE + ".sha256")).write_text("0" * 64 + "\n")
    with pytest.raises(CdmbenchError, match="does not match its expected sha256"):
        check_inception_file(f, trusted_dir=True)
    import hashlib

    monkeypatch.setenv("CDMBENCH_INCEPTION_SHA256", hashlib.sha256(f.read_bytes()).hexdigest())
    check_inception_file(f, trusted_dir=False)
    f.chmod(0o666)
    with pytest.raises(CdmbenchError, match="others cannot write"):
        check_inception_file(f, trusted_dir=True)


def test_the_default_inception_cache_is_not_a_shared_folder(monkeypatch, tmp_path):
    from cdmbench.eval.metrics.fid import _inception_cache_dir

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert _inception_cache_dir() == Path.home() / ".cache" / "cdmbench"


# --------------------------------------------------------------------------------------------------
# files honour the umask; folders are checked before work starts


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    from cdmbench.io import save_safetensors, write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        import torch

        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for name in ("a.json", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_workspace_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "ws"
    f.write_text("x")
    with pytest.raises(CdmbenchError, match="is not a folder"):
        check_writable_dir(f, "--workspace")
    with pytest.raises(CdmbenchError, match="is not a folder"):
        check_writable_dir(f / "runs", "--workspace")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_workspace_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CdmbenchError, match="not writable"):
            check_writable_dir(ro / "runs", "--workspace")
    finally:
        ro.chmod(0o755)
