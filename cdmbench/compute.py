"""Training compute, counted by the loop (never declared by a method): passes, FLOPs, wall time.

``ComputeMeter(roles)`` hooks every network of a run by its role (``"teacher"`` for the backbone's frozen
teacher, the method's ``nets`` names — ``"student"``, ``"fake_score"``, ... — and any other module the
loop names) and counts, per role:

- forward passes: calls and samples (the leading dimension of the first tensor argument; a CFG call on a
  doubled batch counts its 2B rows);
- backward passes: a forward whose output later receives a gradient counts one backward (a tensor hook
  on the output), also in calls and samples. A frozen network differentiated through its input (e.g. a
  GAN head on student samples) counts too: its activations are back-propagated.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmul/convolution/attention FLOPs, forward
and backward; element-wise ops are not counted) on *measured iterations*: the first iteration, the first one
in which each network the method steps (``optimizers_for``) steps, and any later one until every role that
ran has a measured cost. During a measured iteration each forward call is
bracketed (its FLOPs / its samples = the role's forward FLOPs per sample) and each backward call of the
loop (``meter.backward()``) too; a backward's FLOPs are split over the roles that received gradients in
it, in proportion to their forward FLOPs of those samples. The run's FLOPs are then

    Σ_role  forward samples · forward FLOPs per sample + backward samples · backward FLOPs per sample

times the number of processes (every process runs the same per-process batch), so an iteration with a
longer rollout or an extra player update costs what it ran. The measured iteration's total FLOPs are kept
beside, with the share the per-role costs explain.

Wall time: seconds of the un-measured iterations (the FLOP counter slows the measured ones down).
Everything is a plain dict (``state_dict``) so a resumed run continues its totals.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from cdmbench.errors import CdmbenchError

KINDS = ("fwd_calls", "fwd_samples", "bwd_calls", "bwd_samples")
MAX_MEASURED = 20  # measured iterations at most (a role never run in one keeps an unknown cost)


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    for name in ("sample", "last_hidden_state"):  # diffusers/transformers output dataclasses
        t = getattr(obj, name, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


def _shapes(obj) -> tuple:
    """The shapes (and dtypes) of every tensor in a call's arguments, in order, and whether it is a functorch
    tensor: a call inside ``torch.func.jvp`` (forward-mode AD, e.g. sCM's tangent) computes the tangent too,
    about 3x a plain forward's FLOPs, so it is measured apart from plain calls of the same shapes."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), str(obj.dtype), torch._C._functorch.is_functorch_wrapped_tensor(obj))
    if isinstance(obj, (list, tuple)):
        return tuple(_shapes(o) for o in obj)
    if isinstance(obj, dict):
        return tuple((k, _shapes(v)) for k, v in obj.items())
    return (type(obj).__name__,) if not isinstance(obj, (int, float, bool, str, type(None))) else (obj,)


def _rows(args, kwargs) -> int:
    t = _first_tensor(args) if args else None
    t = t if t is not None else _first_tensor(kwargs)
    return int(t.shape[0]) if t is not None and t.ndim > 0 else 1


class ComputeMeter:
    """Pass counts per role, measured FLOPs per pass, wall time; see the module docstring.

    Args:
        roles: role name → network (hooked now; ``close()`` removes the hooks). One module per role.
        num_processes: processes that run the same per-process work (totals are multiplied by it).
        state: a ``state_dict()`` to continue from (a resumed run).
    """

    def __init__(self, roles: dict[str, nn.Module], num_processes: int = 1, state: dict | None = None):
        seen: dict[int, str] = {}
        for role, net in roles.items():
            if id(net) in seen:
                raise CdmbenchError(f"compute roles {seen[id(net)]!r} and {role!r} are the same module")
            seen[id(net)] = role
        self.roles = list(roles)
        self.num_processes = int(num_processes)
        self.counts = {r: dict.fromkeys(KINDS, 0) for r in self.roles}
        self.fwd_flops = {r: None for r in self.roles}  # FLOPs per forward sample (measured)
        self.bwd_flops = {r: None for r in self.roles}  # FLOPs per backward sample (measured)
        self.iterations = 0
        self.measured: list[dict] = []  # per measured iteration: step, total FLOPs, per-role passes
        self.seconds = 0.0  # wall seconds of un-measured iterations
        self.timed = 0  # how many iterations those are
        if state:
            self.load_state_dict(state)
        self._mode = None  # the active FlopCounterMode of a measured iteration
        self._acc: dict[str, dict[str, float]] = {}  # this measured iteration: role → fwd/bwd flops, samples
        self._in_backward: dict[str, int] | None = None  # role → backward samples in the open backward call
        self._call_flops: dict[tuple, float] = {}  # (role, argument shapes) → FLOPs of one such forward call
        self._skipped = 0.0  # FLOPs of calls run with the counter suspended (their cost is known)
        self._handles = []
        for role, net in roles.items():
            self._handles.append(net.register_forward_pre_hook(self._pre_hook(role), with_kwargs=True))
            self._handles.append(net.register_forward_hook(self._post_hook(role), with_kwargs=True))

    # -- hooks ------------------------------------------------------------------------------------
    def _pre_hook(self, role: str):
        def hook(module, args, kwargs):
            rows, sig, suspended = _rows(args, kwargs), None, False
            if self._mode is not None:
                sig = (role, _shapes(args), _shapes(kwargs))
                # a call whose shapes were measured in this iteration costs the same: count it without the
                # FLOP counter's per-op overhead (teacher pair sets run thousands of identical calls)
                if sig in self._call_flops and hasattr(self._mode, "mode"):
                    self._mode.mode.__exit__(None, None, None)
                    suspended = True
            module._cdmbench_compute = (rows, self._flops_now(), sig, suspended)
        return hook

    def _post_hook(self, role: str):
        def hook(module, args, kwargs, output):
            rows, before, sig, suspended = getattr(module, "_cdmbench_compute", (1, None, None, False))
            c = self.counts[role]
            c["fwd_calls"] += 1
            c["fwd_samples"] += rows
            if suspended:
                self._mode.mode.__enter__()
                self._skipped += self._call_flops[sig]
            if self._mode is not None and before is not None:
                acc = self._acc.setdefault(role, dict.fromkeys(("fwd", "fwd_n", "bwd", "bwd_n"), 0.0))
                spent = self._flops_now() - before
                self._call_flops.setdefault(sig, spent)
                acc["fwd"] += spent
                acc["fwd_n"] += rows
            out = _first_tensor(output)
            if out is not None and out.requires_grad:
                out.register_hook(self._grad_hook(role, rows))
        return hook

    def _grad_hook(self, role: str, rows: int):
        def hook(grad):
            c = self.counts[role]
            c["bwd_calls"] += 1
            c["bwd_samples"] += rows
            if self._in_backward is not None:
                self._in_backward[role] = self._in_backward.get(role, 0) + rows
        return hook

    def _flops_now(self) -> float | None:
        """FLOPs of the open measured iteration so far (counted, plus the known cost of suspended calls)."""
        return float(self._mode.get_total_flops()) + self._skipped if self._mode is not None else None

    # -- the loop's brackets ------------------------------------------------------------------------
    def needs_measuring(self) -> bool:
        """Measure the next iteration: none measured yet, or a role ran without a measured cost."""
        if not self.measured:
            return True
        if len(self.measured) >= MAX_MEASURED:
            return False
        return bool(self.unmeasured_roles())

    def unmeasured_roles(self) -> list[str]:
        """Roles that ran forward (backward) passes whose per-sample cost is not measured yet."""
        return [r for r in self.roles if (self.counts[r]["fwd_samples"] and self.fwd_flops[r] is None)
                or (self.counts[r]["bwd_samples"] and self.bwd_flops[r] is None)]

    @contextmanager
    def iteration(self, step: int, stepping: Iterable[str] = ()) -> Iterator[None]:
        """Wrap one training iteration (counted; FLOP-measured when ``needs_measuring()`` or when a network in
        ``stepping`` — the method's ``optimizers_for(step)`` — has no measured backward cost yet; timed
        otherwise)."""
        measure = self.needs_measuring() or (len(self.measured) < MAX_MEASURED and any(
            self.bwd_flops.get(n, 0.0) is None for n in stepping))
        before = {r: dict(c) for r, c in self.counts.items()}
        t0 = time.perf_counter()
        if measure:
            from torch.utils.flop_counter import FlopCounterMode

            self._acc, self._call_flops, self._skipped = {}, {}, 0.0
            self._mode = FlopCounterMode(display=False)
            with self._mode:
                yield
            total = self._flops_now()
            self._mode = None
            self._finish_measured(step, total, before)
        else:
            yield
            self.seconds += time.perf_counter() - t0
            self.timed += 1
        self.iterations += 1

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Passes in the block are not training compute (e.g. the sample grids logged at checkpoints)."""
        held = {r: dict(c) for r, c in self.counts.items()}
        try:
            yield
        finally:
            for r, c in held.items():
                self.counts[r].update(c)

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Wrap one backward call of the loop (during a measured iteration its FLOPs are attributed)."""
        if self._mode is None:
            yield
            return
        self._in_backward = {}
        start = self._flops_now()
        try:
            yield
        finally:
            flops = self._flops_now() - start
            got, self._in_backward = self._in_backward, None
            weights = {r: n * ((self._acc.get(r, {}).get("fwd", 0.0) / max(self._acc.get(r, {}).get("fwd_n", 0.0), 1))
                               or 1.0) for r, n in got.items()}
            total_w = sum(weights.values())
            for r, n in got.items():
                acc = self._acc.setdefault(r, dict.fromkeys(("fwd", "fwd_n", "bwd", "bwd_n"), 0.0))
                acc["bwd"] += flops * weights[r] / total_w if total_w else 0.0
                acc["bwd_n"] += n

    def _finish_measured(self, step: int, total: float, before: dict) -> None:
        for r, acc in self._acc.items():
            if acc["fwd_n"] and self.fwd_flops[r] is None:
                self.fwd_flops[r] = acc["fwd"] / acc["fwd_n"]
            if acc["bwd_n"] and self.bwd_flops[r] is None:
                self.bwd_flops[r] = acc["bwd"] / acc["bwd_n"]
        passes = {r: {k: self.counts[r][k] - before[r][k] for k in KINDS} for r in self.roles}
        explained = sum(a["fwd"] + a["bwd"] for a in self._acc.values())
        self.measured.append({"step": int(step), "flops": total, "network_flops": explained, "passes": passes})
        self._acc = {}

    # -- totals -------------------------------------------------------------------------------------
    def flops(self) -> float:
        """Counted training FLOPs so far, all processes (roles with an unmeasured cost count 0; see
        ``unmeasured_roles``)."""
        per = 0.0
        for r in self.roles:
            c = self.counts[r]
            per += c["fwd_samples"] * (self.fwd_flops[r] or 0.0) + c["bwd_samples"] * (self.bwd_flops[r] or 0.0)
        return per * self.num_processes

    def totals(self, minutes: float | None = None) -> dict[str, Any]:
        """The record for the run folder and the results rows."""
        per_iter = self.seconds / self.timed if self.timed else None
        return {
            "iterations": self.iterations,
            "num_processes": self.num_processes,
            "train_tflops": self.flops() / 1e12,
            "passes": {r: {k: v * self.num_processes for k, v in c.items()} for r, c in self.counts.items()},
            "flops_per_sample": {r: {"forward": self.fwd_flops[r], "backward": self.bwd_flops[r]} for r in self.roles},
            "unmeasured_roles": self.unmeasured_roles(),
            "measured_iterations": self.measured,
            "seconds_per_iteration": per_iter,
            **({"train_minutes": minutes} if minutes is not None else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"roles": self.roles, "counts": self.counts, "fwd_flops": self.fwd_flops, "bwd_flops": self.bwd_flops,
                "iterations": self.iterations, "measured": self.measured, "seconds": self.seconds, "timed": self.timed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["roles"]) != self.roles:
            raise CdmbenchError(f"compute state has roles {state['roles']}, this run {self.roles}")
        self.counts = {r: {k: int(v) for k, v in c.items()} for r, c in state["counts"].items()}
        self.fwd_flops = {r: (None if v is None else float(v)) for r, v in state["fwd_flops"].items()}
        self.bwd_flops = {r: (None if v is None else float(v)) for r, v in state["bwd_flops"].items()}
        self.iterations = int(state["iterations"])
        self.measured = list(state["measured"])
        self.seconds, self.timed = float(state["seconds"]), int(state["timed"])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def run_roles(method, backbone) -> dict[str, nn.Module]:
    """The networks of a run by role: the backbone's teacher, the method's ``nets`` (student, fake score,
    ...), then any other network the method or the backbone holds as an attribute (e.g. CD's EMA target,
    a text encoder), named by that attribute. A module inside an earlier role is not a role of its own."""
    roles: dict[str, nn.Module] = {"teacher": backbone.teacher}
    for name, net in method.nets.items():
        if name == "teacher":
            raise CdmbenchError("a method network may not be named 'teacher' (the backbone's role)")
        roles[name] = net
    inside = {id(m) for net in roles.values() for m in net.modules()}
    for owner in (method, backbone):
        for attr, val in sorted(vars(owner).items()):
            if isinstance(val, nn.Module) and id(val) not in inside:
                roles[attr.lstrip("_")] = val
                inside |= {id(m) for m in val.modules()}
    return roles


__all__ = ["ComputeMeter", "KINDS", "run_roles"]
