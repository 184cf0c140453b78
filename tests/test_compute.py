"""The loop's compute meter: pass counts against a hand count, FLOPs against 2·m·n·k, resume of totals."""

import pytest
import torch
from torch import nn

from cdmbench.compute import ComputeMeter, run_roles
from cdmbench.errors import CdmbenchError

M, K, N = 3, 8, 5  # batch, in features, out features


def tiny_iteration(meter, student, teacher, opt, x):
    """By hand: teacher 2 forwards of M rows (no grad) + 1 CFG-style forward of 2M rows (no grad);
    student 1 forward of M rows that is back-propagated once."""
    with torch.no_grad():
        a = teacher(x)
        b = teacher(x)
        teacher(torch.cat([x, x]))
    loss = ((student(x) - (a + b) / 2) ** 2).mean()
    with meter.backward():
        loss.backward()
    opt.step()
    opt.zero_grad()


def nets():
    torch.manual_seed(0)
    student, teacher = nn.Linear(K, N, bias=False), nn.Linear(K, N, bias=False).requires_grad_(False)
    return student, teacher, torch.optim.SGD(student.parameters(), lr=0.1)


def test_pass_counts_match_a_hand_count():
    student, teacher, opt = nets()
    meter = ComputeMeter({"teacher": teacher, "student": student}, num_processes=2)
    x = torch.randn(M, K)
    for step in range(3):
        with meter.iteration(step):
            tiny_iteration(meter, student, teacher, opt, x)
    per_iter = {"teacher": {"fwd_calls": 3, "fwd_samples": 4 * M, "bwd_calls": 0, "bwd_samples": 0},
                "student": {"fwd_calls": 1, "fwd_samples": M, "bwd_calls": 1, "bwd_samples": M}}
    assert meter.counts == {r: {k: 3 * v for k, v in c.items()} for r, c in per_iter.items()}
    t = meter.totals()
    assert t["passes"]["teacher"]["fwd_samples"] == 2 * 3 * 4 * M  # two processes
    assert t["iterations"] == 3 and len(t["measured_iterations"]) == 1 and t["unmeasured_roles"] == []
    meter.close()
    teacher(x)
    assert meter.counts["teacher"]["fwd_calls"] == 9  # hooks removed


def test_flops_of_a_linear_are_2mnk_forward_and_4mnk_backward():
    student, teacher, opt = nets()
    meter = ComputeMeter({"teacher": teacher, "student": student})
    x = torch.randn(M, K)
    with meter.iteration(0):
        tiny_iteration(meter, student, teacher, opt, x)
    # forward y = x Wᵀ: 2·m·n·k; backward of the weight only (x needs no grad): 2·m·n·k
    assert meter.fwd_flops["teacher"] == 2 * N * K  # per sample (m = 1)
    assert meter.fwd_flops["student"] == 2 * N * K
    assert meter.bwd_flops["student"] == 2 * N * K
    measured = meter.measured[0]
    assert measured["flops"] == 2 * 4 * M * N * K + 2 * M * N * K + 2 * M * N * K
    assert measured["network_flops"] == measured["flops"]
    assert meter.flops() == measured["flops"]
    with meter.iteration(1):  # not measured: counted passes × measured costs
        tiny_iteration(meter, student, teacher, opt, x)
    assert meter.flops() == 2 * measured["flops"]
    assert len(meter.measured) == 1 and meter.timed == 1


def test_backward_through_a_frozen_net_counts_input_gradients():
    torch.manual_seed(0)
    gen, critic = nn.Linear(K, K, bias=False), nn.Linear(K, N, bias=False).requires_grad_(False)
    meter = ComputeMeter({"student": gen, "critic": critic})
    with meter.iteration(0):
        out = critic(gen(torch.randn(M, K))).sum()
        with meter.backward():
            out.backward()
    assert meter.counts["critic"]["bwd_samples"] == M and meter.counts["student"]["bwd_samples"] == M
    # critic: grad wrt its input only (2·m·n·k); student: grad wrt its weight (2·m·k·k); split ∝ forward FLOPs
    total = 2 * M * N * K + 2 * M * K * K
    assert meter.measured[0]["flops"] == 2 * M * N * K + 2 * M * K * K + total
    assert (meter.bwd_flops["critic"] + meter.bwd_flops["student"]) * M == pytest.approx(total)


def test_state_round_trip_keeps_totals():
    student, teacher, opt = nets()
    x = torch.randn(M, K)
    meter = ComputeMeter({"teacher": teacher, "student": student})
    with meter.iteration(0):
        tiny_iteration(meter, student, teacher, opt, x)
    state = meter.state_dict()
    meter.close()
    again = ComputeMeter({"teacher": teacher, "student": student}, state=state)
    assert again.flops() == meter.flops() and again.counts == meter.counts and not again.needs_measuring()
    with again.iteration(1):
        tiny_iteration(again, student, teacher, opt, x)
    assert again.flops() == 2 * meter.flops()
    with pytest.raises(CdmbenchError, match="roles"):
        ComputeMeter({"student": student}, state=state)


def test_run_roles_name_every_network_once():
    class B:
        def __init__(self):
            self._teacher = nn.Linear(2, 2)
            self.encoder = nn.Linear(2, 2)

        @property
        def teacher(self):
            return self._teacher

    class Meth:
        def __init__(self):
            self.nets = {"student": nn.Sequential(nn.Linear(2, 2)), "fake_score": nn.Linear(2, 2)}
            self.target_net = nn.Linear(2, 2)
            self.inner = self.nets["student"][0]  # inside the student: not a role

    roles = run_roles(Meth(), B())
    assert list(roles) == ["teacher", "student", "fake_score", "target_net", "encoder"]
    with pytest.raises(CdmbenchError, match="same module"):
        ComputeMeter({"a": roles["student"], "b": roles["student"]})


def test_a_jvp_call_is_measured_apart_from_a_plain_call_of_the_same_shapes():
    """Inside ``torch.func.jvp`` a network also computes its tangent: such a call must be measured by the FLOP
    counter, not charged the plain call's cost because its argument shapes match (sCM / rCM)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, teacher, _ = nets()
    x, t = torch.randn(M, K), torch.randn(M, K)
    with FlopCounterMode(display=False) as f:
        torch.func.jvp(teacher, (x,), (t,))
    jvp_flops = f.get_total_flops()
    assert jvp_flops > 2 * M * N * K  # the tangent's matmul on top of the primal's
    meter = ComputeMeter({"teacher": teacher})
    with meter.iteration(0):
        teacher(x)  # plain first: its shapes are then "known"
        torch.func.jvp(teacher, (x,), (t,))
    assert meter.counts["teacher"]["fwd_samples"] == 2 * M
    assert meter.fwd_flops["teacher"] == pytest.approx((2 * M * N * K + jvp_flops) / (2 * M))
