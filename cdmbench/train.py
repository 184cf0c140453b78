"""The one training loop (style.md principle 2; EDM ``training_loop.py``).

It never branches on a method or backbone name: the method says which networks step when
(``optimizers_for``) and calls ``update(name, loss)``; the loop does backward, clipping, the NaN/inf
guard, LR warm-up, the student EMA, atomic checkpoints, resume and the health log. It runs unchanged
under ``accelerate launch`` (DDP/FSDP); random choices that must agree across processes come from
``Batch.shared_seed``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdmbench.backbones.base import BackboneOptions
from cdmbench.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cdmbench.config import TrainConfig, apply_overrides, from_jsonable, to_jsonable
from cdmbench.errors import CdmbenchError, NonFiniteError
from cdmbench.io import read_json, write_json

# ------------------------------------------------------------------------------------------------
# Resolved run configuration


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` in the run folder."""

    method: str
    arch: str
    method_config: Any
    train: TrainConfig
    backbone: BackboneOptions

    def to_dict(self) -> dict:
        import cdmbench

        return {"method": self.method, "arch": self.arch, "method_config": to_jsonable(self.method_config),
                "train": to_jsonable(self.train), "backbone": to_jsonable(self.backbone),
                "cdmbench_version": cdmbench.__version__, "torch": torch.__version__}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        from cdmbench.methods import METHODS

        m = METHODS.get(d["method"])
        return cls(d["method"], d["arch"], from_jsonable(m.Config, d["method_config"]),
                   from_jsonable(TrainConfig, d["train"]), from_jsonable(BackboneOptions, d["backbone"]))


def resolve_config(method: str, arch: str, overrides: dict[str, str] | None = None,
                   backbone_options: BackboneOptions | None = None) -> RunConfig:
    """Method defaults × the method's preset for ``arch`` × user overrides.

    Override keys: ``train.<field>`` (TrainConfig), ``backbone.<field>`` (BackboneOptions), anything else a
    field of the method's config.
    """
    from cdmbench.backbones import BACKBONES
    from cdmbench.methods import METHODS

    m = METHODS.get(method)
    BACKBONES.get(arch)  # fail early on an unknown arch
    merged = {**m.presets.get(arch, {}), **(overrides or {})}
    groups: dict[str, dict] = {"train": {}, "backbone": {}, "method": {}}
    for k, v in merged.items():
        head, _, rest = k.partition(".")
        if rest and head in ("train", "backbone"):
            groups[head][rest] = v
        else:
            groups["method"][k] = v
    return RunConfig(
        method, arch,
        apply_overrides(m.Config(), groups["method"]),
        apply_overrides(TrainConfig(), groups["train"], prefix="train."),
        apply_overrides(backbone_options or BackboneOptions(), groups["backbone"], prefix="backbone."),
    )


# ------------------------------------------------------------------------------------------------
# Prompts


class PromptSource:
    """Per-iteration, per-process training prompts, a pure function of (seed, step, process)."""

    def __init__(self, backbone, path: str | None, seed: int, process_index: int, num_processes: int):
        self.backbone, self.seed, self.rank, self.world = backbone, seed, process_index, num_processes
        self.lines: list[str] | None = None
        if path:
            p = Path(path)
            if not p.is_file():
                raise CdmbenchError(f"train.prompts: no such file {path!r}")
            self.lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            if len(self.lines) < num_processes:
                raise CdmbenchError(f"train.prompts: {path!r} has {len(self.lines)} prompts; need at least one per process")

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn with ``generator`` from the whole source (same on every process)."""
        if self.lines is None:
            return self.backbone.train_prompts(n, generator)
        return [self.lines[int(i)] for i in torch.randint(len(self.lines), (n,), generator=generator)]

    def __call__(self, step: int, n: int) -> list[str]:
        g = torch.Generator().manual_seed(_mix(self.seed, step, self.rank))
        if self.lines is None:
            return self.backbone.train_prompts(n, g)
        shard = self.lines[self.rank::self.world]
        return [shard[int(i)] for i in torch.randint(len(shard), (n,), generator=g)]


def _mix(*xs: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(xs).encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------
# The loop


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2])}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    v, state, gauss = s["python"]
    random.setstate((v, tuple(state), gauss))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))


class HealthLog:
    """Tidy CSV (step, key, value) plus TensorBoard scalars when available."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int):
        self.path = run_dir / "metrics.csv"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop rows the resumed run will write again
            rows = [r for r in csv.reader(self.path.open()) if r and (r[0] == "step" or int(r[0]) < resume_step)]
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows(rows)
        new = not self.path.exists()
        self.file = self.path.open("a", newline="", buffering=1)
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "key", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional; the CSV is the record
            self.tb = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.writerow([step, k, f"{v:.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Train ``cfg`` into ``run_dir``; returns the final checkpoint folder.

    ``resume`` continues from the latest checkpoint in ``run_dir``. ``stop_after`` ends the process
    after that many iterations *without* a final checkpoint (a simulated kill, for tests).
    """
    from accelerate import Accelerator

    from cdmbench.backbones import build_backbone
    from cdmbench.methods import METHODS
    from cdmbench.methods.base import Batch

    run_dir = Path(run_dir)
    tc = cfg.train
    accelerator = Accelerator(cpu=cfg.backbone.device == "cpu", mixed_precision=tc.mixed_precision)
    main = accelerator.is_main_process
    start, ckpt = 0, None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CdmbenchError(f"--resume: no checkpoint in {run_dir}")
        saved = RunConfig.from_dict(read_json(run_dir / "config.json"))
        if saved.to_dict()["method_config"] != cfg.to_dict()["method_config"] or saved.method != cfg.method:
            raise CdmbenchError(f"--resume: the config differs from the one saved in {run_dir}/config.json")
    elif (run_dir / "config.json").exists():
        raise CdmbenchError(f"run folder {run_dir} already exists; pass --resume to continue it or choose another --run-name")
    seed = tc.seed + accelerator.process_index
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    options = dataclasses.replace(cfg.backbone, device=str(accelerator.device))
    backbone = build_backbone(cfg.arch, options)  # fails (missing weights, bad options) before any file is written
    prompts = PromptSource(backbone, tc.prompts, tc.seed, accelerator.process_index, accelerator.num_processes)
    method = METHODS.get(cfg.method)(backbone, cfg.method_config)
    method.prompt_source = prompts.sample  # extra prompts a method draws (e.g. cached teacher pairs)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {**cfg.to_dict(), "world_size": accelerator.num_processes})
    specs = method.optim_specs()
    optimizers, schedulers = {}, {}
    for name, spec in specs.items():
        params = [p for p in method.nets[name].parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, eps=spec.eps,
                                foreach=True)
        warm = spec.warmup
        sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda k, w=warm: min(1.0, k / w)) if warm else (lambda k: 1.0))
        method.nets[name], optimizers[name] = accelerator.prepare(method.nets[name], opt)
        schedulers[name] = sched
    ema = copy.deepcopy(accelerator.unwrap_model(method.nets["student"])).eval().requires_grad_(False)
    counts = {name: 0 for name in specs}
    prev_minutes = 0.0

    if ckpt is not None:
        nets, state, extra, meta = load_checkpoint(ckpt)
        for name in specs:
            accelerator.unwrap_model(method.nets[name]).load_state_dict(nets[name], strict=True)
            optimizers[name].load_state_dict(state["optimizers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        ema.load_state_dict(nets["student_ema"], strict=True)
        method.load_extra_state(extra)
        counts = dict(state["counts"])
        _set_rng_state(state["rng"][accelerator.process_index] if isinstance(state["rng"], list) else state["rng"])
        start = int(meta["step"])
        prev_minutes = float(meta.get("minutes", 0.0))

    log = HealthLog(run_dir, main, start)
    last_good = str(ckpt) if ckpt else "none yet"
    t_start = time.time() - 60 * prev_minutes  # training minutes accumulate across resumes

    def save(step: int) -> Path:
        nonlocal last_good
        nets = {name: backbone.net_state_dict(accelerator.unwrap_model(method.nets[name])) for name in specs}
        nets["student_ema"] = backbone.net_state_dict(ema)
        state = {"optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                 "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                 "counts": counts, "rng": _rng_state()}
        path = None
        if main:
            path = save_checkpoint(run_dir, step, nets, state, method.extra_state(),
                                   {"method": cfg.method, "arch": cfg.arch, "minutes": (time.time() - t_start) / 60},
                                   keep=tc.keep_checkpoints)
            last_good = str(path)
        accelerator.wait_for_everyone()
        return path

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not (progress and main))
    task = bar.add_task(f"train {cfg.method} on {cfg.arch}", total=tc.steps, completed=start, info="")
    final = None
    running: dict[str, list] = {}
    with bar:
        for step in range(start, tc.steps):
            if stop_after is not None and step - start >= stop_after:
                log.close()
                return Path(last_good)
            batch_prompts = prompts(step, tc.batch_size)
            batch = Batch(batch_prompts, backbone.encode_prompts(batch_prompts), shared_seed=_mix(tc.seed, step))
            expected = set(method.optimizers_for(step))
            stepped: list[str] = []
            grad_norms: dict[str, float] = {}

            def update(name: str, loss: torch.Tensor) -> None:
                if name not in expected or name in stepped:
                    raise RuntimeError(f"{cfg.method}: update({name!r}) at step {step}; optimizers_for says {sorted(expected)}")
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"non-finite {name} loss ({loss.item()}) at iteration {step}; "
                                         f"training stopped, last good checkpoint: {last_good}")
                for net in method.nets.values():
                    net.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                params = [p for p in method.nets[name].parameters() if p.requires_grad]
                if tc.grad_clip > 0:
                    gn = accelerator.clip_grad_norm_(params, tc.grad_clip)
                else:
                    gn = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                if not torch.isfinite(torch.as_tensor(gn)):
                    raise NonFiniteError(f"non-finite {name} gradient norm at iteration {step}; "
                                         f"training stopped, last good checkpoint: {last_good}")
                optimizers[name].step()
                schedulers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                counts[name] += 1
                grad_norms[f"grad_norm/{name}"] = float(gn)
                stepped.append(name)
                if name == "student":
                    k = counts["student"] - 1
                    decay = min((1 + k) / (10 + k), tc.ema_decay)
                    with torch.no_grad():
                        student = accelerator.unwrap_model(method.nets["student"])
                        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in student.parameters()], 1 - decay)
                method.after_update(name)

            with accelerator.autocast():
                out = method.train_step(batch, step, update)
            if set(stepped) != expected:
                raise RuntimeError(f"{cfg.method}: stepped {sorted(stepped)} at iteration {step}, declared {sorted(expected)}")
            missing = [k for k in out.losses if k not in method.loss_keys]
            if missing:
                raise RuntimeError(f"{cfg.method}: undeclared loss keys {missing}")
            for k, v in [*((f"loss/{k}", v) for k, v in out.losses.items()),
                         *((f"health/{k}", v) for k, v in out.logs.items()), *grad_norms.items()]:
                acc = running.setdefault(k, [0.0, 0])  # means since the last log row: players that step
                acc[0] += float(v)                     # on different iterations all show up
                acc[1] += 1
            if step % tc.log_every == 0 or step == tc.steps - 1:
                values = {k: total / n for k, (total, n) in running.items()}
                running.clear()
                values.update({f"lr/{n}": s.get_last_lr()[0] for n, s in schedulers.items()})
                values["time/minutes"] = (time.time() - t_start) / 60
                log.write(step, values)
                bar.update(task, info=" ".join(f"{k}={float(v):.3g}" for k, v in out.losses.items()))
            bar.update(task, completed=step + 1)
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps:
                final = save(step + 1)
    log.close()
    if main:
        write_json(run_dir / "done.json", {"steps": tc.steps, "checkpoint": str(Path(last_good).name),
                                           "train_minutes": round((time.time() - t_start) / 60, 3)})
    return Path(last_good) if final is None else final
