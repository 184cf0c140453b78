"""The one training loop (style.md principle 2; EDM ``training_loop.py``).

It never branches on a method or backbone name: the method says which networks step when
(``optimizers_for``) and calls ``update(name, loss)``; the loop does backward, clipping, the NaN/inf
guard, LR warm-up, the student EMA, atomic checkpoints, resume and the health log. It runs unchanged
under ``accelerate launch`` (DDP/FSDP); random choices that must agree across processes come from
``Batch.shared_seed``.

State handling is the same in every setting: networks and optimisers are saved and loaded as full,
name-keyed states through torch's distributed state-dict API (``cdmbench.checkpoint``), which handles a
plain module, DDP and FSDP2 (DTensor parameters) alike; the student EMA is a list of tensors cloned from the
student's (possibly sharded) parameters.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cdmbench.checkpoint import (full_optimizer_state, load_full_optimizer_state, load_newest_intact,
                                 save_checkpoint)
from cdmbench.compute import ComputeMeter, run_roles
from cdmbench.errors import CdmbenchError, CorruptStateError, NonFiniteError
from cdmbench.io import write_json
from cdmbench.resume import begin, check_start
from cdmbench.methods.base import Batch
from cdmbench.run import RunConfig, RunDir, resolve_config  # noqa: F401  (resolve_config: re-exported for branches in flight; its home is cdmbench.run)

logger = logging.getLogger(__name__)
COMPUTE_FILE = RunDir.COMPUTE  # the run's compute totals at its latest checkpoint (cdmbench.compute)

# ------------------------------------------------------------------------------------------------
# Prompts


def read_train_prompts(path: str | None, backbone_cls, num_processes: int = 1) -> list[str] | None:
    """The training prompts of ``train.prompts`` (read by ``cdmbench.prompts``, the eval reader: txt / jsonl / json /
    csv / tsv, a header row is never a prompt), or None for the backbone's own source; checked before anything is
    built or written.

    Raises:
        CdmbenchError: no prompt file for a backbone without prompts of its own, a missing, empty or malformed
            file, or fewer prompts than processes.
    """
    from cdmbench.backbones.base import PROMPTS_HINT
    from cdmbench.prompts import read_prompt_file

    if not path:
        if not backbone_cls.has_train_prompts:
            raise CdmbenchError(f"backbone {backbone_cls.name!r} has no training prompts of its own: {PROMPTS_HINT}")
        return None
    if not Path(path).is_file():
        raise CdmbenchError(f"train.prompts: no such file {path!r}")
    try:
        lines = [p.text for p in read_prompt_file(path)]
    except CdmbenchError as e:
        raise CdmbenchError(f"train.prompts: {e}") from None
    if len(lines) < num_processes:
        raise CdmbenchError(f"train.prompts: {path!r} has {len(lines)} prompts; need at least one per process")
    return lines


class PromptSource:
    """Per-iteration, per-process training prompts, a pure function of (seed, step, process)."""

    def __init__(self, backbone, lines: list[str] | None, seed: int, process_index: int, num_processes: int):
        self.backbone, self.seed, self.rank, self.world = backbone, seed, process_index, num_processes
        self.lines = lines  # ``read_train_prompts``; None: the backbone's own source

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn with ``generator`` from the whole source (same on every process)."""
        if self.lines is None:
            return self.backbone.train_prompts(n, generator)
        return [self.lines[int(i)] for i in torch.randint(len(self.lines), (n,), generator=generator)]

    def __call__(self, step: int, n: int, micro: int = 0) -> list[str]:
        g = torch.Generator().manual_seed(_mix(self.seed, step, self.rank, *([micro] if micro else [])))
        if self.lines is None:
            return self.backbone.train_prompts(n, g)
        shard = self.lines[self.rank::self.world]
        return [shard[int(i)] for i in torch.randint(len(shard), (n,), generator=g)]


def _mix(*xs: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(xs).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def run_record(cfg: RunConfig, world_size: int, specs: dict, data) -> dict:
    """What a run used, as used (``config.json`` "as_run"): processes, batch per process, gradient accumulation,
    global batch (= batch × processes × accumulation), each optimiser's learning rate, clip, data source."""
    tc = cfg.train
    return {"world_size": world_size, "batch_per_process": tc.batch_size, "grad_accum": tc.grad_accum,
            "global_batch": tc.batch_size * world_size * tc.grad_accum,
            "learning_rates": {name: spec.lr for name, spec in specs.items()}, "grad_clip": tc.grad_clip,
            "data": data.describe() if data is not None else None}


# ------------------------------------------------------------------------------------------------
# The loop


def _rng_state(device: torch.device) -> dict:
    """This process's RNG states: torch (CPU and, for an accelerator, its current device), Python, NumPy."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
         "numpy_pos": int(np.random.get_state()[2])}
    if device.type != "cpu":
        s["device"] = torch.get_device_module(device.type).get_rng_state()
    return s


def _set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["torch"])
    if "device" in s and device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(s["device"])
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))


def _adamw(params: list[torch.nn.Parameter], spec) -> torch.optim.AdamW:
    """AdamW with ``spec``'s settings, fused (one kernel for all tensors, on CPU and CUDA); the foreach
    implementation of the same update where the fused kernel does not take the parameters' device or dtype."""
    from torch.optim.optimizer import _device_dtype_check_for_fused  # the check AdamW(fused=True) runs at step 1

    kw = dict(lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, eps=spec.eps)
    if not spec.warmup >= 0:
        raise CdmbenchError(f"optimizer warm-up must be >= 0 steps, got {spec.warmup} (check --set warmup)")
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], **kw)  # torch's own checks of the settings
    except (ValueError, TypeError, IndexError) as e:
        raise CdmbenchError(f"optimizer settings {kw}: {e} (check the --set lr/betas/eps/weight_decay values)") from None
    try:
        for p in params:
            _device_dtype_check_for_fused(p)
    except RuntimeError as e:
        logger.warning("AdamW: no fused kernel here (%s); using the foreach implementation", e)
        return torch.optim.AdamW(params, foreach=True, **kw)
    return torch.optim.AdamW(params, fused=True, **kw)


def _copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` pairwise, without autograd. One op per tensor: torch 2.14 has no DTensor rule for
    ``_foreach_copy_``, and this only runs when a checkpoint is written or read."""
    with torch.no_grad():
        for d, s in zip(dst, src, strict=True):
            d.detach().copy_(s.detach())


class StudentEMA:
    """Exponential moving average of a network's trainable parameters.

    Held as tensors cloned from the parameters (``p.detach().clone()``: a sharded DTensor parameter gives a
    sharded copy, so no process ever holds the whole EMA of an FSDP2 network). The parameters a network does
    not train are the same in the EMA as in the network. Its state (save and load) goes through the network
    itself: the EMA values are copied into the network's parameters for the duration of a state read or
    write, and the network's own values copied back after.
    """

    def __init__(self, net: torch.nn.Module):
        self.params = [p for p in net.parameters() if p.requires_grad]
        with torch.no_grad():
            self.values = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """values ← decay · values + (1 − decay) · parameters."""
        torch._foreach_lerp_(self.values, self.params, 1 - decay)  # under no_grad: params only read

    @contextmanager
    def _in_params(self):
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            _copy_(self.params, self.values)
            try:
                yield
            finally:
                _copy_(self.params, own)

    def read(self, net_state):
        """``net_state()`` (a state of the network, e.g. ``backbone.net_state_dict(student)``) with the EMA in it."""
        with self._in_params():
            return net_state()

    def write(self, load_net_state) -> None:
        """Set the EMA with ``load_net_state()`` (which loads a state into the network, e.g. an EMA checkpoint)."""
        with self._in_params():
            load_net_state()
            _copy_(self.values, self.params)


TRACKERS = ("tensorboard", "wandb")  # accelerate trackers ``train(log_with=...)`` accepts
SAMPLE_STEPS = (1, 2, 4)  # step counts of the sample grids logged at checkpoints (those the method supports)


def check_trackers(log_with: tuple[str, ...]) -> tuple[str, ...]:
    """``log_with`` if every name is a tracker cdmbench logs to and its package is installed; one line otherwise."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in log_with:
        if name not in available:
            raise CdmbenchError(f"--log-with: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}, none")
        if not available[name]():
            raise CdmbenchError(f"--log-with {name}: the {name} package is not installed (pip install {name}), "
                                f"or choose another tracker ({', '.join(TRACKERS)}, none)")
    return tuple(dict.fromkeys(log_with))


def hparams(config: dict) -> dict[str, bool | int | float | str]:
    """A run config as flat tracker hyperparameters: ``method.<f>``, ``train.<f>``, ``backbone.<f>``, the rest by
    name; values a tracker cannot store (None, lists) as text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        group = "method" if key == "method_config" else key
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for k, v in items:
            name = f"{group}.{k}" if k is not None else group
            out[name] = v if isinstance(v, (bool, int, float, str)) else json_text(v)
    return out


def json_text(v) -> str:
    import json

    return json.dumps(v, default=str)


class HealthLog:
    """The tidy CSV health log (step, key, value), the record, plus the same scalars, the sample grids and the
    resolved config (as hyperparameters) through accelerate's trackers (``Accelerator(log_with=...)``:
    TensorBoard under ``RUN/tensorboard/``, wandb). Only the main process writes."""

    PROJECT = "cdmbench"  # the trackers' project (TensorBoard: RUN/tensorboard/cdmbench/; wandb: the project)

    def __init__(self, run_dir: Path, accelerator, enabled: bool, resume_step: int, config: dict | None = None):
        self.path = run_dir / "metrics.csv"
        self.enabled = enabled
        self.accelerator = accelerator
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop rows the resumed run will write again
            rows = [r for r in csv.reader(self.path.open(errors="replace"))  # rows torn by a kill are dropped
                    if len(r) == 3 and (r[0] == "step" or (r[0].isdigit() and int(r[0]) < resume_step))]
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows(rows)
        new = not self.path.exists()
        self.file = self.path.open("a", newline="", buffering=1)
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "key", "value"])
        if accelerator.log_with:
            accelerator.init_trackers(self.PROJECT, config=hparams(config or {}),
                                      init_kwargs={"wandb": {"name": run_dir.name, "dir": str(run_dir)}})

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.writerow([step, k, f"{v:.6g}"])
        self.accelerator.log({k: float(v) for k, v in values.items()}, step=step)

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        """Log ``name → (N, 3, H, W)`` images in [0, 1] to every tracker that takes images."""
        if not self.enabled:
            return
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images(images, step=step)

    def close(self):
        if self.enabled:
            self.file.close()
            # the trackers only: ``Accelerator.end_training`` also destroys the process group, which on the main
            # process alone breaks the other ranks (and any later run in this process)
            for tracker in self.accelerator.trackers:
                tracker.finish()


class SampleGrid:
    """The student's samples for a few fixed prompts and noises at each of its step counts: one image, a row per
    step count (``SAMPLE_STEPS`` the method supports), a column per prompt; logged at every checkpoint.

    The draw uses its own generators and forks the global RNG, and its passes are not training compute, so a run
    with grids trains exactly as one without."""

    def __init__(self, method, backbone, prompts: list[str], seed: int):
        supported = method.supported_steps
        self.steps = tuple(n for n in SAMPLE_STEPS if supported is None or n in supported) or tuple(supported[:3])
        self.method, self.backbone, self.prompts, self.seed = method, backbone, prompts, seed

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1]."""
        from torchvision.utils import make_grid

        from cdmbench.seeding import StackedGenerator

        bb, n = self.backbone, len(self.prompts)
        devices = [bb.device] if bb.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=bb.device.type if devices else None):
            cond = bb.encode_prompts(self.prompts)
            rows = []
            for steps in self.steps:
                rng = StackedGenerator([_mix(self.seed, i) for i in range(n)])
                noise = rng.randn(tuple(bb.latent_shape), device=bb.device)
                rows.append(bb.decode(self.method.sample(noise, cond, steps, rng=rng)).float().clamp(0, 1).cpu())
        return make_grid(torch.cat(rows), nrow=n, padding=2, pad_value=1.0)[None]


class Players:
    """The trained networks' bookkeeping: one AdamW and LR schedule per network (as prepared by accelerate),
    their parameter lists, update counts and the student EMA; ``update(name, loss)`` is the callback a
    method's ``train_step`` calls (backward, gradient accumulation, clipping, the NaN/inf guard, the step)."""

    def __init__(self, method, accelerator, tc, meter_ref):
        from diffusers.optimization import get_scheduler

        self.method, self.accelerator, self.tc, self.meter_ref = method, accelerator, tc, meter_ref
        self.specs = method.optim_specs()
        self.optimizers, self.schedulers = {}, {}
        for name, spec in self.specs.items():
            opt = _adamw([p for p in method.nets[name].parameters() if p.requires_grad], spec)
            # lr = base · min(1, k / warmup): zero on a network's first step, as shipped (cdm.md §6)
            sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=spec.warmup)
            method.nets[name], self.optimizers[name] = accelerator.prepare(method.nets[name], opt)
            self.schedulers[name] = sched
        # each optimiser's parameters, as prepared (FSDP2 swaps in sharded ones); listed once, not per update
        self.trainable = {n: [p for p in method.nets[n].parameters() if p.requires_grad] for n in self.specs}
        self.ema = StudentEMA(method.nets["student"])
        self.counts = {name: 0 for name in self.specs}
        self.last_good = "none yet"

    def begin(self, step: int, expected: set[str]) -> None:
        """A new iteration: ``expected`` networks step once each (after the last micro-batch)."""
        self.step, self.expected, self.grad_norms = step, expected, {}

    def micro(self, index: int) -> None:
        self.index, self.last, self.stepped = index, index == self.tc.grad_accum - 1, []

    def update(self, name: str, loss: torch.Tensor) -> None:
        step, tc = self.step, self.tc
        if name not in self.expected or name in self.stepped:
            raise RuntimeError(f"{self.method.name}: update({name!r}) at step {step}; "
                               f"optimizers_for says {sorted(self.expected)}")
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite {name} loss ({loss.item()}) at iteration {step}; "
                                 f"training stopped, last good checkpoint: {self.last_good}")
        params = self.trainable[name]
        # this loss's gradient goes to ``name`` only: other networks keep their accumulated gradients, and what
        # the loss leaks into them (e.g. DMD2's GAN generator loss through the discriminator head) is dropped
        held = {n: [p.grad for p in ps] for n, ps in self.trainable.items() if n != name}
        for n in held:
            for p in self.trainable[n]:
                p.grad = None
        if self.index == 0:
            for p in params:
                p.grad = None
        with self.meter_ref().backward():
            self.accelerator.backward(loss / tc.grad_accum)
        for n, grads in held.items():
            for p, g in zip(self.trainable[n], grads):
                p.grad = g
        self.stepped.append(name)
        if self.last:
            self._step(name, params)

    def _step(self, name: str, params: list) -> None:
        if self.tc.grad_clip > 0:
            gn = self.accelerator.clip_grad_norm_(params, self.tc.grad_clip)
        else:
            gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not torch.isfinite(torch.as_tensor(gn)):
            raise NonFiniteError(f"non-finite {name} gradient norm at iteration {self.step}; "
                                 f"training stopped, last good checkpoint: {self.last_good}")
        self.optimizers[name].step()
        self.schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        self.counts[name] += 1
        self.grad_norms[f"grad_norm/{name}"] = float(gn)
        if name == "student":
            # k = completed student updates (1 after the first): decay 0.182, 0.250, 0.308, …
            # (cdm.md §6; byliutao/cdm EMAModuleWrapper.step after student_step += 1)
            k = self.counts["student"]
            self.ema.update(min((1 + k) / (10 + k), self.tc.ema_decay))
        self.method.after_update(name)

    def check(self, out) -> None:
        """After a train_step: every expected network stepped, every loss key declared."""
        if set(self.stepped) != self.expected:
            raise RuntimeError(f"{self.method.name}: stepped {sorted(self.stepped)} at iteration {self.step}, "
                               f"declared {sorted(self.expected)}")
        missing = [k for k in out.losses if k not in self.method.loss_keys]
        if missing:
            raise RuntimeError(f"{self.method.name}: undeclared loss keys {missing}")

    def state(self, backbone) -> tuple[dict, dict]:
        """(network states incl. the student EMA, optimiser/schedule/count states): every process takes them
        (collectives under FSDP2)."""
        nets = {name: backbone.net_state_dict(self.method.nets[name]) for name in self.specs}
        nets["student_ema"] = self.ema.read(lambda: backbone.net_state_dict(self.method.nets["student"]))
        return nets, {"optimizers": {n: full_optimizer_state(self.method.nets[n], o) for n, o in self.optimizers.items()},
                      "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                      "counts": self.counts}

    def load(self, backbone, nets: dict, state: dict) -> None:
        # the EMA first: it goes through the student's parameters, which then get the student's own state
        self.ema.write(lambda: backbone.load_net_state(self.method.nets["student"], nets["student_ema"]))
        for name in self.specs:
            backbone.load_net_state(self.method.nets[name], nets[name])
            load_full_optimizer_state(self.method.nets[name], self.optimizers[name], state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.counts = dict(state["counts"])


@dataclasses.dataclass
class _Run:
    """What the phases of ``train`` share."""

    cfg: RunConfig
    dir: Path
    accelerator: object
    backbone: object
    prompts: PromptSource
    data: object
    method: object
    players: Players
    log_with: tuple[str, ...] = ()
    meter: ComputeMeter | None = None
    log: HealthLog | None = None
    grid: SampleGrid | None = None
    start: int = 0
    prev_minutes: float = 0.0
    t_start: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def minutes(self) -> float:
        return (time.time() - self.t_start) / 60


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False, progress: bool = True,
          stop_after: int | None = None, log_with: tuple[str, ...] = ("tensorboard",), sample_images: int = 4) -> Path:
    """Train ``cfg`` into ``run_dir``; returns the final checkpoint folder.

    ``resume`` continues from the newest intact checkpoint in ``run_dir`` (``cdmbench.resume``: the saved
    config must match; ``force`` accepts the safe differences). Nothing is written before every check that can
    fail has run: the device and precision, the prompt source (before the backbone is even built), the backbone's
    weights, the data source, the method and its optimisers. ``cfg.backbone.device`` None is accelerate's device
    (``cdmbench.accel``); ``config.json`` records the device and mixed precision that ran. ``log_with``: the
    accelerate trackers besides the CSV health log (``TRACKERS``; () for none); ``sample_images``: prompts in the
    sample grid logged at each checkpoint (0: none). ``stop_after`` ends the process after that many
    iterations *without* a final checkpoint (a simulated kill, for tests).
    """
    # rich.progress is imported before seeding: its first import draws from Python's global RNG
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cdmbench.methods.base import RunContext
    from cdmbench.pairs import Processes

    # 1. set-up: everything that can fail, before any file is written
    run_dir = Path(run_dir)
    plan, r = _setup(cfg, run_dir, resume, force, check_trackers(tuple(log_with)), sample_images)
    cfg, tc, a = r.cfg, r.cfg.train, r.accelerator  # as it runs: the device and precision accelerate settled on
    # 2. restore: the newest checkpoint that verifies and loads, said so when it is not the latest
    loaded = _find_checkpoint(run_dir, r) if plan.resume else None
    if r.main:  # training can start: only now is anything written
        begin(run_dir, plan)
        RunDir(run_dir).write_config(cfg, world_size=a.num_processes, as_run={
            **run_record(cfg, a.num_processes, r.players.specs, r.data), "device": str(a.device),
            "trackers": list(r.log_with), "distributed_type": a.distributed_type.value})
    compute_state = _restore(r, *loaded) if loaded else None
    # counted by the loop, whatever the method does: passes per network role, FLOPs, wall time
    r.meter = ComputeMeter(run_roles(r.method, r.backbone), r.accelerator.num_processes, compute_state)
    # one-off work (e.g. DMD's teacher pairs, stored in the run folder), on every process, also on resume
    r.method.prepare(RunContext(run_dir, Processes(a.process_index, a.num_processes, a.wait_for_everyone),
                                progress and r.main))
    r.log = HealthLog(run_dir, a, r.main, r.start, cfg.to_dict())
    if sample_images and r.log_with:
        r.grid = SampleGrid(r.method, r.backbone, r.prompts.sample(
            sample_images, torch.Generator().manual_seed(_mix(tc.seed, -1))), tc.seed)
    r.t_start = time.time() - 60 * r.prev_minutes  # training minutes accumulate across resumes

    # 3. the loop: iterations, health log, checkpoints, the compute budget
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not (progress and r.main))
    task = bar.add_task(f"train {cfg.method} on {cfg.arch}", total=tc.steps, completed=r.start, info="")
    final, budget_hit, running = None, None, {}
    with bar:
        for step in range(r.start, tc.steps):
            if stop_after is not None and step - r.start >= stop_after:
                r.log.close(), r.meter.close()
                return Path(r.players.last_good)
            if tc.budget_tflops and r.meter.flops() >= tc.budget_tflops * 1e12:
                budget_hit = step  # a resumed run that had already spent its budget
                break
            before = r.meter.flops()
            losses = _iteration(r, step, running)
            if step % tc.log_every == 0 or step == tc.steps - 1:
                _log(r, step, running)
                bar.update(task, info=" ".join(f"{k}={float(v):.3g}" for k, v in losses.items()))
            bar.update(task, completed=step + 1)
            # the compute budget: stop after the first iteration that reaches it (overshoot < one iteration)
            spent = bool(tc.budget_tflops) and r.meter.flops() >= tc.budget_tflops * 1e12
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps or spent or _crossed(
                    before, r.meter.flops(), tc.checkpoint_every_tflops * 1e12):
                final = _save(r, step + 1)
            if spent:
                budget_hit = step + 1
                break
    # 4. finish: the finished marker with the compute totals
    r.log.close(), r.meter.close()
    if r.main:
        RunDir(run_dir).finish(tc.steps if budget_hit is None else budget_hit, r.players.last_good, r.minutes(),
                               stopped_by="iterations" if budget_hit is None else f"budget_tflops={tc.budget_tflops}",
                               compute=r.meter.totals(r.minutes()))
    return Path(r.players.last_good) if final is None else final


def _crossed(before: float, after: float, every: float) -> bool:
    """Whether the counted compute crossed a multiple of ``every`` FLOPs in this iteration (0 = never)."""
    return every > 0 and math.floor(after / every) > math.floor(before / every)


# ------------------------------------------------------------------------------------------------
# The phases of ``train``


def _setup(cfg: RunConfig, run_dir: Path, resume: bool, force: bool, log_with: tuple[str, ...], sample_images: int):
    """(start plan, _Run): device and precision, accelerator, the prompt source, seeds, backbone, data source,
    method, optimisers; writes nothing."""
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import ProjectConfiguration

    from cdmbench.accel import select_device
    from cdmbench.backbones import BACKBONES, build_backbone
    from cdmbench.data import build_data_source
    from cdmbench.methods import METHODS

    if not (isinstance(sample_images, int) and 0 <= sample_images <= 64):
        raise CdmbenchError(f"sample_images must be an integer in [0, 64], got {sample_images!r}")
    device = select_device(cfg.backbone.device, what="backbone.device")
    try:  # the trackers' files appear at init_trackers (HealthLog), once training can start
        accelerator = Accelerator(cpu=device == "cpu", mixed_precision=cfg.train.mixed_precision,
                                  log_with=list(log_with) or None,
                                  project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                      logging_dir=str(run_dir / RunDir.TENSORBOARD)))
    except ValueError as e:  # e.g. an accelerate state initialised with another precision in this process
        raise CdmbenchError(f"accelerate: {e}") from None
    if cfg.backbone.lora_rank and accelerator.distributed_type == DistributedType.FSDP:
        raise CdmbenchError("LoRA (backbone.lora_rank > 0) does not run under FSDP; "
                            "launch with DDP or train the full network")
    # what runs: the device and the precision accelerate settled on (config.json records these)
    ran = accelerator.mixed_precision if accelerator.mixed_precision in ("no", "bf16", "fp16") else cfg.train.mixed_precision
    if ran != cfg.train.mixed_precision:
        logger.warning("mixed precision: accelerate runs %s (train.mixed_precision was %s)", ran, cfg.train.mixed_precision)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=ran),
                              backbone=dataclasses.replace(cfg.backbone, device=device))
    tc = cfg.train
    plan = check_start(run_dir, cfg.to_dict(), resume=resume, force=force)  # writes nothing
    # the prompt source before the backbone: a backbone without prompts of its own fails before any weights load
    prompt_lines = read_train_prompts(tc.prompts, BACKBONES.get(cfg.arch), accelerator.num_processes)
    seed = tc.seed + accelerator.process_index
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    options = dataclasses.replace(cfg.backbone, device=str(accelerator.device))
    backbone = build_backbone(cfg.arch, options)  # fails (missing weights, bad options) before any file is written
    index, count = accelerator.process_index, accelerator.num_processes
    prompts = PromptSource(backbone, prompt_lines, tc.seed, index, count)
    data = build_data_source(backbone, spec=tc.data, seed=tc.seed, process_index=index, num_processes=count,
                             image_column=tc.data_image_column, caption_column=tc.data_caption_column,
                             cache_dir=tc.data_cache)
    # a method that needs real data on a backbone without any fails here, before any file is written
    method = METHODS.get(cfg.method)(backbone, cfg.method_config, data_source=data, prompt_source=prompts.sample)
    r = _Run(cfg, run_dir, accelerator, backbone, prompts, data, method, None, log_with=log_with)
    r.players = Players(method, accelerator, tc, lambda: r.meter)
    return plan, r


def _find_checkpoint(run_dir: Path, r: _Run):
    ckpt, loaded, notes = load_newest_intact(run_dir, list(r.players.specs))
    if ckpt is None:
        raise CorruptStateError(f"--resume: no intact checkpoint in {run_dir} ({'; '.join(notes)}); "
                                f"delete the run folder to start again")
    if notes:
        logger.warning("%s; resuming from %s instead", "; ".join(notes), ckpt.name)
    return ckpt, loaded


def _restore(r: _Run, ckpt: Path, loaded) -> dict | None:
    """Load networks, optimisers, schedules, the EMA, the data position and the RNG states; returns the
    compute totals so far."""
    nets, state, extra, meta = loaded
    a = r.accelerator
    r.players.load(r.backbone, nets, state)
    r.method.load_extra_state(extra)
    if r.data is not None and "data" in state:
        r.data.load_state_dict(state["data"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per process
    if len(rngs) == a.num_processes:
        _set_rng_state(rngs[a.process_index], a.device)
    else:
        logger.warning("resuming %d processes from a checkpoint of %d: random streams are reseeded, so the run "
                       "is not the one an uninterrupted run would be", a.num_processes, len(rngs))
        torch.manual_seed(_mix(r.cfg.train.seed, int(meta["step"]), a.process_index))
    r.start, r.prev_minutes = int(meta["step"]), float(meta.get("minutes", 0.0))
    r.players.last_good = str(ckpt)
    return state.get("compute")


def _iteration(r: _Run, step: int, running: dict) -> dict:
    """One iteration (every micro-batch, prompt encoding included, inside the compute meter); returns its losses."""
    tc, players, method = r.cfg.train, r.players, r.method
    expected = set(method.optimizers_for(step))
    players.begin(step, expected)
    with r.meter.iteration(step, expected):
        for micro in range(tc.grad_accum):  # micro-batches; each network steps after the last one
            players.micro(micro)
            batch_prompts = r.prompts(step, tc.batch_size, micro)
            batch = Batch(batch_prompts, r.backbone.encode_prompts(batch_prompts),
                          shared_seed=_mix(tc.seed, step, *([micro] if micro else [])))
            with r.accelerator.autocast():
                out = method.train_step(batch, step, players.update)
            players.check(out)
            for k, v in [*((f"loss/{k}", v) for k, v in out.losses.items()),
                         *((f"health/{k}", v) for k, v in out.logs.items())]:
                acc = running.setdefault(k, [0.0, 0])  # means since the last log row: players that step
                acc[0] += float(v)                     # on different iterations all show up
                acc[1] += 1
    for k, v in players.grad_norms.items():
        acc = running.setdefault(k, [0.0, 0])
        acc[0] += v
        acc[1] += 1
    return out.losses


def _log(r: _Run, step: int, running: dict) -> None:
    values = {k: total / n for k, (total, n) in running.items()}
    running.clear()
    values.update({f"lr/{n}": s.get_last_lr()[0] for n, s in r.players.schedulers.items()})
    values["time/minutes"] = r.minutes()
    r.log.write(step, values)


def _save(r: _Run, step: int) -> Path | None:
    """A checkpoint at ``step`` (atomic, the newest ``keep_checkpoints`` kept) and the compute totals."""
    from accelerate.utils import gather_object

    nets, state = r.players.state(r.backbone)
    state.update({"rng": gather_object([_rng_state(r.accelerator.device)]),
                  "data": r.data.state_dict() if r.data is not None else {},  # the same on every process
                  "compute": r.meter.state_dict()})
    path = None
    if r.main:
        minutes = r.minutes()
        path = save_checkpoint(r.dir, step, nets, state, r.method.extra_state(),
                               {"method": r.cfg.method, "arch": r.cfg.arch, "minutes": minutes,
                                "compute": r.meter.totals(minutes)}, keep=r.cfg.train.keep_checkpoints)
        write_json(r.dir / COMPUTE_FILE, {"step": step, **r.meter.totals(minutes)})
        r.players.last_good = str(path)
    if r.grid is not None:  # every process samples (a sharded student needs all of them); the main one logs
        net = r.method.nets["student"]
        was_training = net.training
        net.eval()
        with r.meter.uncounted(), r.players.ema._in_params(), r.accelerator.autocast():
            images = r.grid()
        net.train(was_training)
        r.log.images(step, {"samples/student_ema": images})
    r.accelerator.wait_for_everyone()
    return path
