"""Contract tests over every registered method (style.md principle 11)."""

import dataclasses

import pytest
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.methods import METHODS
from cdmbench.methods.base import Batch, RunContext
from cdmbench.pairs import Processes
from cdmbench.seeding import StackedGenerator
from cdmbench.train import resolve_config, train
from conftest import tiny_overrides


@pytest.mark.parametrize("name", METHODS.names())
def test_one_training_run_changes_only_the_student(name, toy, tmp_path):
    teacher_before = {k: v.clone() for k, v in toy.teacher.state_dict().items()}
    cfg = resolve_config(name, "toy", tiny_overrides(name, steps=2))
    ckpt = train(cfg, tmp_path / name, progress=False)
    from cdmbench.checkpoint import load_checkpoint

    nets, state, _, meta = load_checkpoint(ckpt)
    assert meta["step"] == 2 and state["counts"]["student"] >= 1
    teacher = toy.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], teacher[k]) for k in teacher)
    changed = [k for k in nets["student"] if not torch.equal(nets["student"][k], teacher[k])]
    assert changed, "the student's weights did not change"
    # the health log has the method's declared loss keys, all finite
    import pandas as pd

    log = pd.read_csv(tmp_path / name / "metrics.csv")
    losses = log[log.key.str.startswith("loss/")]
    keys = {k.split("/", 1)[1] for k in losses.key}
    assert keys and keys <= set(METHODS.get(name).loss_keys)
    assert losses.value.map(float).map(lambda v: v == v and abs(v) < float("inf")).all()


@pytest.mark.parametrize("name", METHODS.names())
def test_train_step_declares_its_updates_and_leaves_the_teacher_without_gradients(name, toy, tmp_path):
    cfg = resolve_config(name, "toy", tiny_overrides(name))
    method = METHODS.get(name)(toy, cfg.method_config, data_source=toy.data_source(seed=0))
    method.prepare(RunContext(tmp_path, Processes()))
    prompts = toy.train_prompts(2, torch.Generator().manual_seed(0))
    batch = Batch(prompts, toy.encode_prompts(prompts), shared_seed=1)
    for step in range(2):
        stepped = []

        def update(net, loss):
            assert loss.requires_grad and torch.isfinite(loss)
            loss.backward()
            stepped.append(net)

        out = METHODS.get(name).train_step(method, batch, step, update)
        assert set(stepped) == set(method.optimizers_for(step))
        assert set(out.losses) <= set(method.loss_keys)
        assert all(torch.isfinite(v) for v in out.losses.values())
        assert all(p.grad is None for p in toy.teacher.parameters())


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_at_each_step_count_or_declare_it_unsupported(name, steps, toy):
    cfg = resolve_config(name, "toy", tiny_overrides(name))
    method = METHODS.get(name)(toy, cfg.method_config, training=False)
    supported = method.supported_steps
    prompts = ["a small red circle in the top left", "a large blue square in the bottom right"]
    rng = StackedGenerator.for_samples([("a", 0), ("b", 0)])
    noise = rng.randn(toy.latent_shape)
    if supported is not None and steps not in supported:
        with pytest.raises(CdmbenchError, match="supported"):
            method.sample(noise, toy.encode_prompts(prompts), steps, rng=rng)
        return
    out = method.sample(noise, toy.encode_prompts(prompts), steps, rng=rng)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert method.schedule(steps).steps == steps


def test_cdm_shared_ca_dm_forward_gives_the_same_gradients(toy):
    """Sharing the CA and DM student pass (identical inputs) changes nothing but the cost (cdm.md §5.4)."""
    base = resolve_config("cdm", "toy", tiny_overrides("cdm")).method_config
    grads = {}
    for share in (True, False):
        cfg = dataclasses.replace(base, share_ca_dm_forward=share, update_ratio=1, cdm_weight=0.0)
        method = METHODS.get("cdm")(toy, cfg)
        method.nets["fake_score"].load_state_dict(toy.teacher.state_dict())
        prompts = toy.train_prompts(3, torch.Generator().manual_seed(0))
        batch = Batch(prompts, toy.encode_prompts(prompts), shared_seed=5)
        torch.manual_seed(123)
        import random

        random.seed(123)

        def update(net, loss):
            loss.backward()

        method.train_step(batch, 0, update)
        grads[share] = [p.grad.clone() for p in method.nets["student"].parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False]) > 0
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cdm_ablation_configs_validate():
    from cdmbench.methods.cdm import CDMConfig

    with pytest.raises(CdmbenchError, match="student_xt_mode"):
        CDMConfig(student_xt_mode="bogus")
    with pytest.raises(CdmbenchError, match="share_student"):
        CDMConfig(teacher_xt_mode="share_student")  # with the default student_pred base
    cfg = CDMConfig(teacher_xt_mode="share_student", teacher_x0_base="x0_final", student_x0_base="x0_final")
    assert cfg.teacher_xt_mode.value == "share_student"


@pytest.mark.parametrize("mode", [
    {"student_xt_mode": "fresh"}, {"student_xt_mode": "trajectory_eps_last"}, {"student_xt_mode": "trajectory_xt"},
    {"teacher_xt_mode": "fresh_shared_t"}, {"teacher_x0_base": "x0_final"}, {"teacher_x0_base": "x0_next"},
    {"teacher_xt_mode": "share_student", "teacher_x0_base": "x0_next", "student_x0_base": "x0_next"},
    {"schedule": "fixed"}, {"rollout": "sde"}, {"fake_x0_source": "x0_final"},
])
def test_every_cdm_option_runs(mode, toy):
    base = resolve_config("cdm", "toy", tiny_overrides("cdm")).method_config
    cfg = dataclasses.replace(base, update_ratio=1, **mode)
    cfg.__post_init__()
    method = METHODS.get("cdm")(toy, type(base)(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}))
    prompts = toy.train_prompts(2, torch.Generator().manual_seed(0))
    out = method.train_step(Batch(prompts, toy.encode_prompts(prompts), 3), 0, lambda n, loss: loss.backward())
    assert torch.isfinite(out.losses["cdm"]) and torch.isfinite(out.losses["student"])


def test_dmd2_gan_head_trains_discriminator_and_generator(toy):
    base = resolve_config("dmd2", "toy", tiny_overrides("dmd2")).method_config
    method = METHODS.get("dmd2")(toy, dataclasses.replace(base, gan_weight=5e-3), data_source=toy.data_source(seed=0))
    prompts = toy.train_prompts(2, torch.Generator().manual_seed(0))
    batch = Batch(prompts, toy.encode_prompts(prompts), shared_seed=2)
    head = method.nets["fake_score"].head
    out = method.train_step(batch, 0, lambda n, loss: loss.backward())
    assert {"gan_g", "gan_d", "dm", "fake_score"} <= set(out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
