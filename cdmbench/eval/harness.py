"""The eval harness: every trained run (and the teacher) × step count → images → one tidy row per metric.

Two resumable phases with caches (style.md principle 8; baselines.md §D.2); this file resolves the config
and runs them, one backbone alive at a time: ``generate`` writes PNGs plus ``manifest.jsonl``
(``cdmbench.eval.generate``), shardable by (prompt, seed) index across processes, from the row sources of
``cdmbench.eval.sources`` (trained runs through ``Method.sample``, the teacher at its own step counts with
CFG, external pipelines); ``score`` reads them back and appends one row per metric to ``results.csv``
(``cdmbench.eval.scoring``). A step count a method cannot sample gives a "skipped: <reason>" row, a metric
that does not apply to the backbone a "not_applicable: <reason>" row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cdmbench.backbones.base import BackboneOptions
from cdmbench.errors import CdmbenchError, UnknownNameError
from cdmbench.eval.generate import MANIFEST, Manifest, OnImage, generate_source, process_share, shard
from cdmbench.eval.scoring import RESULTS, Scorer
from cdmbench.eval.sources import FileHashes, Plan, resolve_sources
from cdmbench.io import write_json
from cdmbench.paths import (MAX_BATCH, MAX_INT, MAX_PROMPTS, MAX_SEEDS, MAX_STEPS, check_count, check_device,
                            check_int_tuple, check_name, check_name_tuple)
from cdmbench.types import Prompt

CHECKPOINT_MODES = ("latest", "all")


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
        device: torch device for generation and scoring; None = accelerate's device (``cdmbench.accel.select_device``:
            the accelerator when there is one, each process's own under ``accelerate launch``).
        progress: show progress bars and notes.
        checkpoints: "latest" (each run's latest checkpoint) or "all" (every kept checkpoint, EMA weights: a
            learning curve; rows carry the checkpoint's iteration and cumulative compute).
        metric_options: scorer weights and references (``MetricOptions``; its device is ``device``); None = each
            metric's environment variable, else its documented default.
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
    device: str | None = None
    progress: bool = True
    checkpoints: str = "latest"
    metric_options: Any = None  # cdmbench.eval.metrics.MetricOptions | None (imported lazily)

    def __post_init__(self):
        if self.checkpoints not in CHECKPOINT_MODES:
            raise CdmbenchError(f"checkpoints: expected one of {', '.join(CHECKPOINT_MODES)}, got {self.checkpoints!r}")
        check_int_tuple("steps", self.steps, minimum=1)
        if self.teacher_steps is not None:
            check_int_tuple("teacher_steps", self.teacher_steps, minimum=1)
        check_int_tuple("seeds", self.seeds, minimum=0)
        if not str(self.workspace).strip():
            raise CdmbenchError("workspace: empty path")
        if self.runs is not None:
            check_name_tuple("runs", self.runs)
        if self.metrics is not None:
            from cdmbench.eval.metrics import METRICS

            check_name_tuple("metrics", self.metrics)
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
            check_name(name.strip(), "external NAME")  # it becomes a folder under images/
        for r in self.runs or ():
            check_name(r, "runs")
        check_count(self.num_prompts, "num_prompts", maximum=MAX_PROMPTS)
        check_count(self.batch_size, "batch_size", maximum=MAX_BATCH)
        if max(self.steps) > MAX_STEPS or max(self.teacher_steps or (1,)) > MAX_STEPS:
            raise CdmbenchError(f"steps: at most {MAX_STEPS} sampler steps")
        if len(self.seeds) > MAX_SEEDS or max(self.seeds) > MAX_INT:
            raise CdmbenchError(f"seeds: at most {MAX_SEEDS} seeds, each <= {MAX_INT}")
        if self.device is not None:
            check_device(self.device, "device")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.workspace) / "eval"


# --------------------------------------------------------------------------------------------------
# The resolved config: sources grouped by backbone, prompts per arch, caches


class _Eval:
    """A resolved ``EvalConfig``: row sources grouped by backbone, prompts per arch, caches."""

    def __init__(self, cfg: EvalConfig):
        if cfg.device is None:
            from cdmbench.accel import select_device

            cfg = dataclasses.replace(cfg, device=select_device(None))
        self.cfg, self.out = cfg, cfg.out_dir
        self._console = None
        self.sources: list = resolve_sources(cfg, self.note)
        if (self.out / RESULTS).is_file():  # a damaged results file is one line before anything is generated
            from cdmbench.eval.results import read_results

            read_results(self.out / RESULTS)
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
# The phases


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
    shard([], process_index, num_processes)  # validate the split
    written = 0
    with _progress(ev.cfg.progress) as bar:
        for source, backbone, sampler, plans in ev.walk(with_sampler=True):
            mine = shard(ev.items(source.arch), process_index, num_processes)
            written += generate_source(sampler, plans, backbone, mine, ev.out, ev.manifest,
                                       batch_size=ev.cfg.batch_size, process_index=process_index,
                                       on_image=on_image, progress=bar, lock_name=f"{process_index}of{num_processes}")
            del sampler  # free the student before the next source builds its own
    return written


def score(cfg: EvalConfig, *, process_index: int = 0, num_processes: int = 1) -> Path:
    """Score every (source, steps) image set with every selected metric; returns the results file.

    Reads the PNGs ``generate`` wrote (missing images are an error); this process scores every
    ``num_processes``-th image set (keyed, locked appends: processes may share one eval folder)."""
    shard([], process_index, num_processes)  # validate the split
    return _score(_Eval(cfg), process_index, num_processes)


def _score(ev: _Eval, process_index: int = 0, num_processes: int = 1) -> Path:
    from cdmbench.eval.metrics import METRICS, MetricOptions

    options = dataclasses.replace(ev.cfg.metric_options or MetricOptions(), device=ev.cfg.device)
    scorer = Scorer(ev.out, list(ev.cfg.metrics or METRICS.names()), options, ev.sources)
    records = ev.manifest.read()
    with _progress(ev.cfg.progress) as bar:
        mine = shard([p for _, _, _, ps in ev.walk(with_sampler=False) for p in ps], process_index, num_processes)
        task = bar.add_task("score", total=len(mine))
        for plan in mine:
            scorer.write(scorer.score(plan, ev.items(plan.arch), records))
            bar.advance(task)
    return scorer.results


def run_eval(cfg: EvalConfig, *, on_image: OnImage | None = None) -> Path:
    """Generate (this process's share, under ``accelerate launch``) then score on the main process.

    Returns the results file (``OUT/results.csv``). Under a multi-process launch the other processes
    return once every share is generated, without waiting for the scores (no collective runs after that).
    """
    index, count, barrier, device = process_share(cfg.device)
    ev = _Eval(dataclasses.replace(cfg, device=device))
    _generate(ev, index, count, on_image)
    ev.release()
    barrier()
    if index != 0:
        return ev.out / RESULTS
    # the protocol a report's header names (prompt set, seeds); rewritten by every eval into this folder
    write_json(ev.out / "eval_config.json", {**dataclasses.asdict(ev.cfg), "num_prompts_used": {
        arch: len(p) for arch, p in ev.prompts.items()}})
    return _score(ev)
