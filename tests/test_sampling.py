import pytest
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.sampling import Denoiser, make_schedule, nominal_sigmas, sample_euler, static_shift
from cdmbench.seeding import StackedGenerator, parse_int_list


def test_nominal_grids_match_the_paper_defaults():
    assert nominal_sigmas(1) == [1.0]
    assert nominal_sigmas(2) == [1.0, 0.5]
    assert nominal_sigmas(4) == [1.0, 0.75, 0.5, 0.25]


def test_shift_three_gives_the_sd3_effective_sigmas():
    sched = make_schedule([1.0, 0.75, 0.5, 0.25], lambda s: [static_shift(x, 3.0) for x in s])
    assert sched.nominal == (1.0, 0.75, 0.5, 0.25)
    assert sched.effective == pytest.approx((1.0, 0.9, 0.75, 0.5))
    assert sched.sigmas().tolist()[-1] == 0.0 and sched.steps == 4


@pytest.mark.parametrize("bad", [[], [0.5, 0.7], [1.2], [1.0, 1.0]])
def test_bad_schedules_fail(bad):
    with pytest.raises(CdmbenchError):
        make_schedule(bad, lambda s: s)


class _Linear:
    """A fake backbone whose velocity is exactly ε − x0 for a known x0 (straight-line flow)."""

    def __init__(self, x0):
        self.x0 = x0
        self.calls = 0

    def velocity(self, net, x, sigma, cond):
        self.calls += 1
        s = sigma.reshape(-1, *[1] * (x.dim() - 1))
        eps = (x - (1 - s) * self.x0[: x.shape[0]]) / s.clamp_min(1e-8)
        return eps - self.x0[: x.shape[0]]


class _Cond:
    def cat(self, other):
        return self


def test_euler_on_a_straight_flow_is_exact_at_any_step_count():
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn(3, 2, 4, 4)
    for steps in (1, 2, 4):
        sig = make_schedule(nominal_sigmas(steps), lambda s: [static_shift(x, 3.0) for x in s]).sigmas()
        den = Denoiser(_Linear(x0), None, _Cond())
        out = sample_euler(den, noise, sig)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
        assert den.nfe == steps


def test_cfg_counts_two_function_evaluations_per_step():
    x0 = torch.randn(2, 1, 2, 2)
    bb = _Linear(torch.cat([x0, x0]))
    den = Denoiser(bb, None, _Cond(), _Cond(), guidance=4.0)
    sample_euler(den, torch.randn(2, 1, 2, 2), torch.tensor([1.0, 0.5, 0.0]))
    assert den.nfe == 4 and bb.calls == 2  # one batched call per step, counted twice


def test_stochastic_sampling_needs_per_sample_rng():
    with pytest.raises(CdmbenchError):
        sample_euler(lambda x, s: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), stochastic=True)


def test_per_sample_noise_does_not_depend_on_batch_composition():
    keys = [("p1", 0), ("p2", 0), ("p1", 1)]
    full = StackedGenerator.for_samples(keys).randn((3, 4))
    for i, k in enumerate(keys):
        torch.testing.assert_close(StackedGenerator.for_samples([k]).randn((3, 4))[0], full[i])
    assert not torch.equal(full[0], full[2])


def test_parse_int_list():
    assert parse_int_list("1,2,4") == [1, 2, 4]
    assert parse_int_list("0-3,8") == [0, 1, 2, 3, 8]
    for bad in ("", "a", "3-1", "1,,x", "-1"):
        with pytest.raises(CdmbenchError):
            parse_int_list(bad, name="steps")
