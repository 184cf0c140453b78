"""Row sources of an eval and their samplers: trained runs (the student's EMA weights at the latest
checkpoint, through ``Method.sample``), the teacher at its own step counts with CFG, and already-distilled
external pipelines (sampled like the teacher).

``resolve_sources`` turns an ``EvalConfig`` into sources without building anything; a source's ``sampler``
binds it to a built backbone and gives one ``Plan`` per step count (σ grid, CFG, NFE, or why it is
skipped) and ``sample``. A plan's ``checkpoint`` (weights hash) is the identity the image cache keys on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from cdmbench.backbones.base import BackboneOptions
from cdmbench.errors import CdmbenchError
from cdmbench.io import read_json, write_json
from cdmbench.seeding import StackedGenerator

TEACHER = "teacher"


@dataclass(frozen=True)
class Plan:
    """What one (row source, steps) pair runs: its σ grid, CFG scale and NFE, or why it is skipped.

    ``checkpoint`` is the weights hash (cache identity); ``checkpoint_label`` is what result rows show.
    """

    run: str
    method: str  # method name, or "teacher"
    arch: str
    steps: int
    checkpoint: str
    checkpoint_label: str
    sigmas_nominal: tuple[float, ...] = ()
    sigmas_effective: tuple[float, ...] = ()
    guidance: float = 1.0  # CFG scale, standard form (1 = none)
    nfe: int | None = None  # network evaluations per sample; a CFG step counts twice
    skipped: str = ""  # reason the source cannot sample at ``steps``; "" when it runs
    row_run: str = ""  # the run name in result rows when ``run`` is an older checkpoint's image folder; "" = run
    train: tuple[tuple[str, object], ...] = ()  # the weights' training record (``TRAIN_COLUMNS`` of a results row)


class Sampler(Protocol):
    """A row source bound to a built backbone: the teacher, or a method's student with loaded weights."""

    def plan(self, steps: int) -> Plan: ...

    def sample(self, noise: torch.Tensor, cond, steps: int, rng: StackedGenerator) -> torch.Tensor:
        """Latents at σ = 0 for ``noise`` (B, *latent_shape)."""


@dataclass(frozen=True)
class RunSource:
    """A trained run folder, evaluated with its student's EMA weights at one checkpoint (the latest, or an
    older one under ``checkpoints="all"``: then ``name`` is ``RUN@STEP``, the folder of its images)."""

    name: str
    method: str
    arch: str
    run_dir: Path
    checkpoint_dir: Path
    finished: bool
    steps: tuple[int, ...]
    options: BackboneOptions
    run: str = ""  # the run's name in result rows; "" = name

    @property
    def config(self):
        from cdmbench.resume import read_run_config

        return read_run_config(self.run_dir)

    def sampler(self, backbone, hashes: "FileHashes") -> "StudentSampler":
        return StudentSampler(self, backbone, hashes)


@dataclass(frozen=True)
class TeacherSource:
    """The frozen teacher at its own step counts, with the backbone's default CFG."""

    name: str
    arch: str
    steps: tuple[int, ...]
    options: BackboneOptions
    method: str = TEACHER
    guidance: float | None = None  # None: the backbone's default teacher CFG

    def sampler(self, backbone, hashes: "FileHashes") -> "TeacherSampler":
        return TeacherSampler(self, backbone)


class StudentSampler:
    """``Method.sample`` of a run's student (EMA weights, loaded strictly on first use, so a fully cached
    source never reads its weights)."""

    def __init__(self, source: RunSource, backbone, hashes: "FileHashes"):
        from cdmbench.methods import METHODS

        cfg = source.config
        self.source, self.backbone = source, backbone
        self.method = METHODS.get(cfg.method)(backbone, cfg.method_config, training=False)
        self.weights = source.checkpoint_dir / "student_ema.safetensors"
        if not self.weights.is_file():
            raise CdmbenchError(f"run {source.name!r}: checkpoint {source.checkpoint_dir} has no student_ema.safetensors")
        self.hash = hashes.sha256(self.weights)
        label = f"{source.checkpoint_dir.name} sha256:{self.hash[:12]}"
        meta = read_json(source.checkpoint_dir / "meta.json", what="checkpoint meta")
        if not source.finished and not source.run:
            label += f" (unfinished run: latest checkpoint, iteration {meta.get('step')} of {cfg.train.steps})"
        self.label = label
        self.train = train_record(cfg, meta, read_json(source.run_dir / "config.json").get("world_size", 1))
        self.loaded = False

    def plan(self, steps: int) -> Plan:
        s = self.source
        base = dict(run=s.name, method=self.method.name, arch=self.backbone.name, steps=steps,
                    checkpoint=self.hash, checkpoint_label=self.label, row_run=s.run, train=self.train)
        try:
            schedule = self.method.schedule(steps)  # check_steps inside: supported_steps as ClassVar or property
        except CdmbenchError as e:
            return Plan(**base, skipped=str(e))
        return Plan(**base, sigmas_nominal=schedule.nominal, sigmas_effective=schedule.effective,
                    guidance=1.0, nfe=int(self.method.nfe(steps)))

    def sample(self, noise, cond, steps, rng):
        if not self.loaded:
            from cdmbench.io import load_safetensors

            # strict, through the backbone: a full state dict, or LoRA adapters for a LoRA run
            self.method.nets["student"] = self.backbone.load_net(load_safetensors(
                self.weights, fix="resume the run's training (it falls back to an intact checkpoint) or retrain"))
            self.loaded = True
        return self.method.sample(noise, cond, steps, rng)


def train_record(cfg, meta: dict, world_size: int) -> tuple[tuple[str, object], ...]:
    """The ``TRAIN_COLUMNS`` of a checkpoint: training seed, iteration, compute so far, global batch."""
    compute = meta.get("compute") or {}
    teacher = (compute.get("passes") or {}).get("teacher") or {}
    return (("train_seed", cfg.train.seed), ("train_step", meta.get("step")),
            ("train_tflops", compute.get("train_tflops")), ("train_teacher_fwd", teacher.get("fwd_samples")),
            ("train_minutes", meta.get("minutes")),
            ("global_batch", cfg.train.batch_size * int(world_size) * int(getattr(cfg.train, "grad_accum", 1))))


class TeacherSampler:
    """Euler over ``backbone.schedule(steps)`` with the teacher under CFG."""

    def __init__(self, source: TeacherSource, backbone):
        self.source, self.backbone = source, backbone
        g = source.guidance
        self.guidance = float(backbone.default_guidance if g is None else g)
        desc = backbone.describe()
        self.hash = _net_fingerprint(backbone.teacher, desc)
        self.label = f"{source.method} {desc.get('model') or 'default'} fingerprint:{self.hash[:12]}"

    def plan(self, steps: int) -> Plan:
        schedule = self.backbone.schedule(steps)
        return Plan(self.source.name, self.source.method, self.backbone.name, steps, self.hash, self.label,
                    schedule.nominal, schedule.effective, self.guidance,
                    steps * (2 if self.guidance != 1.0 else 1))

    def sample(self, noise, cond, steps, rng):
        from cdmbench.sampling import Denoiser, sample_euler

        bb = self.backbone
        den = Denoiser(bb, bb.teacher, cond, bb.uncond(noise.shape[0]), self.guidance)
        x = sample_euler(den, noise, bb.schedule(steps).sigmas(noise.device))
        expected = self.plan(steps).nfe
        if den.nfe != expected:  # the row's NFE must be what ran
            raise RuntimeError(f"teacher ran {den.nfe} network evaluations at {steps} steps, the plan says {expected}")
        return x


def _net_fingerprint(net: torch.nn.Module, describe: dict) -> str:
    """A cheap identity of a network's weights: per tensor its shape, dtype, a strided sample and its sum."""
    h = hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for k, v in net.state_dict().items():
            flat = v.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu().numpy()
            h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|{float(flat.double().sum())!r}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()


class FileHashes:
    """sha256 of weight files, remembered by (path, size, mtime) in a JSON file so a re-run does not rehash."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.table: dict = read_json(path) if path.is_file() else {}
        except CdmbenchError:  # a cache: a damaged one is rebuilt
            self.table = {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        entry = self.table.get(key)
        if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return entry["sha256"]
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        self.table[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
        write_json(self.path, self.table)
        return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Resolving an EvalConfig into sources


def trained_runs(workspace: str | Path) -> dict[str, Path]:
    """Run name → folder for every folder of ``WORKSPACE/runs`` with a config.json and a checkpoint."""
    from cdmbench.checkpoint import latest_checkpoint

    root = Path(workspace) / "runs"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if (p / "config.json").is_file() and latest_checkpoint(p) is not None}


def resolve_sources(cfg, note: Callable[[str], None] = lambda text: None) -> list:
    """The row sources of ``cfg`` (an ``EvalConfig``), teacher rows first, then externals, then runs; builds
    nothing. ``note`` receives one-line notices (runs skipped or evaluated at an unfinished checkpoint)."""
    from cdmbench.backbones import BACKBONES
    from cdmbench.checkpoint import latest_checkpoint

    available = trained_runs(cfg.workspace)
    if cfg.runs is None:
        names = list(available)
    else:
        names = list(cfg.runs)
        for n in names:
            if n not in available and (Path(cfg.workspace) / "runs" / n / "config.json").is_file():
                raise CdmbenchError(f"runs: run {n!r} has no checkpoint yet; wait for its first checkpoint")
            if n not in available:
                have = ", ".join(available) or f"none (train one with `cdmbench train METHOD --workspace {cfg.workspace}`)"
                raise CdmbenchError(f"runs: no trained run {n!r} in {Path(cfg.workspace) / 'runs'}; available runs: {have}")
    if cfg.runs is None:
        for d in sorted((Path(cfg.workspace) / "runs").glob("*/config.json")):
            if d.parent.name not in available:
                note(f"skipping run {d.parent.name}: no checkpoint yet")
    runs: list[RunSource] = []
    for n in names:
        from cdmbench.resume import read_run_config

        d = available[n]
        saved = read_run_config(d)
        # gradient checkpointing only matters for training; without it runs share the teacher's backbone
        opts = dataclasses.replace(saved.backbone, device=cfg.device, gradient_checkpointing=False)
        finished = (d / "done.json").is_file()
        if not finished:
            note(f"run {n} is unfinished: evaluating its latest checkpoint {latest_checkpoint(d).name}")
        latest = latest_checkpoint(d)
        runs.append(RunSource(n, saved.method, saved.arch, d, latest, finished, cfg.steps, opts))
        if cfg.checkpoints == "all":
            from cdmbench.checkpoint import CKPT_DIR

            for c in sorted((d / CKPT_DIR).glob("step_*")):
                if c.is_dir() and not c.name.endswith(".tmp") and c.name != latest.name:
                    step = int(read_json(c / "meta.json")["step"])
                    runs.append(RunSource(f"{n}@{step}", saved.method, saved.arch, d, c, finished, cfg.steps,
                                          opts, run=n))
    teachers: list[TeacherSource] = []
    if cfg.teacher:
        archs = list(dict.fromkeys([r.arch for r in runs] + ([cfg.arch] if cfg.arch else [])))
        for arch in archs:
            # the teacher of a LoRA run is the same frozen network: drop the adapter settings
            options = list(dict.fromkeys(dataclasses.replace(r.options, lora_rank=0, lora_alpha=0.0)
                                         for r in runs if r.arch == arch)) or [BackboneOptions(device=cfg.device)]
            own = BACKBONES.get(arch).default_teacher_steps
            steps = cfg.teacher_steps or tuple(sorted(set(cfg.steps) | {own}))
            for i, opts in enumerate(options):
                name = f"{TEACHER}-{arch}" + (f"-{i}" if len(options) > 1 else "")
                if name in available:
                    raise CdmbenchError(f"runs: a run folder is named {name!r}, the name of the teacher rows; rename it")
                teachers.append(TeacherSource(name, arch, steps, opts))
    externals: list[TeacherSource] = []
    for e in cfg.external:
        name, _, target = e.partition("=")
        target, _, g = target.rpartition("@") if "@" in target else (target, "", "")
        arch = cfg.arch or (runs[0].arch if len({r.arch for r in runs}) == 1 and runs else None)
        if arch is None:
            raise CdmbenchError(f"external: --arch is needed to load {name.strip()!r} (which backbone class it is)")
        try:
            guidance = float(g) if g else 1.0
        except ValueError:
            raise CdmbenchError(f"external: guidance after '@' must be a number, got {g!r}") from None
        if name.strip() in available or name.strip().startswith(TEACHER):
            raise CdmbenchError(f"external: name {name.strip()!r} clashes with a run or the teacher rows")
        externals.append(TeacherSource(name.strip(), arch, cfg.steps,
                                       BackboneOptions(model=target.strip(), device=cfg.device),
                                       method="external", guidance=guidance))
    sources: list = [*teachers, *externals, *runs]
    if not sources:
        raise CdmbenchError(
            f"nothing to evaluate: no trained runs in {Path(cfg.workspace) / 'runs'}; train one with "
            f"`cdmbench train METHOD`, or pass --arch to evaluate the teacher alone"
        )
    check_sources(externals, runs)
    return sources


def check_sources(externals: list, runs: list) -> None:
    """Before anything is generated: every run's checkpoint verifies (headers, recorded sizes) and every
    external path exists (corruption is one line, not half an eval)."""
    from cdmbench.checkpoint import verify_checkpoint
    from cdmbench.errors import CorruptStateError

    for r in runs:
        bad = verify_checkpoint(r.checkpoint_dir)
        if bad:
            raise CorruptStateError(f"run {r.name!r}: its latest checkpoint cannot be used: {bad}; resume its "
                                    f"training (`cdmbench train ... --resume` falls back to an intact checkpoint)")
    for e in externals:
        m = str(e.options.model)
        if (m.startswith((".", "/", "~")) or m.count("/") > 1) and not Path(m).expanduser().exists():
            raise CdmbenchError(f"external {e.name!r}: {m} does not exist (a local pipeline folder, or a hub id)")
