"""Run-folder faults (issue 14, items 4-6): a corrupt checkpoint falls back to the previous intact one, a run
that died before its first checkpoint restarts, --resume refuses a changed config (--force for safe changes),
and nothing is written before training can start."""

import json
import shutil

import pytest
import torch

from cdmbench.checkpoint import latest_checkpoint, load_checkpoint, load_newest_intact
from cdmbench.errors import CdmbenchError, CorruptStateError
from cdmbench.resume import check_start, read_run_config
from cdmbench.train import resolve_config, train
from conftest import tiny_overrides

METHOD = "dmd2"


def _cfg(**extra):
    return resolve_config(METHOD, "toy", {**tiny_overrides(METHOD, steps=3, batch=1), "train.keep_checkpoints": "3",
                                          **extra})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-iteration run with checkpoints at 1, 2 and 3 (copy it before damaging it)."""
    run = tmp_path_factory.mktemp("rel") / "run"
    train(_cfg(), run, progress=False)
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _truncate(path, keep=100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


# --------------------------------------------------------------------------------------------------
# 4. every damaged checkpoint is detected; resume falls back to the newest intact one


@pytest.mark.parametrize("damage", ["truncate student_ema", "truncate student", "delete fake_score",
                                    "delete student_ema", "truncate training_state", "bad meta", "delete meta",
                                    "partial meta", "bad pointer", "pointer escapes"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, damage):
    run = _copy(finished, tmp_path)
    last = run / "checkpoints" / "step_0000003"
    if damage.startswith("truncate"):
        name = damage.split()[1]
        _truncate(last / (f"{name}.pt" if name == "training_state" else f"{name}.safetensors"))
    elif damage.startswith("delete") and damage != "delete meta":
        (last / f"{damage.split()[1]}.safetensors").unlink()
    elif damage == "bad meta":
        (last / "meta.json").write_text("{not json")
    elif damage == "delete meta":
        (last / "meta.json").unlink()
    elif damage == "partial meta":
        (last / "meta.json").write_text('{"method": "dmd2"}')
    elif damage == "bad pointer":
        (run / "checkpoints" / "latest").write_text("\x00garbage")
    else:
        (run / "checkpoints" / "latest").write_text("../../../etc\n")
    ckpt, loaded, notes = load_newest_intact(run, ["student", "fake_score"])
    if damage.endswith("pointer") or damage == "pointer escapes":
        assert ckpt.name == "step_0000003" and any("pointer" in n for n in notes)
        return
    assert ckpt.name == "step_0000002" and len(notes) == 1 and "step_0000003" in notes[0]
    if damage.startswith(("truncate", "delete")) and damage != "delete meta":
        with pytest.raises(CorruptStateError, match="step_0000003"):
            load_checkpoint(last)


def test_resume_from_a_corrupt_checkpoint_continues_from_the_previous_one_exactly(finished, tmp_path, caplog):
    run = _copy(finished, tmp_path)
    original = load_checkpoint(finished / "checkpoints" / "step_0000003")[0]
    _truncate(run / "checkpoints" / "step_0000003" / "student_ema.safetensors")
    torn = run / "checkpoints" / "step_0000004.tmp"  # a kill -9 during a checkpoint write leaves this
    torn.mkdir()
    (torn / "student.safetensors").write_bytes(b"\x00" * 10)
    with caplog.at_level("WARNING"):
        final = train(_cfg(), run, resume=True, progress=False)
    assert "resuming from step_0000002 instead" in caplog.text
    again = load_checkpoint(final)[0]
    for net in original:  # the redone iteration is the one the uninterrupted run did
        for k in original[net]:
            torch.testing.assert_close(again[net][k], original[net][k], atol=0, rtol=0)
    assert (run / "done.json").is_file() and latest_checkpoint(run) == final and not torn.exists()


def test_no_intact_checkpoint_is_one_line(finished, tmp_path):
    run = _copy(finished, tmp_path)
    for p in (run / "checkpoints").glob("step_*"):
        (p / "training_state.pt").write_bytes(b"")
    with pytest.raises(CorruptStateError, match="no intact checkpoint") as e:
        train(_cfg(), run, resume=True, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", ["", "{", '{"method": "dmd2"}', "[1, 2]", '{"method": "nope", "arch": "toy"}'])
def test_a_bad_run_config_is_one_line(finished, tmp_path, content):
    run = _copy(finished, tmp_path)
    (run / "config.json").write_text(content)
    with pytest.raises(CorruptStateError, match="config.json"):
        read_run_config(run)
    with pytest.raises(CdmbenchError, match="config.json"):
        check_start(run, _cfg().to_dict(), resume=True)


# --------------------------------------------------------------------------------------------------
# 6. --resume compares the whole config; --force for what is safe to change


def test_resume_refuses_a_changed_training_config_listing_the_differences(finished):
    with pytest.raises(CdmbenchError, match=r"train.seed: 0 -> 7; train.batch_size: 1 -> 2|train.batch_size: 1 -> 2; "
                                            r"train.seed: 0 -> 7") as e:
        check_start(finished, _cfg(**{"train.seed": "7", "train.batch_size": "2"}).to_dict(), resume=True)
    assert "start a new --run-name" in str(e.value)
    with pytest.raises(CdmbenchError, match="backbone.lora_rank: 0 -> 2"):
        check_start(finished, _cfg(**{"backbone.lora_rank": "2"}).to_dict(), resume=True, force=True)
    with pytest.raises(CdmbenchError, match="method.real_guidance"):
        check_start(finished, _cfg(real_guidance="5").to_dict(), resume=True)
    other = resolve_config("ddmd", "toy", tiny_overrides("ddmd", steps=3, batch=1)).to_dict()
    with pytest.raises(CdmbenchError, match="method: 'dmd2' -> 'ddmd'"):
        check_start(finished, other, resume=True, force=True)


def test_force_accepts_a_longer_budget(finished):
    longer = _cfg(**{"train.steps": "5"}).to_dict()
    with pytest.raises(CdmbenchError, match="train.steps: 3 -> 5 \\(pass --force"):
        check_start(finished, longer, resume=True)
    assert check_start(finished, longer, resume=True, force=True).resume


def test_a_new_run_into_a_finished_folder_is_refused(finished):
    with pytest.raises(CdmbenchError, match="already exists; pass --resume"):
        check_start(finished, _cfg().to_dict(), resume=False)


# --------------------------------------------------------------------------------------------------
# 5. a run folder that never reached a checkpoint restarts; nothing is written before training can start


def test_a_run_that_died_before_its_first_checkpoint_restarts(tmp_path, caplog):
    cfg = _cfg(**{"train.steps": "1"})
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000001.tmp").mkdir(parents=True)  # killed during its first checkpoint write
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "metrics.csv").write_text("step,key,value\n0,loss/x,1\n0,lo")
    assert check_start(run, cfg.to_dict(), resume=True).restart  # --resume starts it afresh, too
    with caplog.at_level("WARNING"):
        final = train(cfg, run, progress=False)
    assert "starting it afresh" in caplog.text
    assert final.name == "step_0000001" and not list((run / "checkpoints").glob("*.tmp"))
    assert "loss/x" not in (run / "metrics.csv").read_text()  # the dead start's rows are gone


@pytest.mark.parametrize("override", [{"betas": "0.9"}, {"student_lr": "-1"}, {"fake_lr": "nan"},
                                      {"train.prompts": "/nonexistent/prompts.txt"}, {"train.seed": str(2**70)}])
def test_bad_settings_fail_before_the_run_folder_exists(tmp_path, override):
    with pytest.raises(CdmbenchError):
        train(resolve_config(METHOD, "toy", {**tiny_overrides(METHOD, steps=1), **override}), tmp_path / "r",
              progress=False)
    assert not (tmp_path / "r").exists()
