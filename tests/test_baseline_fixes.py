"""Fixes that a re-derivation against the papers / the official CDM code would catch (issue #12)."""

import pytest
import torch

from cdmbench.methods import METHODS


def _rollout(N: int, B: int, shape):
    """A rollout whose X0[k] is the constant k (so an index reads back from the values)."""
    from cdmbench.methods.cdm import Rollout

    X0 = torch.stack([torch.full((B, *shape), float(k)) for k in range(N + 1)])
    return Rollout(X=torch.randn(N + 1, B, *shape), X0=X0, V=torch.randn(N, B, *shape),
                   sigmas=torch.linspace(1, 0, N + 1))


def test_cdm_trajectory_eps_last_with_x0_next_uses_the_shared_index(toy, monkeypatch):
    """student_xt_mode=trajectory_eps_last fixes the *student* point at i = N−1; the teacher's x0_next base is
    X0[idx+1] at the shared index (byliutao/cdm scripts/train.py, 'Step A2': make_indices(shared_...))."""
    from cdmbench.config import apply_overrides

    M = METHODS.get("cdm")
    cfg = apply_overrides(M.Config(), {"student_xt_mode": "trajectory_eps_last", "teacher_x0_base": "x0_next"})
    m = M(toy, cfg)
    seen = {}

    def spy(x0_hat, sig_i, cond, method, x0_base=None, s_t=None, x_t=None):
        seen["base"], seen["sig_i"] = x0_base, sig_i
        return torch.zeros(())

    monkeypatch.setattr(m, "dm_loss", spy)
    N, idx = 4, torch.tensor([0, 2])
    m.cdm_loss(_rollout(N, 2, toy.latent_shape), idx, toy.encode_prompts(["a red circle", "a blue square"]))
    assert seen["base"][:, 0, 0, 0].tolist() == [1.0, 3.0]  # X0[idx+1], not X0[N] = 4
    torch.testing.assert_close(seen["sig_i"], torch.linspace(1, 0, N + 1)[[N - 1, N - 1]])  # student at N−1


def test_student_ema_decay_counts_completed_student_updates(tmp_path, monkeypatch):
    """decay_k = min((1+k)/(10+k), 0.999) with k = student updates so far, 1 after the first (cdm.md §6;
    byliutao/cdm calls EMAModuleWrapper.step after ``student_step += 1``): 0.182, 0.250, 0.308."""
    from cdmbench.train import StudentEMA, resolve_config, train
    from conftest import tiny_overrides

    decays = []
    real = StudentEMA.update
    monkeypatch.setattr(StudentEMA, "update", lambda self, d: (decays.append(d), real(self, d))[1])
    train(resolve_config("cd", "toy", tiny_overrides("cd", steps=3)), tmp_path / "run", progress=False)
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13])


def test_gradient_accumulation_and_the_run_record(tmp_path, monkeypatch):
    """grad_accum micro-batches per optimiser step; config.json records world size, global batch, lrs as used."""
    from cdmbench.checkpoint import latest_checkpoint, load_checkpoint
    from cdmbench.io import read_json
    from cdmbench.train import resolve_config, train
    from conftest import tiny_overrides

    M = METHODS.get("dmd2")
    calls = []
    real = M.train_step
    monkeypatch.setattr(M, "train_step", lambda self, b, s, u: (calls.append((s, tuple(b.prompts))), real(self, b, s, u))[1])
    cfg = resolve_config("dmd2", "toy", {**tiny_overrides("dmd2", steps=2), "train.grad_accum": "3"})
    train(cfg, tmp_path / "run", progress=False)
    assert [s for s, _ in calls] == [0, 0, 0, 1, 1, 1]
    assert len({p for _, p in calls}) == 6  # every micro-batch has its own prompts
    _, state, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["counts"] == {"student": 1, "fake_score": 2}  # update_ratio 2: one generator step in two
    rec = read_json(tmp_path / "run" / "config.json")["as_run"]
    assert rec["world_size"] == 1 and rec["batch_per_process"] == 2 and rec["grad_accum"] == 3
    assert rec["global_batch"] == 6 and rec["grad_clip"] == cfg.train.grad_clip
    assert rec["learning_rates"] == {"student": cfg.method_config.student_lr, "fake_score": cfg.method_config.fake_lr}
    assert rec["data"]["kind"] == "procedural"


def test_dmd_pairs_use_the_real_score_guidance_and_stay_out_of_checkpoints(tmp_path):
    from cdmbench.checkpoint import latest_checkpoint
    from cdmbench.io import read_json
    from cdmbench.train import resolve_config, train
    from conftest import tiny_overrides

    cfg = resolve_config("dmd", "toy", tiny_overrides("dmd", steps=2))
    assert cfg.method_config.pair_guidance is None
    train(cfg, tmp_path / "run", progress=False)
    rec = read_json(tmp_path / "run" / "pairs" / "pairs.json")
    assert rec["guidance"] == cfg.method_config.real_guidance and rec["num_pairs"] == 4
    ckpt = latest_checkpoint(tmp_path / "run")
    assert not (ckpt / "method_state.safetensors").exists()
