"""The training loop: resume equality, NaN guard, atomic checkpoints, config validation."""

import json

import pytest
import torch

from cdmbench.backbones.base import BackboneOptions
from cdmbench.checkpoint import latest_checkpoint, load_checkpoint
from cdmbench.errors import CdmbenchError, NonFiniteError
from cdmbench.methods import METHODS
from cdmbench.run import resolve_config
from cdmbench.train import train
from conftest import tiny_overrides
from tiny_pipelines import TEXT_LEN, tiny_sd3_dir  # noqa: F401 (fixture)


@pytest.mark.parametrize("name", METHODS.names())
def test_resume_after_a_kill_matches_an_uninterrupted_run(name, tmp_path):
    cfg = resolve_config(name, "toy", {**tiny_overrides(name, steps=4), "train.checkpoint_every": "2"})
    straight = train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "killed", progress=False, stop_after=3)  # dies after iteration 3, checkpoint at 2
    assert latest_checkpoint(tmp_path / "killed").name == "step_0000002"
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    a, b = load_checkpoint(straight)[0], load_checkpoint(resumed)[0]
    assert a.keys() == b.keys()
    for net in a:
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], atol=0, rtol=0, msg=f"{net}.{k}")


def test_lora_resume_after_a_kill_matches_an_uninterrupted_run(tiny_sd3_dir, tmp_path):
    """LoRA checkpoints hold adapter weights only; resuming loads them (and the EMA, the optimisers) back.
    Killed after iteration 1: the student (CDM: every 2nd iteration) has not stepped, its optimiser is empty."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a table\na blue car in the rain\n")
    options = BackboneOptions(model=str(tiny_sd3_dir), resolution=32, max_sequence_length=TEXT_LEN, lora_rank=2)
    cfg = resolve_config("cdm", "sd3", {**tiny_overrides("cdm", steps=3), "train.prompts": str(prompts),
                                        "train.mixed_precision": "no"}, options)
    straight = train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "killed", progress=False, stop_after=1)
    assert latest_checkpoint(tmp_path / "killed").name == "step_0000001"
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    (a, state, _, _), (b, _, _, _) = load_checkpoint(straight), load_checkpoint(resumed)
    assert a.keys() == b.keys() == {"student", "student_ema", "fake_score"}
    assert state["counts"] == {"student": 1, "fake_score": 3}
    for net in a:
        assert a[net].keys() == b[net].keys() and all("lora_" in k for k in a[net])
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], atol=0, rtol=0, msg=f"{net}.{k}")
    assert not torch.equal(a["student"]["transformer_blocks.0.attn.to_q.lora_B.weight"],
                           a["student_ema"]["transformer_blocks.0.attn.to_q.lora_B.weight"])


def test_lora_under_fsdp_fails_early(monkeypatch, tmp_path):
    from accelerate import Accelerator, DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    cfg = resolve_config("cdm", "toy", tiny_overrides("cdm", steps=1), BackboneOptions(lora_rank=2))
    with pytest.raises(CdmbenchError, match="LoRA .* does not run under FSDP"):
        train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = resolve_config("cdm", "toy", {**tiny_overrides("cdm", steps=6), "train.checkpoint_every": "2"})
    cls = METHODS.get("cdm")
    original = cls.train_step

    def poisoned(self, batch, step, update):
        if step == 3:
            return original(self, batch, step, lambda n, loss: update(n, loss * float("nan")))
        return original(self, batch, step, update)

    monkeypatch.setattr(cls, "train_step", poisoned)
    with pytest.raises(NonFiniteError, match="step_0000002"):
        train(cfg, tmp_path / "run", progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_0000002"
    nets, *_ = load_checkpoint(ckpt)
    assert all(torch.isfinite(v).all() for v in nets["student"].values())
    assert not (tmp_path / "run" / "done.json").exists()
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


def test_run_folder_holds_the_resolved_config(tmp_path):
    cfg = resolve_config("dmd2", "toy", tiny_overrides("dmd2", steps=1))
    train(cfg, tmp_path / "r", progress=False)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["method"] == "dmd2" and saved["arch"] == "toy"
    assert saved["method_config"]["real_guidance"] == 2.0  # the toy preset
    assert saved["train"]["steps"] == 1
    with pytest.raises(CdmbenchError, match="already exists"):
        train(cfg, tmp_path / "r", progress=False)


def test_overrides_are_validated():
    with pytest.raises(CdmbenchError, match="valid:.*guidance"):
        resolve_config("cdm", "toy", {"guidanse": "3"})
    with pytest.raises(CdmbenchError, match="expected float"):
        resolve_config("cdm", "toy", {"guidance": "high"})
    with pytest.raises(CdmbenchError, match="must be one of"):
        resolve_config("cdm", "toy", {"student_xt_mode": "sideways"})
    with pytest.raises(CdmbenchError, match="train.batch_size must be >= 1|batch_size must be >= 1"):
        resolve_config("cdm", "toy", {"train.batch_size": "0"})
    with pytest.raises(CdmbenchError, match="valid methods: cd, cdm"):
        resolve_config("cmd", "toy")
    with pytest.raises(CdmbenchError, match="valid backbones:.*toy"):
        resolve_config("cdm", "toyy")
