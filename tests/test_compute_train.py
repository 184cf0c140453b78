"""Compute accounting in the training loop: a hand-counted method, every registered method, compute
budgets and resumes."""

from dataclasses import dataclass

import pytest
import torch

from cdmbench.io import read_json
from cdmbench.methods import METHODS
from cdmbench.methods.base import Method, OptimSpec, StepOutput
from cdmbench.train import COMPUTE_FILE, resolve_config, train
from conftest import tiny_overrides


@dataclass(frozen=True)
class HandConfig:
    lr: float = 1e-4  # student learning rate
    warmup: int = 0  # LR warm-up iterations


class HandCount(Method):
    """Per iteration of batch B, by hand: teacher 2 forward calls (B rows, then a CFG-style 2B), no
    backward; student 1 forward of B rows, back-propagated once."""

    Config = HandConfig
    loss_keys = ("loss",)

    def optim_specs(self):
        return {"student": OptimSpec(lr=self.config.lr)}

    def optimizers_for(self, step):
        return ("student",)

    def train_step(self, batch, step, update):
        b = batch.size
        x = torch.randn(b, *self.backbone.latent_shape, device=self.backbone.device)
        s = torch.full((b,), 0.5, device=x.device)
        with torch.no_grad():
            target = self.v(self.teacher, x, s, batch.cond)
            self.v(self.teacher, torch.cat([x, x]), torch.cat([s, s]), batch.cond.repeat(2))
        loss = ((self.v("student", x, s, batch.cond) - target) ** 2).mean()
        update("student", loss)
        return StepOutput({"loss": loss.detach()})


@pytest.fixture
def hand(monkeypatch):
    monkeypatch.setitem(METHODS._entries, "handcount", HandCount)
    HandCount.name = "handcount"
    return "handcount"


def hand_cfg(steps, **extra):
    over = {"train.steps": str(steps), "train.batch_size": "2", "train.checkpoint_every": "2", "train.log_every": "1"}
    return resolve_config("handcount", "toy", {**over, **{k: str(v) for k, v in extra.items()}})


def test_loop_counts_the_hand_count(hand, tmp_path):
    train(hand_cfg(3), tmp_path / "r", progress=False)
    c = read_json(tmp_path / "r" / COMPUTE_FILE)
    p = c["passes"]
    assert p["teacher"] == {"fwd_calls": 2 * 3, "fwd_samples": 3 * 2 * 3, "bwd_calls": 0, "bwd_samples": 0}
    assert p["student"] == {"fwd_calls": 3, "fwd_samples": 2 * 3, "bwd_calls": 3, "bwd_samples": 2 * 3}
    assert p["text_encoder"]["fwd_calls"] == 3 and p["text_encoder"]["bwd_calls"] == 0  # one encode per batch
    f = c["flops_per_sample"]
    # the student is a copy of the teacher: the same forward FLOPs per sample
    assert f["student"]["forward"] == f["teacher"]["forward"] > 0
    per_iter = 3 * 2 * f["teacher"]["forward"] + 2 * (f["student"]["forward"] + f["student"]["backward"]) \
        + 2 * f["text_encoder"]["forward"]
    assert c["train_tflops"] * 1e12 == pytest.approx(3 * per_iter)
    assert c["measured_iterations"][0]["flops"] == pytest.approx(per_iter, rel=0.02)  # loss math: not networks
    assert c["unmeasured_roles"] == [] and c["iterations"] == 3
    assert read_json(tmp_path / "r" / "done.json")["compute"]["passes"] == p


def test_budget_stops_within_one_iteration(hand, tmp_path):
    train(hand_cfg(1), tmp_path / "one", progress=False)
    per_iter = read_json(tmp_path / "one" / COMPUTE_FILE)["train_tflops"]
    budget = 2.5 * per_iter
    train(hand_cfg(50, **{"train.budget_tflops": budget}), tmp_path / "b", progress=False)
    done = read_json(tmp_path / "b" / "done.json")
    spent = done["compute"]["train_tflops"]
    assert done["steps"] == 3 and done["stopped_by"].startswith("budget_tflops")
    assert spent >= budget and spent - per_iter < budget
    assert read_json(tmp_path / "b" / COMPUTE_FILE)["step"] == 3  # the budget's checkpoint is written


def test_checkpoints_at_every_crossed_share_of_the_compute(hand, tmp_path):
    from cdmbench.checkpoint import CKPT_DIR

    train(hand_cfg(1), tmp_path / "one", progress=False)
    per_iter = read_json(tmp_path / "one" / COMPUTE_FILE)["train_tflops"]  # every iteration costs the same
    budget = 9.5 * per_iter  # crossings of budget/4 = 2.375 iterations: after iterations 3, 5, 8, and the budget's 10
    train(hand_cfg(50, **{"train.budget_tflops": budget, "train.checkpoint_every": 50,
                          "train.checkpoint_every_tflops": budget / 4, "train.keep_checkpoints": 10}),
          tmp_path / "b", progress=False)
    kept = {int(c.name.split("_")[1]): c for c in (tmp_path / "b" / CKPT_DIR).glob("step_*")}
    assert sorted(kept) == [3, 5, 8, 10]
    for step, folder in kept.items():  # each is the first iteration at or past its share of the budget
        assert read_json(folder / "meta.json")["compute"]["train_tflops"] == pytest.approx(step * per_iter)


def test_resumed_run_keeps_its_compute_totals(hand, tmp_path):
    cfg = hand_cfg(4)
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "killed", progress=False, stop_after=3)  # checkpoint at 2, killed after 3
    train(cfg, tmp_path / "killed", resume=True, progress=False)
    a, b = (read_json(tmp_path / r / COMPUTE_FILE) for r in ("straight", "killed"))
    assert a["passes"] == b["passes"] and a["iterations"] == b["iterations"] == 4
    assert b["train_tflops"] == pytest.approx(a["train_tflops"])
    assert len(b["measured_iterations"]) == len(a["measured_iterations"])  # not measured again


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_records_its_compute(name, tmp_path):
    cfg = resolve_config(name, "toy", tiny_overrides(name, steps=2))
    train(cfg, tmp_path / "r", progress=False)
    c = read_json(tmp_path / "r" / COMPUTE_FILE)
    assert c["unmeasured_roles"] == []
    assert c["passes"]["student"]["fwd_samples"] > 0 and c["passes"]["student"]["bwd_samples"] > 0
    assert c["passes"]["teacher"]["fwd_samples"] > 0 and c["train_tflops"] > 0
    meta = read_json(tmp_path / "r" / "checkpoints" / "step_0000002" / "meta.json")
    assert meta["compute"]["train_tflops"] == c["train_tflops"]
