"""The scoring phase: one (source, steps) image set, read back from disk → one tidy row per metric.

A computed score is cached under ``OUT/cache/scores/``, keyed by run, steps, metric, options and a hash
of the exact image set (prompt ids, seeds, texts, metadata, pixel hashes, weights), so re-scoring a
finished eval only reads caches; rows already in the results file are not written twice. A metric is
built once per (metric, backbone) with the models that backbone declares (``Backbone.evaluators``), and
a metric that does not apply gives a "not_applicable: <reason>" row, a skipped plan "skipped: <reason>".
Teacher-fidelity metrics (``needs_teacher``) also get the teacher's images of the same items at the
backbone's reference steps (``teacher_reference``); a metric that has no meaningful value for the images
it saw raises ``MetricSkipped`` and gets a "skipped: <reason>" row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from cdmbench.errors import CdmbenchError
from cdmbench.eval.generate import image_relpath, is_cached, read_pngs
from cdmbench.eval.items import has_items, save_items
from cdmbench.eval.sources import TEACHER, Plan, TeacherSource
from cdmbench.io import read_json, write_json
from cdmbench.types import Prompt

RESULTS = "results.csv"
SCORE_BATCH = 64  # images per metric update; fixed so scores never depend on --batch-size


class Scorer:
    """Scores plans into rows of ``OUT/results.csv`` for the metrics ``names`` (registry names).

    Args:
        out: the eval folder (images, manifest, caches, results file).
        names: metrics to score, in row order.
        options: where the real scorers' weights live (``MetricOptions``); part of the cache key.
        sources: every row source of the eval (where teacher-fidelity metrics find the teacher's images).
    """

    def __init__(self, out: Path, names: list[str], options, sources: list = ()):
        from cdmbench.eval.results import read_results

        self.out, self.names, self.options, self.sources = out, names, options, list(sources)
        self.results = out / RESULTS
        self._built: dict[tuple[str, str], object] = {}
        self._have = ({row_key(r) for r in read_results(self.results).to_dict("records")}
                      if self.results.is_file() else set())

    def metric(self, name: str, arch: str):
        """The metric ``name`` for images of ``arch``, built once, reset for a new image set."""
        if (name, arch) not in self._built:
            from cdmbench.eval.metrics import build_metric

            self._built[(name, arch)] = build_metric(name, evaluators_for(arch), self.options)
        m = self._built[(name, arch)]
        m.reset()
        return m

    def write(self, rows: list[dict]) -> None:
        """Append the rows not yet in the results file (atomically)."""
        import pandas as pd

        from cdmbench.eval.results import RESULT_COLUMNS, append_rows, normalize

        frame = normalize(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)))
        new = [r for r in frame.to_dict("records") if row_key(r) not in self._have]
        if new:  # keyed: rows another eval appended meanwhile are not written twice
            append_rows(self.results, new, key=row_key)
            self._have.update(row_key(r) for r in new)

    def score(self, plan: Plan, items: list[tuple[Prompt, int]], records: dict) -> list[dict]:
        """One row per metric for the images of ``plan`` (``items`` = its (prompt, seed) samples)."""
        from cdmbench.eval.metrics import METRICS
        from cdmbench.eval.metrics.sets import MetricSkipped

        out, names = self.out, self.names
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if plan.skipped:
            return [row(plan, n, METRICS.get(n).higher_is_better, status=f"skipped: {plan.skipped}", timestamp=now)
                    for n in names]
        recs = [records.get(image_relpath(plan.run, plan.steps, p.id, s)) for p, s in items]
        missing = sum(not is_cached(r, plan, p, out) for r, (p, _) in zip(recs, items))
        if missing:
            raise CdmbenchError(f"{missing} of {len(items)} images of {plan.run} at {plan.steps} steps are missing "
                                f"from {out}; run the generation phase first (cdmbench eval does both)")
        image_set = hashlib.sha256(json.dumps(
            [[p.id, s, p.text, dict(p.meta), r["pixels_sha256"], r["checkpoint"]] for (p, s), r in zip(items, recs)],
            sort_keys=True).encode()).hexdigest()

        teacher_recs, no_teacher = teacher_reference(self.sources, plan, items, records)
        teacher_set = hashlib.sha256(json.dumps([r["pixels_sha256"] for r in teacher_recs or []]).encode()).hexdigest()
        rows, todo = {}, []
        for n in names:
            cls = METRICS.get(n)
            applies = cls.applies_to(evaluators_for(plan.arch))
            if not applies:
                rows[n] = row(plan, n, cls.higher_is_better, status=applies.status, timestamp=now)
                continue
            needs_teacher = getattr(cls, "needs_teacher", False)
            if needs_teacher and no_teacher:
                rows[n] = row(plan, n, cls.higher_is_better, status=f"skipped: {no_teacher}", timestamp=now)
                continue
            key = score_key(plan, n, image_set + (teacher_set if needs_teacher else ""), self.options)
            cached = out / "cache" / "scores" / f"{key}.json"
            if cached.is_file() and (has_items(out, plan.run, plan.steps, n) or not _keeps_items(cls)):
                rows[n] = row(plan, n, cls.higher_is_better, status="ok", **_read_score(cached))
            else:
                todo.append((n, cls, cached))
        if todo:
            built = [(n, cls, path, self.metric(n, plan.arch)) for n, cls, path in todo]
            for lo in range(0, len(items), SCORE_BATCH):
                images = read_pngs([out / r["path"] for r in recs[lo:lo + SCORE_BATCH]])
                teacher_images = None
                for n, cls, _, m in built:
                    m.update(images, [p for p, _ in items[lo:lo + SCORE_BATCH]])
                    if getattr(cls, "needs_teacher", False):
                        if teacher_images is None:
                            teacher_images = read_pngs([out / r["path"] for r in teacher_recs[lo:lo + SCORE_BATCH]])
                        m.update_teacher(teacher_images)
            for n, cls, path, m in built:
                try:
                    result = m.compute()
                except MetricSkipped as e:  # e.g. one seed per prompt for a diversity metric: a row, not a crash
                    rows[n] = row(plan, n, cls.higher_is_better, status=f"skipped: {e}", timestamp=now)
                    continue
                save_items(out, plan.run, plan.steps, m, result, [(p.id, s) for p, s in items], plan.checkpoint)
                ci_low, ci_high = result.interval()
                entry = {"value": float(result.value), "ci_low": ci_low, "ci_high": ci_high, "n": int(result.n),
                         "protocol": m.protocol, "timestamp": now}
                write_json(path, entry)  # atomic: a kill leaves no half entry
                rows[n] = row(plan, n, cls.higher_is_better, status="ok", **entry)
        return [rows[n] for n in names]


def _keeps_items(cls) -> bool:
    """Whether scoring keeps per-item data for this metric class (``cdmbench.eval.items``)."""
    return bool(getattr(cls, "per_image", False)) or hasattr(cls, "item_features")


def _read_score(path: Path) -> dict:
    """A cached score entry; a damaged one is one line naming the file (delete it to recompute)."""
    from cdmbench.errors import CorruptStateError

    entry = read_json(path, what="score cache entry", fix="delete it to compute the score again")
    keys = {"value", "ci_low", "ci_high", "n", "protocol", "timestamp"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise CorruptStateError(f"score cache entry {path} is incomplete; delete it to compute the score again")
    return entry


def teacher_reference(sources: list, plan: Plan, items, records: dict) -> tuple[list | None, str]:
    """Manifest records of the teacher's images for ``items`` at the backbone's reference steps and default CFG
    (what teacher-fidelity metrics compare a row with), or (None, why they are not available)."""
    from cdmbench.backbones import BACKBONES

    ref_steps = BACKBONES.get(plan.arch).default_teacher_steps
    teachers = [s for s in sources if isinstance(s, TeacherSource) and s.method == TEACHER and s.arch == plan.arch
                and s.guidance is None and ref_steps in s.steps]
    if not teachers:
        return None, f"no teacher rows at the reference {ref_steps} steps in this eval (keep --teacher and its default steps)"
    if plan.run == teachers[0].name and plan.steps == ref_steps:
        return None, "this is the teacher reference row itself"
    recs = [records.get(image_relpath(teachers[0].name, ref_steps, p.id, s)) for p, s in items]
    if any(r is None for r in recs):
        return None, f"the teacher's {ref_steps}-step images of these items are not generated"
    return recs, ""


def evaluators_for(arch: str):
    """What backbone ``arch`` declares its images are scored with (``Backbone.evaluators``)."""
    from cdmbench.backbones import BACKBONES

    return BACKBONES.get(arch).evaluators()


def row(plan: Plan, metric: str, higher_is_better: bool, *, status: str, timestamp: str, value: float = math.nan,
         ci_low: float = math.nan, ci_high: float = math.nan, n: int = 0, protocol: str = "") -> dict:
    from cdmbench.eval.results import TRAIN_COLUMNS

    train = dict(plan.train)
    return {
        **{c: train.get(c) for c in TRAIN_COLUMNS},
        "run": plan.row_run or plan.run, "method": plan.method, "arch": plan.arch, "steps": plan.steps, "metric": metric,
        "value": value, "ci_low": ci_low, "ci_high": ci_high, "n": n, "higher_is_better": higher_is_better,
        "protocol": protocol, "nfe": plan.nfe,
        "sigmas_nominal": json.dumps([round(s, 6) for s in plan.sigmas_nominal]),
        "sigmas_effective": json.dumps([round(s, 6) for s in plan.sigmas_effective]),
        "guidance": plan.guidance, "checkpoint": plan.checkpoint_label, "timestamp": timestamp, "status": status,
    }


def score_key(plan: Plan, metric: str, image_set: str, options) -> str:
    import cdmbench

    ident = {"run": plan.run, "steps": plan.steps, "metric": metric, "arch": plan.arch, "images": image_set,
             "options": dataclasses.asdict(options), "cdmbench": cdmbench.__version__}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def row_key(row: dict) -> tuple:
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
