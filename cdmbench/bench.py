"""``cdmbench bench``: train every method on one backbone (at its default or at a matched budget), evaluate, report.

Runs: one per (method, training seed) in ``WORKSPACE/runs/<method>-<arch>-s<seed>``, with
``resolve_config(method, arch)`` (the method's preset for the arch) plus ``train.seed`` and the bench's
checkpoint cadence (4 checkpoints kept per run, for the learning curves). A method whose student is
trained for one step count (``Method.steps_field``, e.g. CD's phases) gets one run per evaluated step
count, ``<method>-<arch>-<field><steps>-s<seed>``; the report shows them as one row. A finished run
(``done.json``) is kept as it is, an unfinished one resumes from its latest checkpoint, so a killed bench
picks up where it stopped. The eval (``WORKSPACE/eval/bench-<arch>``, or ``bench-<arch>-<budget>tf`` at a matched
budget) and the report are cached and rebuilt the same way.

Budgets: by default every method trains at its own preset budget (iterations), so costs differ by method.
With ``reference`` (or ``budget_tflops``) every method gets the same training compute, counted by the loop
(TFLOPs): ``budget_tflops``, or the mean compute of the ``reference`` method's runs at its preset budget
(trained first, under their usual names). Every other run trains from scratch until its counted compute
reaches the budget (it stops within one iteration of it; ``train.steps`` is raised tenfold so the budget,
not the iteration count, ends it) into ``<run>-<budget>tf``, with a checkpoint each time it crosses a quarter
of the budget (the learning-curve points at equal compute). A bench at each budget is its own eval folder
and report; runs of the same seed are the same up to a budget (same seed, data order and RNG states).

Learning curves: the runs of the first training seed are scored at every kept checkpoint (``curve_checkpoints``
are kept per run); every other run at its latest, which is what the tables use. The curves cost a quarter
of the eval they would cost on every seed, and the plots say which seed they show.

``jobs``: independent runs train in that many worker processes at once, and the eval's generation is split
over as many (the harness's ``process_index``/``num_processes`` shares of one eval folder); each worker gets
``cpu_count // jobs`` intra-op threads. On a CPU a small network does not scale over threads (a toy run
took 32.5 s on one thread and 30.2 s on two), so two single-thread workers nearly halve the bench. Runs
are seeded per run and the eval per sample, so the results do not depend on ``jobs`` beyond the float
rounding of a kernel's thread count. Use 1 on one GPU.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from cdmbench.errors import CdmbenchError, UnknownNameError

CURVE_CHECKPOINTS = 4  # checkpoints kept per bench run (learning curves)
BUDGET_STEPS_FACTOR = 10  # a run stopped by its compute budget may run this many times its preset iterations


@dataclass(frozen=True)
class BenchRun:
    """One training run of the bench."""

    name: str
    method: str
    seed: int
    overrides: tuple[tuple[str, str], ...]


def bench_runs(arch: str, names: list[str], steps: list[int], train_seeds: list[int],
               overrides: dict[str, str] | None = None) -> list[BenchRun]:
    """Every run the bench trains, seed-major within each method."""
    from cdmbench.methods import METHODS

    runs = []
    for name in names:
        cls = METHODS.get(name)
        variants = [((), "")]
        if cls.steps_field:
            variants = [(((cls.steps_field, str(s)),), f"-{cls.steps_field}{s}") for s in steps]
        for seed in train_seeds:
            for extra, tag in variants:
                over = {**(overrides or {}), **dict(extra), "train.seed": str(seed)}
                runs.append(BenchRun(f"{name}-{arch}{tag}-s{seed}", name, seed, tuple(sorted(over.items()))))
    return runs


def bench_config(run: BenchRun, arch: str, curve_checkpoints: int = CURVE_CHECKPOINTS):
    """The run's resolved config: preset × overrides, ``curve_checkpoints`` evenly spaced checkpoints kept."""
    from cdmbench.run import resolve_config

    if not isinstance(curve_checkpoints, int) or curve_checkpoints < 1:
        raise CdmbenchError(f"curve_checkpoints must be a positive integer, got {curve_checkpoints!r}")
    over = dict(run.overrides)
    cfg = resolve_config(run.method, arch, over)
    if "train.checkpoint_every" not in over:
        over["train.checkpoint_every"] = str(max(1, math.ceil(cfg.train.steps / curve_checkpoints)))
    over.setdefault("train.keep_checkpoints", str(curve_checkpoints))
    return resolve_config(run.method, arch, over)


def budget_config(run: BenchRun, arch: str, budget: float, curve_checkpoints: int = CURVE_CHECKPOINTS):
    """The run's config trained to ``budget`` TFLOPs: stopped by the budget (``train.steps`` raised
    ``BUDGET_STEPS_FACTOR``-fold), a checkpoint each ``budget / curve_checkpoints`` TFLOPs, that many kept."""
    from cdmbench.paths import MAX_TRAIN_STEPS
    from cdmbench.run import resolve_config

    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise CdmbenchError(f"budget_tflops must be a positive number, got {budget!r}")
    over = dict(run.overrides)
    steps = min(MAX_TRAIN_STEPS, BUDGET_STEPS_FACTOR * resolve_config(run.method, arch, over).train.steps)
    over.setdefault("train.steps", str(steps))
    over.setdefault("train.checkpoint_every", over["train.steps"])  # the compute cadence sets the curve points
    over.update({"train.budget_tflops": repr(float(budget)),
                 "train.checkpoint_every_tflops": repr(float(budget) / curve_checkpoints)})
    over.setdefault("train.keep_checkpoints", str(curve_checkpoints))
    return resolve_config(run.method, arch, over)


def budget_tag(budget: float) -> str:
    """The run-name suffix of a budget: '3.39tf'."""
    return f"{budget:.3g}tf"


def run_bench(
    arch: str,
    methods: list[str] | None,
    steps: list[int],
    workspace: Path,
    out: Path,
    seeds: list[int],
    argv: list[str],
    *,
    train_seeds: list[int] = (0,),
    reference: str | None = None,
    budget_tflops: float | None = None,
    overrides: dict[str, str] | None = None,
    curve_checkpoints: int = CURVE_CHECKPOINTS,
    num_prompts: int | None = None,
    teacher_steps: tuple[int, ...] | None = None,
    metrics: tuple[str, ...] | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> Path:
    """Train (or keep/resume) every run, evaluate it with the teacher (the first training seed at every kept
    checkpoint), write the report.

    Args:
        arch: registered backbone name.
        methods: method names; None = every registered method.
        steps: student step counts to evaluate.
        workspace: holds runs/ and eval/.
        out: report folder.
        seeds: eval seeds per prompt.
        argv: the command line, shown in the report header.
        train_seeds: training seeds (one run per method and seed).
        reference: matched compute: the method whose preset-budget compute (mean over its runs) is every
            method's budget (the module docstring); None with ``budget_tflops`` None = preset budgets.
        budget_tflops: matched compute at this budget (instead of ``reference``).
        overrides: ``--set`` overrides applied to every run (e.g. ``train.steps=40`` for a quick bench).
        curve_checkpoints: checkpoints kept per run (the learning curve's points).
        num_prompts, teacher_steps, metrics: narrow the eval (``EvalConfig`` fields); None = its defaults.
        progress: progress bars.
        jobs: worker processes for training and generation (see the module docstring); 1 = in this process.

    Returns:
        The path of report.md.
    """
    from cdmbench.accel import select_device
    from cdmbench.backbones import BACKBONES
    from cdmbench.eval.harness import EvalConfig
    from cdmbench.methods import METHODS
    from cdmbench.reports import build_report

    BACKBONES.get(arch)
    names = list(methods) if methods else METHODS.names()
    for name in names:
        METHODS.get(name)  # unknown names fail before any training
    if not isinstance(jobs, int) or not 1 <= jobs <= 64:
        raise CdmbenchError(f"jobs: expected an integer in [1, 64], got {jobs!r}")
    if not train_seeds or len(set(train_seeds)) != len(train_seeds) or min(train_seeds) < 0:
        raise CdmbenchError(f"train_seeds: expected distinct integers >= 0, got {list(train_seeds)}")
    _check_budget(reference, budget_tflops, names)
    runs = bench_runs(arch, names, list(steps), list(train_seeds), overrides)
    matched = reference is not None or budget_tflops is not None
    fixed = [r for r in runs if not matched or r.method == reference]
    budgeted = [r for r in runs if r not in fixed]
    configs = {r.name: bench_config(r, arch, curve_checkpoints) for r in fixed}  # bad overrides fail before any training
    for r in budgeted:
        budget_config(r, arch, budget_tflops or 1.0, curve_checkpoints)
    workspace, out = Path(workspace), Path(out)
    started = time.time()
    trained = _train_all(fixed, configs, workspace, progress, jobs)
    budget, protocol = None, "every method at its default budget (iterations)"
    if budgeted:
        budget = budget_tflops if budget_tflops is not None else _mean_tflops(fixed, workspace)
        budgeted = [replace(r, name=f"{r.name}-{budget_tag(budget)}") for r in budgeted]
        configs.update({r.name: budget_config(r, arch, budget, curve_checkpoints) for r in budgeted})
        trained.update(_train_all(budgeted, configs, workspace, progress, jobs))
        protocol = (f"matched compute: every method trained to **{budget:.3g} TFLOPs** (counted by the loop), "
                    + (f"the mean of **{reference}** at its default budget; " if reference else "")
                    + "each run stops within one iteration of it (main table)")
    runs = fixed + budgeted
    t_eval = time.time()
    out_name = f"bench-{arch}" + (f"-{budget_tag(budget)}" if budget is not None else "")
    cfg = EvalConfig(workspace=str(workspace), steps=tuple(steps), runs=tuple(r.name for r in runs),
                     seeds=tuple(seeds), out=str(workspace / "eval" / out_name), arch=arch,
                     num_prompts=num_prompts, teacher_steps=teacher_steps, metrics=metrics, progress=progress)
    images_before = _manifest_rows(Path(cfg.out_dir))
    curve_runs = tuple(r.name for r in runs if r.seed == train_seeds[0])
    eval_in_workers(replace(cfg, runs=curve_runs, checkpoints="all"), jobs)  # the learning curves
    results = eval_in_workers(cfg, jobs)  # every run's latest checkpoint: the tables
    eval_minutes = (time.time() - t_eval) / 60
    per_method: dict[str, list[float]] = {}
    iterations: dict[str, list[int]] = {}
    for r in runs:
        per_method.setdefault(r.method, []).append(trained[r.name][0])
        iterations.setdefault(r.method, []).append(_iterations(workspace / "runs" / r.name))
    kept = [n for n, (_, how) in trained.items() if how]
    header = {
        "training budget": protocol,
        "iterations (mean per run)": ", ".join(f"{m} {sum(v) / len(v):.0f}" for m, v in iterations.items()),
        "train minutes (mean per run)": ", ".join(f"{m} {sum(v) / len(v):.1f}" for m, v in per_method.items()),
        "runs": f"{len(runs)} ({len(kept)} kept or resumed: {', '.join(kept)})" if kept else str(len(runs)),
        "global batch (processes × batch × accumulation), learning rates": "; ".join(
            f"{m} {as_run_summary(workspace / 'runs' / next(r.name for r in runs if r.method == m))}"
            for m in per_method),
        "eval minutes": f"{eval_minutes:.1f}",
        # read when the report's text is rendered: its aggregates, bootstraps, plots and grid are counted
        "wall minutes": lambda: bench_log(Path(cfg.out_dir), started, [
            n for n, (_, how) in trained.items() if how != "kept" and not how.startswith("kept;")],
            _manifest_rows(Path(cfg.out_dir)) - images_before),
        "eval": (f"steps {', '.join(map(str, steps))}; each run's latest checkpoint (EMA) in the tables, every kept "
                 f"checkpoint of training seed {train_seeds[0]} in the learning curves; "
                 f"device {select_device(cfg.device)}"),
    }
    if overrides:
        header["overrides"] = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return build_report(results, out, images_root=cfg.out_dir, title=f"cdmbench bench: {arch}", header=header,
                        argv=argv)


def _check_budget(reference, budget_tflops, names: list[str]) -> None:
    """At most one of ``reference`` / ``budget_tflops``, each valid (one line naming the option otherwise)."""
    if reference is not None and budget_tflops is not None:
        raise CdmbenchError("--reference and --budget-tflops both set the matched budget; give one")
    if reference is not None and reference not in names:
        raise UnknownNameError(f"--reference: {reference!r} is not a benched method; valid: {', '.join(names)}")
    if budget_tflops is not None and not (isinstance(budget_tflops, (int, float)) and math.isfinite(budget_tflops)
                                          and budget_tflops > 0):
        raise CdmbenchError(f"--budget-tflops: expected a positive number of TFLOPs, got {budget_tflops!r}")


def _train_all(runs: list[BenchRun], configs: dict, workspace: Path, progress: bool, jobs: int) -> dict:
    """Run name → (train minutes, how) for every run (trained, resumed or kept), in ``jobs`` workers."""
    return dict(zip([r.name for r in runs], in_workers(
        train_or_keep, [(configs[r.name], workspace / "runs" / r.name, progress and jobs == 1) for r in runs], jobs)))


def _mean_tflops(runs: list[BenchRun], workspace: Path) -> float:
    values = [run_tflops(workspace / "runs" / r.name) for r in runs]
    return sum(values) / len(values)


def _iterations(run_dir: Path) -> int:
    """The iterations a finished run trained (its done.json)."""
    from cdmbench.io import read_json

    return int(read_json(run_dir / "done.json").get("steps", 0))


def bench_log(eval_dir: Path, started: float, trained: list[str], images: int) -> str:
    """Append this invocation (start, end, minutes, runs trained, images generated) to the eval folder's
    ``bench_log.jsonl``; returns the header's "X (this invocation), Y (all N invocations ...)"."""
    import json
    from datetime import datetime, timezone

    from cdmbench.io import write_text
    from cdmbench.reports.markdown import BENCH_LOG, bench_wall_minutes

    ended = time.time()
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    line = json.dumps({"start": iso(started), "end": iso(ended), "minutes": round((ended - started) / 60, 3),
                       "runs_trained": trained, "images_generated": images})
    path = eval_dir / BENCH_LOG
    old = path.read_text() if path.is_file() else ""  # one bench per workspace at a time (it owns the runs)
    write_text(path, old + ("" if not old or old.endswith("\n") else "\n") + line + "\n")
    total, count = bench_wall_minutes(eval_dir)
    return (f"{(ended - started) / 60:.1f} (this invocation), {total:.1f} (all {count} invocations into this "
            "workspace; each up to its report's text)")


def _manifest_rows(eval_dir: Path) -> int:
    path = eval_dir / "manifest.jsonl"
    return sum(1 for line in path.open() if line.strip()) if path.is_file() else 0


def train_or_keep(cfg, run_dir: Path, progress: bool = True) -> tuple[float, str]:
    """Train ``cfg`` into ``run_dir`` unless it is finished already; returns (train minutes, "" | "kept" |
    "resumed" | "kept; not this config")."""
    from cdmbench.checkpoint import latest_checkpoint
    from cdmbench.io import read_json
    from cdmbench.train import train

    done = run_dir / "done.json"
    how = ""
    if done.is_file():
        saved = read_json(run_dir / "config.json", what="run config")
        want = cfg.to_dict()
        how = "kept"
        if not isinstance(saved, dict) or (saved.get("method_config"), saved.get("train")) != (want["method_config"], want["train"]):
            how = "kept; not this config"
    else:
        resume = latest_checkpoint(run_dir) is not None
        if not resume and run_dir.exists():
            if not (run_dir / "config.json").is_file():
                raise CdmbenchError(f"{run_dir} exists but is not a run folder (no config.json); move it away")
            shutil.rmtree(run_dir)  # a run killed before its first checkpoint: nothing to resume, start over
        train(cfg, run_dir, resume=resume, progress=progress)
        how = "resumed" if resume else ""
    marker = read_json(done, what="finished marker")
    minutes = marker.get("train_minutes") if isinstance(marker, dict) else None
    return (float(minutes) if isinstance(minutes, (int, float)) else float("nan")), how


def run_tflops(run_dir: Path) -> float:
    """Counted training TFLOPs of a finished run (its done.json)."""
    from cdmbench.io import read_json

    c = (read_json(run_dir / "done.json").get("compute") or {}).get("train_tflops")
    if c is None:
        raise CdmbenchError(f"{run_dir}: no compute record in done.json (trained before compute accounting); "
                            f"retrain it to match compute")
    return float(c)


def _worker_init(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def in_workers(fn, calls: list[tuple], jobs: int) -> list:
    """``[fn(*c) for c in calls]``, in ``jobs`` spawned worker processes when ``jobs > 1`` (results in order;
    the first failure is raised here once the others have finished)."""
    if jobs == 1 or len(calls) <= 1:
        return [fn(*c) for c in calls]
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=min(jobs, len(calls)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *c) for c in calls]
        return [f.result() for f in futures]


def _eval_share(phase: str, cfg, index: int, count: int) -> None:
    """This worker's share of one eval phase: its (prompt, seed) items ("generate") or its image sets ("score")."""
    from cdmbench.eval.harness import generate, score

    if phase == "generate":
        generate(cfg, process_index=index, num_processes=count)
    else:
        score(cfg, process_index=index, num_processes=count)


def eval_in_workers(cfg, jobs: int) -> Path:
    """``run_eval(cfg)``, its generation and then its scoring first split over ``jobs`` worker processes
    (one eval folder, keyed appends)."""
    import dataclasses

    from cdmbench.eval.harness import run_eval

    if jobs > 1:
        quiet = dataclasses.replace(cfg, progress=False)
        for phase in ("generate", "score"):  # every image exists before any worker scores
            in_workers(_eval_share, [(phase, quiet, i, jobs) for i in range(jobs)], jobs)
    return run_eval(cfg)  # with jobs > 1 everything is cached now: this only checks and collects


def as_run_summary(run_dir: Path) -> str:
    """'128 (8 × 16 × 1), lr student 1e-05 / fake_score 5e-06' from a run's recorded ``as_run`` (``config.json``)."""
    from cdmbench.io import read_json

    rec = read_json(Path(run_dir) / "config.json").get("as_run")
    if not rec:
        return "? (run recorded before cdmbench recorded it)"
    lrs = " / ".join(f"{k} {v:g}" for k, v in sorted(rec["learning_rates"].items(), key=lambda kv: kv[0] != "student"))
    return f"{rec['global_batch']} ({rec['world_size']} × {rec['batch_per_process']} × {rec['grad_accum']}), lr {lrs}"

