"""``cdmbench bench``: train every method at its default budget on one backbone, evaluate, report.

Each method trains into ``WORKSPACE/runs/<method>-<arch>`` with ``resolve_config(method, arch)`` (the
method's preset for the arch, no overrides). A finished run (``done.json``) is kept as it is, an
unfinished one resumes from its latest checkpoint, so a killed bench picks up where it stopped. The eval
(``WORKSPACE/eval/bench-<arch>``) and the report are cached and rebuilt the same way.
"""

from __future__ import annotations

import shlex
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from cdmbench.errors import CdmbenchError

VERSIONED = ("cdmbench", "torch", "diffusers", "transformers")


def run_bench(
    arch: str,
    methods: list[str] | None,
    steps: list[int],
    workspace: Path,
    out: Path,
    seeds: list[int],
    argv: list[str],
    *,
    num_prompts: int | None = None,
    teacher_steps: tuple[int, ...] | None = None,
    metrics: tuple[str, ...] | None = None,
    progress: bool = True,
) -> Path:
    """Train (or keep/resume) one run per method, evaluate them with the teacher, write the report.

    Args:
        arch: registered backbone name.
        methods: method names; None = every registered method.
        steps: student step counts to evaluate.
        workspace: holds runs/ and eval/.
        out: report folder.
        seeds: seeds per prompt.
        argv: the command line, shown in the report header.
        num_prompts, teacher_steps, metrics: narrow the eval (``EvalConfig`` fields); None = its defaults.
        progress: progress bars.

    Returns:
        The path of report.md.
    """
    from cdmbench.backbones import BACKBONES
    from cdmbench.eval.harness import EvalConfig, run_eval
    from cdmbench.methods import METHODS
    from cdmbench.reports import build_report

    BACKBONES.get(arch)
    names = list(methods) if methods else METHODS.names()
    for name in names:
        METHODS.get(name)  # unknown names fail before any training
    workspace, out = Path(workspace), Path(out)
    cfg = EvalConfig(workspace=str(workspace), steps=tuple(steps), runs=tuple(f"{n}-{arch}" for n in names),
                     seeds=tuple(seeds), out=str(workspace / "eval" / f"bench-{arch}"), arch=arch,
                     num_prompts=num_prompts, teacher_steps=teacher_steps, metrics=metrics, progress=progress)
    started = time.time()
    trained = {name: train_or_keep(name, arch, workspace / "runs" / f"{name}-{arch}", progress) for name in names}
    t_eval = time.time()
    results = run_eval(cfg)
    eval_minutes = (time.time() - t_eval) / 60
    header = {
        "command": shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else "(unknown)",
        "versions": ", ".join(f"{p} {_version(p)}" for p in VERSIONED),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "train minutes": ", ".join(f"{n} {m}" for n, m in trained.items()),
        "global batch (processes × batch × accumulation), learning rates": "; ".join(
            f"{n} {as_run_summary(workspace / 'runs' / f'{n}-{arch}')}" for n in names),
        "eval minutes": f"{eval_minutes:.1f}",
        "wall minutes": f"{(time.time() - started) / 60:.1f} (this invocation)",
        "eval": f"steps {', '.join(map(str, steps))}; seeds {', '.join(map(str, seeds))}; device {cfg.device}",
    }
    return build_report(results, out, images_root=cfg.out_dir, title=f"cdmbench bench: {arch}", header=header)


def train_or_keep(method: str, arch: str, run_dir: Path, progress: bool = True) -> str:
    """Train ``method`` on ``arch`` at its default budget into ``run_dir`` unless it is finished already;
    returns its train minutes for the report (from done.json)."""
    from cdmbench.checkpoint import latest_checkpoint
    from cdmbench.io import read_json
    from cdmbench.train import resolve_config, train

    cfg = resolve_config(method, arch)
    done = run_dir / "done.json"
    note = ""
    if done.is_file():
        saved = read_json(run_dir / "config.json")
        want = cfg.to_dict()
        if saved["method_config"] != want["method_config"] or saved["train"] != want["train"]:
            note = " (kept; not the default budget)"
    else:
        resume = latest_checkpoint(run_dir) is not None
        if not resume and run_dir.exists():
            if not (run_dir / "config.json").is_file():
                raise CdmbenchError(f"{run_dir} exists but is not a run folder (no config.json); move it away")
            shutil.rmtree(run_dir)  # a run killed before its first checkpoint: nothing to resume, start over
        train(cfg, run_dir, resume=resume, progress=progress)
        note = " (resumed)" if resume else ""
    minutes = read_json(done).get("train_minutes")
    return f"{minutes:.1f}{note}" if isinstance(minutes, (int, float)) else f"?{note}"


def as_run_summary(run_dir: Path) -> str:
    """'128 (8 × 16 × 1), lr student 1e-05 / fake_score 5e-06' from a run's recorded ``as_run`` (``config.json``)."""
    from cdmbench.io import read_json

    rec = read_json(Path(run_dir) / "config.json").get("as_run")
    if not rec:
        return "? (run recorded before cdmbench recorded it)"
    lrs = " / ".join(f"{k} {v:g}" for k, v in sorted(rec["learning_rates"].items(), key=lambda kv: kv[0] != "student"))
    return f"{rec['global_batch']} ({rec['world_size']} × {rec['batch_per_process']} × {rec['grad_accum']}), lr {lrs}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
