"""Network, EMA and optimiser state under FSDP2 (``fully_shard``: DTensor parameters), DDP and one process.

The training loop cannot run under FSDP on a CPU (accelerate sets its FSDP mode only for GPU-like devices),
so the state helpers it uses (``cdmbench.checkpoint``, ``cdmbench.train.StudentEMA``, ``_adamw``) are tested
here directly: one-process tests, and two gloo processes started with torchrun (as in test_multiprocess.py)
running this file as a script: shard, step, save, load into a fresh sharded copy, compare with one process.
The loop itself is checked under DDP: a killed and resumed two-process run equals an uninterrupted one.
"""

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cdmbench.checkpoint import full_model_state, full_optimizer_state, load_full_model_state, load_full_optimizer_state
from cdmbench.errors import CdmbenchError
from cdmbench.methods.base import OptimSpec
from cdmbench.train import StudentEMA, _adamw

SPEC = OptimSpec(lr=1e-2, weight_decay=0.1)


# ------------------------------------------------------------------------------------------------
# Shared by the one-process tests and the torchrun script

class Net(nn.Module):
    """Uneven first dims (FSDP2 pads the shards), a frozen layer and a buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 13), nn.SiLU(), nn.Linear(13, 8)) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        x = self.frozen(x) * self.scale
        for b in self.blocks:
            x = x + b(x)
        return self.out(self.norm(x))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))  # the same batch on every rank


def step(net, opt, ema, decay):
    net(X).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update(decay)


def trained(wrap):
    """A wrapped Net, its AdamW and EMA after two steps."""
    net = wrap(Net())
    opt = _adamw([p for p in net.parameters() if p.requires_grad], SPEC)
    ema = StudentEMA(net)
    for decay in (0.5, 0.9):
        step(net, opt, ema, decay)
    return net, opt, ema


def states(net, opt, ema):
    return {"model": full_model_state(net), "ema": ema.read(lambda: full_model_state(net)),
            "optimizer": full_optimizer_state(net, opt)}


def assert_equal(a, b, where, exact=True):
    """Same nested states; tensors bit-equal, or equal to float32 rounding where ``exact`` is False."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}", exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]", exact)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.device.type == b.device.type == "cpu", where
        torch.testing.assert_close(a, b, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7, msg=where)
    else:
        assert a == b, (where, a, b)


def round_trip(wrap, path, rank):
    """Save a trained wrapped Net, load it into a fresh one: states equal; one more step: states still equal."""
    net, opt, ema = trained(wrap)
    saved = states(net, opt, ema)
    if rank == 0:
        torch.save(saved, path)
    else:
        assert saved == {"model": {}, "ema": {}, "optimizer": {}}, saved  # only rank 0 holds the full states
    if dist.is_initialized():
        dist.barrier()
    loaded = torch.load(path, weights_only=True)  # like a resume: every process reads the checkpoint
    fresh = wrap(Net())
    fresh_opt = _adamw([p for p in fresh.parameters() if p.requires_grad], SPEC)
    fresh_ema = StudentEMA(fresh)
    fresh_ema.write(lambda: load_full_model_state(fresh, loaded["ema"]))
    load_full_model_state(fresh, loaded["model"])
    load_full_optimizer_state(fresh, fresh_opt, loaded["optimizer"])
    again = states(fresh, fresh_opt, fresh_ema)
    step(net, opt, ema, 0.95)
    step(fresh, fresh_opt, fresh_ema, 0.95)
    after, fresh_after = states(net, opt, ema), states(fresh, fresh_opt, fresh_ema)
    if rank == 0:
        assert_equal(saved, again, "round trip")
        assert_equal(after, fresh_after, "next step")
    return saved


def _main(folder):
    """The torchrun script: FSDP2 and DDP round trips, both compared with one process on rank 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def fsdp2(net):
        for block in net.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(net, mesh=mesh)

    sharded = round_trip(fsdp2, f"{folder}/fsdp2.pt", rank)
    ddp = round_trip(DDP, f"{folder}/ddp.pt", rank)

    # an optimiser that has not stepped: its saved state is empty, and it stays without state
    net = fsdp2(Net())
    assert all(isinstance(p, DTensor) for p in net.parameters())
    opt = _adamw([p for p in net.parameters() if p.requires_grad], SPEC)
    unstepped = full_optimizer_state(net, opt)
    assert not opt.state and (unstepped["state"] == {} if rank == 0 else unstepped == {})
    if rank == 0:
        torch.save(unstepped, f"{folder}/unstepped.pt")
    dist.barrier()
    load_full_optimizer_state(net, opt, torch.load(f"{folder}/unstepped.pt", weights_only=True))
    assert not opt.state

    if rank == 0:
        reference = states(*trained(lambda n: n))  # one process, no wrapper
        assert set(reference["model"]) == set(Net().state_dict())
        assert set(reference["optimizer"]["state"]) == {n for n, p in Net().named_parameters() if p.requires_grad}
        assert not torch.equal(reference["ema"]["out.weight"], reference["model"]["out.weight"])
        assert torch.equal(reference["ema"]["frozen.weight"], reference["model"]["frozen.weight"])
        # gradients are averaged over the processes (the same batch on each): equal up to float rounding
        assert_equal(sharded, reference, "fsdp2 vs one process", exact=False)
        assert_equal(ddp, reference, "ddp vs one process", exact=False)
        print("FSDP_STATE_OK")
    dist.barrier()
    dist.destroy_process_group()


def _resume(folder):
    """The torchrun script of the DDP resume test."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_overrides

    from cdmbench.checkpoint import load_checkpoint
    from cdmbench.run import resolve_config
    from cdmbench.train import train

    cfg = resolve_config("cdm", "toy", tiny_overrides("cdm", steps=3))
    straight = train(cfg, f"{folder}/straight", progress=False)
    train(cfg, f"{folder}/killed", progress=False, stop_after=1)
    resumed = train(cfg, f"{folder}/killed", resume=True, progress=False)
    if dist.get_rank() == 0:
        (a, state, _, _), (b, _, _, _) = load_checkpoint(straight), load_checkpoint(resumed)
        assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
        assert_equal(a, b, "resumed vs uninterrupted")
        print("DDP_RESUME_OK")


# ------------------------------------------------------------------------------------------------
# Two processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), __file__, *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout


def test_fsdp2_and_ddp_states_round_trip_and_equal_one_process(tmp_path):
    assert "FSDP_STATE_OK" in _torchrun("states", tmp_path)


def test_ddp_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    """The training loop under DDP (two gloo processes): each process's random streams are saved, so a resumed
    run is bit-identical to an uninterrupted one."""
    assert "DDP_RESUME_OK" in _torchrun("resume", tmp_path)


# ------------------------------------------------------------------------------------------------
# One process


def test_one_process_round_trip(tmp_path):
    assert set(round_trip(lambda n: n, tmp_path / "s.pt", 0)) == {"model", "ema", "optimizer"}


def test_states_are_snapshots():
    net, opt, ema = trained(lambda n: n)
    before = states(net, opt, ema)
    step(net, opt, ema, 0.9)
    after = states(net, opt, ema)
    for part in ("model", "ema"):
        assert not torch.equal(before[part]["out.weight"], after[part]["out.weight"]), part
    assert before["optimizer"]["state"]["out.weight"]["step"] == 2
    assert after["optimizer"]["state"]["out.weight"]["step"] == 3


def test_ema_tracks_only_trainable_parameters_and_leaves_the_network_alone():
    net, opt, ema = trained(lambda n: n)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    state = ema.read(lambda: full_model_state(net))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in own.items())  # values copied back
    assert len(ema.values) == sum(p.requires_grad for p in net.parameters())
    other = Net()
    other_ema = StudentEMA(other)
    other_ema.write(lambda: load_full_model_state(other, state))
    assert all(torch.equal(v, Net().state_dict()[k]) for k, v in other.state_dict().items())  # untouched
    assert all(torch.equal(a, b) for a, b in zip(other_ema.values, ema.values))


def test_an_unstepped_optimizer_keeps_no_state_through_save_and_load():
    """torch initialises an optimiser without state with a zero-lr step (AdamW: step 1); the helpers undo it,
    so the first real step after a checkpoint has the bias correction of a first step."""
    net, plain = Net(), Net()
    opt = _adamw([p for p in net.parameters() if p.requires_grad], SPEC)
    state = full_optimizer_state(net, opt)
    assert state["state"] == {} and not opt.state
    assert state["param_groups"][0]["params"] == [n for n, p in net.named_parameters() if p.requires_grad]
    load_full_optimizer_state(net, opt, state)
    assert not opt.state
    plain_opt = _adamw([p for p in plain.parameters() if p.requires_grad], SPEC)
    for n, o in ((net, opt), (plain, plain_opt)):
        n(X).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), plain.parameters()))


def test_parameters_without_optimizer_state_stay_without():
    net = Net()
    opt = _adamw([p for p in net.parameters() if p.requires_grad], SPEC)
    net(X).square().mean().backward()
    net.out.weight.grad = net.out.bias.grad = None  # e.g. a head that did not get a gradient yet
    opt.step()
    state = full_optimizer_state(net, opt)
    assert "out.weight" not in state["state"] and "norm.weight" in state["state"]
    fresh = Net()
    fresh_opt = _adamw([p for p in fresh.parameters() if p.requires_grad], SPEC)
    load_full_optimizer_state(fresh, fresh_opt, state)
    assert fresh.out.weight not in fresh_opt.state and fresh_opt.state[fresh.norm.weight]["step"] == 1


def test_index_keyed_optimizer_state_of_older_checkpoints_loads():
    net, opt, _ = trained(lambda n: n)
    fresh = Net()
    fresh_opt = _adamw([p for p in fresh.parameters() if p.requires_grad], SPEC)
    load_full_optimizer_state(fresh, fresh_opt, opt.state_dict())  # torch's own format, keys 0, 1, ...
    assert_equal(full_optimizer_state(fresh, fresh_opt), full_optimizer_state(net, opt), "index-keyed")


def test_model_and_optimizer_loads_are_strict():
    net, opt, _ = trained(lambda n: n)
    state = full_model_state(net)
    with pytest.raises(CdmbenchError, match=r"1 missing \(e.g. \['out.bias'\]\)"):
        load_full_model_state(Net(), {k: v for k, v in state.items() if k != "out.bias"})
    with pytest.raises(CdmbenchError, match="1 unexpected"):
        load_full_model_state(Net(), {**state, "extra": torch.zeros(1)})
    with pytest.raises(CdmbenchError, match="1 with another shape"):
        load_full_model_state(Net(), {**state, "out.bias": torch.zeros(4)})
    small = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(CdmbenchError, match="optimizer state does not match the network"):
        load_full_optimizer_state(small, torch.optim.AdamW(small.parameters()), full_optimizer_state(net, opt))


def test_adamw_is_fused_and_falls_back_to_foreach_with_a_warning(monkeypatch, caplog):
    params = list(Net().parameters())
    opt = _adamw(params, SPEC)
    assert opt.defaults["fused"] and not opt.defaults["foreach"]

    def unsupported(p, cuda_unsupported=False):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")

    import importlib

    monkeypatch.setattr(importlib.import_module("torch.optim.optimizer"), "_device_dtype_check_for_fused", unsupported)
    with caplog.at_level(logging.WARNING, logger="cdmbench.train"):
        opt = _adamw(params, SPEC)
    assert opt.defaults["foreach"] and not opt.defaults["fused"] and "foreach" in caplog.text
    assert {k: opt.defaults[k] for k in ("lr", "betas", "weight_decay", "eps")} == \
        {"lr": SPEC.lr, "betas": SPEC.betas, "weight_decay": SPEC.weight_decay, "eps": SPEC.eps}


if __name__ == "__main__":  # the torchrun script
    {"states": _main, "resume": _resume}[sys.argv[1]](sys.argv[2])
