"""Per-item scores kept by the scoring phase, so reports can resample items (``cdmbench.reports.stats``).

A result row holds one number per (run, steps, metric); intervals across training seeds and paired
comparisons need what is behind it, item by item (a sample's identity is (prompt id, seed)):

- a per-image metric (CLIP, attribute accuracy, ...) keeps its per-image scores (a metric with one value per
  prompt, e.g. a diversity metric, keeps those, with seed -1);
- a set-level metric keeps per-image features and its reference statistics, so the value can be recomputed
  on a resampled set (``item_features()`` and ``reference`` on the metric, as FID has): the statistic
  ``"frechet"`` is the Fréchet distance of the features' Gaussian to the reference.

Layout under the eval folder ``OUT``, each file written atomically::

    OUT/items/<run>/<steps>/<metric>.npz    prompt_id, seed, values (n,) | features (n, F), statistic,
                                            reference (file name), checkpoint (weights hash), protocol
    OUT/items/refs/<sha256>.npz             mu, sigma of a set-level metric's reference (shared)
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdmbench.errors import CdmbenchError
from cdmbench.io import atomic_path

ITEMS = "items"
STATISTICS = ("mean", "frechet")


def items_path(out: str | Path, run: str, steps: int, metric: str) -> Path:
    return Path(out) / ITEMS / run / str(steps) / f"{metric}.npz"


@dataclass(frozen=True)
class ItemScores:
    """What ``load_items`` returns; ``data`` rows follow ``items``."""

    items: tuple[tuple[str, int], ...]
    data: np.ndarray  # (n,) scores or (n, F) features
    statistic: str  # "mean" | "frechet"
    checkpoint: str
    protocol: str
    reference: tuple[np.ndarray, np.ndarray] | None = None  # (mu, sigma) for "frechet"


def _savez(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def save_items(out: str | Path, run: str, steps: int, metric, result, items: list[tuple[str, int]],
               checkpoint: str) -> Path | None:
    """Keep ``metric``'s per-item data of one scored image set; None when the metric has none to keep.

    Args:
        out: the eval folder.
        run, steps: the image set (``Plan.run``, ``Plan.steps``).
        metric: the metric instance after ``compute`` (set-level ones expose ``item_features()`` and
            ``reference`` with ``mu``/``sigma``).
        result: its ``MetricResult``.
        items: (prompt id, seed) of every scored image, in scoring order.
        checkpoint: the weights hash of the image set (so a later report can check it matches the row).
    """
    ids = np.array([p for p, _ in items], dtype=str)
    seeds = np.array([s for _, s in items], dtype=np.int64)
    common = dict(prompt_id=ids, seed=seeds, checkpoint=np.array(checkpoint), protocol=np.array(metric.protocol))
    path = items_path(out, run, steps, metric.name)
    if result.per_image is not None:
        values = np.asarray(result.per_image, dtype=np.float64).reshape(-1)
        prompts = list(dict.fromkeys(p for p, _ in items))
        if values.shape[0] == len(prompts) != len(items):  # one value per prompt (a diversity metric)
            common.update(prompt_id=np.array(prompts, dtype=str), seed=np.full(len(prompts), -1, dtype=np.int64))
        elif values.shape[0] != len(items):
            return None  # no item identity to attach: the report uses the row
        _savez(path, values=values, statistic=np.array("mean"), **common)
        return path
    features_of = getattr(metric, "item_features", None)
    reference = getattr(metric, "reference", None)
    if features_of is None or reference is None:
        return None
    feats = np.asarray(features_of(), dtype=np.float64)
    if feats.shape[0] != len(items):
        raise CdmbenchError(f"{metric.name}: {feats.shape[0]} feature rows for {len(items)} items")
    mu, sigma = np.asarray(reference.mu, np.float64), np.asarray(reference.sigma, np.float64)
    digest = hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()
    ref = Path(out) / ITEMS / "refs" / f"{digest}.npz"
    if not ref.is_file():
        _savez(ref, mu=mu, sigma=sigma)
    _savez(path, features=feats, statistic=np.array("frechet"), reference=np.array(ref.name), **common)
    return path


def has_items(out: str | Path, run: str, steps: int, metric: str) -> bool:
    return items_path(out, run, steps, metric).is_file()


def load_items(out: str | Path, run: str, steps: int, metric: str) -> ItemScores | None:
    """The kept per-item data of an image set, or None when there is none (an older eval folder)."""
    path = items_path(out, run, steps, metric)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        items = tuple(zip(z["prompt_id"].tolist(), z["seed"].tolist()))
        statistic = str(z["statistic"])
        if statistic not in STATISTICS:
            raise CdmbenchError(f"{path}: unknown statistic {statistic!r}; known: {', '.join(STATISTICS)}")
        reference = None
        if statistic == "frechet":
            ref_path = Path(out) / ITEMS / "refs" / str(z["reference"])
            with np.load(ref_path, allow_pickle=False) as r:
                reference = (r["mu"], r["sigma"])
            data = z["features"]
        else:
            data = z["values"]
        return ItemScores(items, np.asarray(data, np.float64), statistic, str(z["checkpoint"]), str(z["protocol"]),
                          reference)
