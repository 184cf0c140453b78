"""The eval harness: every trained run (and the teacher) × step count → images → one tidy row per metric.

Two phases with caches (style.md principle 8; baselines.md §D.2), both resumable after a kill:

1. ``generate``: PNGs plus ``manifest.jsonl`` (``cdmbench.eval.generate``), shardable by (prompt, seed)
   index across processes.
2. ``score``: reads the images back from disk, runs every selected metric and appends rows to
   ``results.csv`` (``cdmbench.eval.results``). A computed score is cached under ``cache/scores/``, keyed
   by run, steps, metric, options and a hash of the exact image set, so re-running a finished eval only
   reads caches, and rows already in the results file are not written twice.

Row sources: a trained run (its student's EMA weights at the latest checkpoint, through
``Method.sample``), and the teacher at its own step counts with CFG (``backbone.default_guidance``; NFE
counts a CFG step as two). A step count a method cannot sample gives a "skipped: <reason>" row, a metric
that does not apply to the backbone a "not_applicable: <reason>" row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from cdmbench.backbones.base import BackboneOptions
from cdmbench.errors import CdmbenchError, UnknownNameError
from cdmbench.eval.generate import (
    MANIFEST,
    Manifest,
    OnImage,
    Plan,
    generate_images,
    image_relpath,
    is_cached,
    missing_items,
    read_pngs,
    shard,
)
from cdmbench.io import read_json, write_json
from cdmbench.prompts import Prompt

RESULTS = "results.csv"
SCORE_BATCH = 64  # images per metric update; fixed so scores never depend on --batch-size
TEACHER = "teacher"


@dataclass(frozen=True)
class EvalConfig:
    """What ``cdmbench eval`` evaluates (the CLI builds this; every field is one option).

    Args:
        workspace: holds ``runs/`` (trained runs) and, by default, the eval folder ``eval/``.
        steps: student step counts.
        runs: run names in ``WORKSPACE/runs``; None = every trained run.
        metrics: registered metric names; None = every registered metric.
        prompts: a bundled prompt set ("default": the backbone's own; ``cdmbench.prompts.bundled_sets``) or a
            prompt file (``cdmbench.prompts``).
        num_prompts: use the first N prompts; None = all.
        seeds: seeds per prompt; a sample is (prompt id, seed).
        batch_size: generation batch size (images do not depend on it beyond float rounding).
        out: eval folder (images, manifest, caches, results.csv); None = WORKSPACE/eval.
        teacher: add teacher reference rows.
        teacher_steps: teacher step counts; None = ``steps`` plus the backbone's ``default_teacher_steps``.
        arch: backbone of teacher rows when no evaluated run names one.
        external: NAME=PATH_OR_ID[@GUIDANCE] already-distilled pipelines of ``arch`` (hub id or local folder),
            sampled like the teacher at ``steps`` with their own CFG (default 1.0: no guidance).
        device: torch device for generation and scoring.
        progress: show progress bars and notes.
    """

    workspace: str = "workspace"
    steps: tuple[int, ...] = (1, 2, 4)
    runs: tuple[str, ...] | None = None
    metrics: tuple[str, ...] | None = None
    prompts: str = "default"
    num_prompts: int | None = None
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    out: str | None = None
    teacher: bool = True
    teacher_steps: tuple[int, ...] | None = None
    arch: str | None = None
    external: tuple[str, ...] = ()
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        _check_ints("steps", self.steps, minimum=1)
        if self.teacher_steps is not None:
            _check_ints("teacher_steps", self.teacher_steps, minimum=1)
        _check_ints("seeds", self.seeds, minimum=0)
        if not str(self.workspace).strip():
            raise CdmbenchError("workspace: empty path")
        if self.runs is not None:
            _check_names("runs", self.runs)
        if self.metrics is not None:
            from cdmbench.eval.metrics import METRICS

            _check_names("metrics", self.metrics)
            for m in self.metrics:
                if m not in METRICS:
                    raise UnknownNameError(f"metrics: unknown metric {m!r}; valid metrics: {', '.join(METRICS.names())}")
        if not str(self.prompts).strip():
            from cdmbench.prompts import bundled_sets

            raise CdmbenchError(f"prompts: empty; pass a prompt set name ({', '.join(bundled_sets())}) or a prompt file")
        if self.num_prompts is not None and (not isinstance(self.num_prompts, int) or self.num_prompts < 1):
            raise CdmbenchError(f"num_prompts must be a positive integer or None, got {self.num_prompts!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CdmbenchError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.arch is not None:
            from cdmbench.backbones import BACKBONES

            if self.arch not in BACKBONES:
                raise UnknownNameError(f"arch: unknown backbone {self.arch!r}; valid backbones: {', '.join(BACKBONES.names())}")
        for e in self.external:
            name, sep, target = str(e).partition("=")
            if not sep or not name.strip() or not target.strip():
                raise CdmbenchError(f"external: expected NAME=PATH_OR_ID, got {e!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise CdmbenchError(f"device: {self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.workspace) / "eval"


def _check_ints(name: str, values, minimum: int) -> None:
    if not isinstance(values, tuple) or not values:
        raise CdmbenchError(f"{name}: expected a non-empty tuple of integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise CdmbenchError(f"{name}: every value must be an integer >= {minimum}, got {v!r}")
    if len(set(values)) != len(values):
        raise CdmbenchError(f"{name}: duplicate values in {values}")


def _check_names(name: str, values) -> None:
    if not isinstance(values, tuple) or not values or any(not str(v).strip() for v in values):
        raise CdmbenchError(f"{name}: expected a non-empty tuple of names, got {values!r}")
    if len(set(values)) != len(values):
        raise CdmbenchError(f"{name}: duplicate names in {values}")


# --------------------------------------------------------------------------------------------------
# Row sources: trained runs and the teacher


@dataclass(frozen=True)
class RunSource:
    """A trained run folder, evaluated with its student's EMA weights at the latest checkpoint."""

    name: str
    method: str
    arch: str
    run_dir: Path
    checkpoint_dir: Path
    finished: bool
    steps: tuple[int, ...]
    options: BackboneOptions

    @property
    def config(self):
        from cdmbench.train import RunConfig

        return RunConfig.from_dict(read_json(self.run_dir / "config.json"))

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
        if not source.finished:
            step = read_json(source.checkpoint_dir / "meta.json").get("step")
            label += f" (unfinished run: latest checkpoint, iteration {step} of {cfg.train.steps})"
        self.label = label
        self.loaded = False

    def plan(self, steps: int) -> Plan:
        s = self.source
        base = dict(run=s.name, method=self.method.name, arch=self.backbone.name, steps=steps,
                    checkpoint=self.hash, checkpoint_label=self.label)
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
            self.method.nets["student"] = self.backbone.load_net(load_safetensors(self.weights))
            self.loaded = True
        return self.method.sample(noise, cond, steps, rng)


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
        self.table: dict = read_json(path) if path.is_file() else {}

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
# Resolving the config: sources, prompts, backbones


def trained_runs(workspace: str | Path) -> dict[str, Path]:
    """Run name → folder for every folder of ``WORKSPACE/runs`` with a config.json and a checkpoint."""
    from cdmbench.checkpoint import latest_checkpoint

    root = Path(workspace) / "runs"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if (p / "config.json").is_file() and latest_checkpoint(p) is not None}


class _Eval:
    """A resolved ``EvalConfig``: row sources grouped by backbone, prompts per arch, caches."""

    def __init__(self, cfg: EvalConfig):
        from cdmbench.backbones import BACKBONES
        from cdmbench.checkpoint import latest_checkpoint

        self.cfg, self.out = cfg, cfg.out_dir
        self._console = None
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
                    self.note(f"skipping run {d.parent.name}: no checkpoint yet")
        runs: list[RunSource] = []
        for n in names:
            from cdmbench.train import RunConfig

            d = available[n]
            saved = RunConfig.from_dict(read_json(d / "config.json"))
            # gradient checkpointing only matters for training; without it runs share the teacher's backbone
            opts = dataclasses.replace(saved.backbone, device=cfg.device, gradient_checkpointing=False)
            finished = (d / "done.json").is_file()
            if not finished:
                self.note(f"run {n} is unfinished: evaluating its latest checkpoint {latest_checkpoint(d).name}")
            runs.append(RunSource(n, saved.method, saved.arch, d, latest_checkpoint(d), finished, cfg.steps, opts))
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
        self.sources: list = [*teachers, *externals, *runs]
        if not self.sources:
            raise CdmbenchError(
                f"nothing to evaluate: no trained runs in {Path(cfg.workspace) / 'runs'}; train one with "
                f"`cdmbench train METHOD`, or pass --arch to evaluate the teacher alone"
            )
        self.prompts = {arch: self._prompts(arch) for arch in dict.fromkeys(s.arch for s in self.sources)}
        self.hashes = FileHashes(self.out / "cache" / "file_hashes.json")
        self.manifest = Manifest(self.out / MANIFEST)
        self.groups: dict[tuple[str, BackboneOptions], list] = {}  # sources by the backbone they need
        for src in self.sources:
            self.groups.setdefault((src.arch, src.options), []).append(src)
        self._plans: dict[str, list[Plan]] = {}
        self._loaded: tuple = (None, None)  # (group key, backbone)

    def _prompts(self, arch: str) -> list[Prompt]:
        from cdmbench.prompts import load_prompt_set

        prompts = load_prompt_set(self.cfg.prompts, arch)
        n = self.cfg.num_prompts
        if n is not None and n > len(prompts):
            raise CdmbenchError(f"num_prompts: {n} requested but prompt set {self.cfg.prompts!r} has {len(prompts)}")
        return prompts[:n] if n else prompts

    def items(self, arch: str) -> list[tuple[Prompt, int]]:
        """Every (prompt, seed) sample of an arch, prompt-major: the list shards split by index."""
        return [(p, s) for p in self.prompts[arch] for s in self.cfg.seeds]

    def walk(self, with_sampler: bool) -> Iterator[tuple[object, object, object, list[Plan]]]:
        """(source, backbone, sampler, plans) per source, teacher first.

        Plans are remembered, so a later phase on the same ``_Eval`` builds nothing unless it asks for
        samplers (``with_sampler``; backbone and sampler are None otherwise). One backbone is alive at a
        time, and a sampler (a student copy) lives only while its source is processed.
        """
        for key, sources in self.groups.items():
            for s in sources:
                if not with_sampler and s.name in self._plans:
                    yield s, None, None, self._plans[s.name]
                    continue
                backbone = self._backbone(key)
                sampler = s.sampler(backbone, self.hashes)
                self._plans[s.name] = [sampler.plan(st) for st in s.steps]
                yield s, backbone, sampler, self._plans[s.name]
                del sampler

    def release(self) -> None:
        """Drop the loaded backbone (scoring needs only the remembered plans)."""
        self._loaded = (None, None)

    def _backbone(self, key: tuple[str, BackboneOptions]):
        from cdmbench.backbones import build_backbone

        if self._loaded[0] != key:
            self._loaded = (None, None)  # free the previous one before building the next
            self._loaded = (key, build_backbone(*key))
        return self._loaded[1]

    def note(self, text: str) -> None:
        """A one-line notice on stderr (not with progress=False)."""
        if self.cfg.progress:
            from rich.console import Console

            self._console = self._console or Console(stderr=True)
            self._console.print(text, highlight=False)


def row_sources(cfg: EvalConfig) -> list:
    """The row sources ``cfg`` evaluates, teacher rows first (``TeacherSource``/``RunSource``); builds nothing."""
    return list(_Eval(cfg).sources)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled)


# --------------------------------------------------------------------------------------------------
# Phase 1: generation


def generate(cfg: EvalConfig, *, process_index: int = 0, num_processes: int = 1,
             on_image: OnImage | None = None) -> int:
    """Generate this process's share of every missing image; returns how many were written.

    Args:
        process_index, num_processes: this process takes the (prompt, seed) items whose index is
            ``process_index`` modulo ``num_processes``; several processes may share one eval folder.
        on_image: called with each new manifest record (a test hook: raise from it to simulate a kill).
    """
    return _generate(_Eval(cfg), process_index, num_processes, on_image)


def _generate(ev: _Eval, process_index: int, num_processes: int, on_image: OnImage | None) -> int:
    cfg = ev.cfg
    shard([], process_index, num_processes)  # validate the split
    records = ev.manifest.read()
    written = 0
    with _progress(cfg.progress) as bar:
        for source, backbone, sampler, plans in ev.walk(with_sampler=True):
            mine = shard(ev.items(source.arch), process_index, num_processes)
            for plan in plans:
                if plan.skipped:
                    continue
                todo = missing_items(plan, mine, records, ev.out)
                if not todo:
                    continue
                task = bar.add_task(f"generate {plan.run} @ {plan.steps} steps", total=len(todo))
                written += generate_images(sampler, plan, backbone, todo, ev.out, ev.manifest,
                                           batch_size=cfg.batch_size, process_index=process_index,
                                           on_image=on_image, advance=lambda k, t=task: bar.advance(t, k))
            del sampler  # free the student before the next source builds its own
    return written


# --------------------------------------------------------------------------------------------------
# Phase 2: scoring


def score(cfg: EvalConfig) -> Path:
    """Score every (source, steps) image set with every selected metric; returns the results file.

    Scoring reads the PNGs written by ``generate`` and never regenerates: missing images are an error.
    """
    return _score(_Eval(cfg))


def _score(ev: _Eval) -> Path:
    import pandas as pd

    from cdmbench.eval.metrics import METRICS, MetricOptions
    from cdmbench.eval.results import RESULT_COLUMNS, append_rows, normalize, read_results

    cfg = ev.cfg
    records = ev.manifest.read()
    results = ev.out / RESULTS
    names = list(cfg.metrics or METRICS.names())
    options = MetricOptions(device=cfg.device)
    built: dict[tuple[str, str], object] = {}
    have = {_row_key(r) for r in read_results(results).to_dict("records")} if results.is_file() else set()

    def metric(name: str, arch: str):
        if (name, arch) not in built:
            from cdmbench.eval.metrics import build_metric

            built[(name, arch)] = build_metric(name, _evaluators(arch), options)
        m = built[(name, arch)]
        m.reset()
        return m

    with _progress(cfg.progress) as bar:
        task = bar.add_task("score", total=sum(len(s.steps) for s in ev.sources))
        for _, _, _, plans in ev.walk(with_sampler=False):
            for plan in plans:
                rows = _score_plan(ev, plan, records, names, options, metric)
                frame = normalize(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)))
                new = [r for r in frame.to_dict("records") if _row_key(r) not in have]
                if new:
                    append_rows(results, new)
                    have.update(_row_key(r) for r in new)
                bar.advance(task)
    return results


def _score_plan(ev: _Eval, plan: Plan, records: dict, names: list[str], options, metric) -> list[dict]:
    from cdmbench.eval.metrics import METRICS

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if plan.skipped:
        return [_row(plan, n, METRICS.get(n).higher_is_better, status=f"skipped: {plan.skipped}", timestamp=now)
                for n in names]
    items = ev.items(plan.arch)
    recs = [records.get(image_relpath(plan.run, plan.steps, p.id, s)) for p, s in items]
    missing = sum(not is_cached(r, plan, p, ev.out) for r, (p, _) in zip(recs, items))
    if missing:
        raise CdmbenchError(f"{missing} of {len(items)} images of {plan.run} at {plan.steps} steps are missing from "
                            f"{ev.out}; run the generation phase first (cdmbench eval does both)")
    image_set = hashlib.sha256(json.dumps(
        [[p.id, s, p.text, dict(p.meta), r["pixels_sha256"], r["checkpoint"]] for (p, s), r in zip(items, recs)],
        sort_keys=True).encode()).hexdigest()

    rows, todo = {}, []
    for n in names:
        cls = METRICS.get(n)
        applies = cls.applies_to(_evaluators(plan.arch))
        if not applies:
            rows[n] = _row(plan, n, cls.higher_is_better, status=applies.status, timestamp=now)
            continue
        key = _score_key(plan, n, image_set, options)
        cached = ev.out / "cache" / "scores" / f"{key}.json"
        if cached.is_file():
            rows[n] = _row(plan, n, cls.higher_is_better, status="ok", **read_json(cached))
        else:
            todo.append((n, cls, cached))
    if todo:
        built = [(n, cls, path, metric(n, plan.arch)) for n, cls, path in todo]
        for lo in range(0, len(items), SCORE_BATCH):
            chunk = items[lo:lo + SCORE_BATCH]
            images = read_pngs([ev.out / r["path"] for r in recs[lo:lo + SCORE_BATCH]])
            for *_, m in built:
                m.update(images, [p for p, _ in chunk])
        for n, cls, path, m in built:
            result = m.compute()
            ci_low, ci_high = result.interval()
            entry = {"value": float(result.value), "ci_low": ci_low, "ci_high": ci_high, "n": int(result.n),
                     "protocol": m.protocol, "timestamp": now}
            write_json(path, entry)  # atomic: a kill leaves no half entry
            rows[n] = _row(plan, n, cls.higher_is_better, status="ok", **entry)
    return [rows[n] for n in names]


def _evaluators(arch: str):
    """What backbone ``arch`` declares its images are scored with (``Backbone.evaluators``)."""
    from cdmbench.backbones import BACKBONES

    return BACKBONES.get(arch).evaluators()


def _row(plan: Plan, metric: str, higher_is_better: bool, *, status: str, timestamp: str, value: float = math.nan,
         ci_low: float = math.nan, ci_high: float = math.nan, n: int = 0, protocol: str = "") -> dict:
    return {
        "run": plan.run, "method": plan.method, "arch": plan.arch, "steps": plan.steps, "metric": metric,
        "value": value, "ci_low": ci_low, "ci_high": ci_high, "n": n, "higher_is_better": higher_is_better,
        "protocol": protocol, "nfe": plan.nfe,
        "sigmas_nominal": json.dumps([round(s, 6) for s in plan.sigmas_nominal]),
        "sigmas_effective": json.dumps([round(s, 6) for s in plan.sigmas_effective]),
        "guidance": plan.guidance, "checkpoint": plan.checkpoint_label, "timestamp": timestamp, "status": status,
    }


def _score_key(plan: Plan, metric: str, image_set: str, options) -> str:
    import cdmbench

    ident = {"run": plan.run, "steps": plan.steps, "metric": metric, "arch": plan.arch, "images": image_set,
             "options": dataclasses.asdict(options), "cdmbench": cdmbench.__version__}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _row_key(row: dict) -> tuple:
    """A row's identity for "already in the results file": every column but the timestamp."""

    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "nan"
        try:
            import pandas as pd

            if v is pd.NA:
                return "nan"
        except ImportError:  # pragma: no cover
            pass
        if isinstance(v, float):
            return f"{v:.12g}"
        return str(v)

    return tuple(fmt(v) for k, v in row.items() if k != "timestamp")


# --------------------------------------------------------------------------------------------------
# Both phases


def run_eval(cfg: EvalConfig, *, on_image: OnImage | None = None) -> Path:
    """Generate (this process's share, under ``accelerate launch``) then score on the main process.

    Returns the results file (``OUT/results.csv``). Under a multi-process launch the other processes
    return once every share is generated, without waiting for the scores (no collective runs after that).
    """
    index, count, barrier, device = _process_group(cfg.device)
    ev = _Eval(dataclasses.replace(cfg, device=device))
    _generate(ev, index, count, on_image)
    ev.release()
    barrier()
    return _score(ev) if index == 0 else ev.out / RESULTS


def _process_group(device: str):
    """(process_index, num_processes, wait_for_everyone, device): accelerate's PartialState under a
    multi-process launch (each process on its own accelerator), else one process (accelerate not imported)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, lambda: None, device
    from accelerate import PartialState

    cpu = torch.device(device).type == "cpu"
    state = PartialState(cpu=cpu)  # without cpu=True accelerate ignores a CPU multi-process launch
    if state.num_processes != world:
        raise CdmbenchError(f"WORLD_SIZE={world} but accelerate sees {state.num_processes} process(es); "
                            f"launch with `accelerate launch` or `torchrun`")
    return state.process_index, state.num_processes, state.wait_for_everyone, device if cpu else str(state.device)
