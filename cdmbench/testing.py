"""Contract checks a plug-in author runs against their own metric or backbone.

The built-ins run the same checks, parametrized from the registries (``tests/test_metrics_contract.py``,
``tests/test_backbones_contract.py``; style.md principle 11), so a new metric or backbone needs no test
edit: give it a ``tiny(workdir)`` class method that builds a small instance without downloads, and::

    from cdmbench.testing import BACKBONE_CHECKS, METRIC_CHECKS

    for check in METRIC_CHECKS:
        check(lambda: MyMetric.tiny(tmp_path))
    backbone = MyBackbone.tiny(tmp_path)
    for check in BACKBONE_CHECKS:
        check(backbone)

``registered(REGISTRY, name, obj)`` registers a plug-in for the duration of a ``with`` block (a test).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from cdmbench.errors import CdmbenchError
from cdmbench.types import ATTRS, Evaluators, Prompt

__all__ = [
    "BACKBONE_CHECKS", "METRIC_CHECKS", "CONTRACT_CAPTIONS", "contract_images", "contract_prompts", "registered",
]

# Captions any text encoder accepts; the toy's grammar, so a backbone may attach its own metadata to them.
CONTRACT_CAPTIONS = (
    "a small red circle in the top left", "a large blue square in the bottom right", "a green triangle",
    "a small yellow circle in the top right", "red", "a large green square in the bottom left",
    "a small blue triangle in the top left", "a yellow square",
)


@contextmanager
def registered(registry, name: str, obj) -> Iterator[object]:
    """``registry.register(name)(obj)`` inside the block, removed again after it (run-time plug-ins in tests)."""
    if name in registry:
        raise CdmbenchError(f"{registry.kind} {name!r} is already registered")
    registry.register(name)(obj)
    try:
        yield obj
    finally:
        registry._entries.pop(name, None)


# --------------------------------------------------------------------------------------------------
# Metrics: factory() -> a fresh instance (e.g. ``lambda: MyMetric.tiny(tmp_path)``)


def contract_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) float images in [0, 1]: a shared base plus per-image variation."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size, size, generator=g)
    return (base + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def contract_prompts(n: int) -> list[Prompt]:
    """n samples of n // 2 prompts, two seeds each and prompt-major (as the harness feeds them), with ids,
    captions and four attribute labels in ``meta[ATTRS]`` (what a metric may read)."""
    out = []
    for i in range(n):
        k = i // 2
        out.append(Prompt(f"contract-{k}", CONTRACT_CAPTIONS[k % len(CONTRACT_CAPTIONS)],
                          {ATTRS: (k % 3, k % 4, (k // 2) % 4, k % 2)}))
    return out


def _update(metric, images, prompts) -> None:
    """``update``, plus the teacher's images of the same items for a teacher-fidelity metric (``needs_teacher``)."""
    metric.update(images, prompts)
    if getattr(type(metric), "needs_teacher", False):
        metric.update_teacher((1.0 - images).flip(-1))


def _value(metric, images, prompts) -> float:
    _update(metric, images, prompts)
    return float(metric.compute().value)


def check_metric_metadata(factory: Callable[[], object]) -> None:
    """Declared name, direction, per-image flag and a protocol string (``version`` is the same string)."""
    from cdmbench.eval.metrics.base import Applicability, Metric

    m = factory()
    cls = type(m)
    assert isinstance(m, Metric), f"{cls.__name__} is not a cdmbench Metric"
    assert isinstance(getattr(cls, "name", None), str) and cls.name, f"{cls.__name__} has no registry name"
    assert isinstance(cls.higher_is_better, bool) and isinstance(cls.per_image, bool)
    assert isinstance(m.protocol, str) and m.protocol and m.version == m.protocol
    a = cls.applies_to(Evaluators(not_applicable={cls.name: "not for these images"}))
    assert isinstance(a, Applicability) and not a and a.status == "not_applicable: not for these images"


def check_metric_result(factory: Callable[[], object]) -> None:
    """One batch gives a finite ``MetricResult`` over every image; per-image metrics give their scores and a
    bootstrap interval around the mean; compute before any update fails loudly."""
    from cdmbench.eval.metrics.base import MetricResult

    m = factory()
    try:
        m.compute()
    except CdmbenchError:
        pass
    else:
        raise AssertionError(f"{type(m).__name__}.compute() before any update must raise a CdmbenchError")
    _update(m, contract_images(8, 0), contract_prompts(8))
    r = m.compute()
    assert isinstance(r, MetricResult) and r.n == 8 and np.isfinite(r.value)
    if type(m).per_image:  # per image, or per prompt for per-prompt metrics
        assert r.per_image is not None and r.per_image.ndim == 1 and r.per_image.size in (4, 8)
        assert np.isfinite(r.per_image).all()
        assert np.isclose(r.value, r.per_image.mean(), rtol=1e-9, atol=1e-12)
        lo, hi = r.interval()
        assert lo <= r.value <= hi
    else:
        assert r.per_image is None and all(np.isnan(r.interval()))


def check_metric_streams_merges_and_resets(factory: Callable[[], object]) -> None:
    """Batches streamed, states merged (another process, split between prompts) and a reset instance all give
    the one-batch value."""
    images, prompts = contract_images(8, 1), contract_prompts(8)
    whole = _value(factory(), images, prompts)
    streamed = factory()
    _update(streamed, images[:3], prompts[:3])
    _update(streamed, images[3:], prompts[3:])
    assert np.isclose(float(streamed.compute().value), whole, rtol=1e-6, atol=1e-8)
    a, b = factory(), factory()  # split at a prompt boundary, as a shard by prompt would
    _update(a, images[:4], prompts[:4])
    _update(b, images[4:], prompts[4:])
    a.merge(b)
    assert np.isclose(float(a.compute().value), whole, rtol=1e-6, atol=1e-8)
    a.reset()
    assert np.isclose(_value(a, images, prompts), whole, rtol=1e-6, atol=1e-8)
    assert np.isclose(_value(factory(), images, prompts), whole, rtol=1e-6, atol=1e-8)  # deterministic


def check_metric_rejects_bad_batches(factory: Callable[[], object]) -> None:
    """A prompt count that is not the image count, uint8 images or a (B, H, W) tensor: a ``CdmbenchError``."""
    images, prompts = contract_images(4, 2), contract_prompts(4)
    for bad_images, bad_prompts in ((images, prompts[:3]), ((images * 255).to(torch.uint8), prompts),
                                    (images[:, 0], prompts)):
        try:
            factory().update(bad_images, bad_prompts)
        except CdmbenchError:
            continue
        raise AssertionError(f"{type(factory()).__name__}.update accepted a bad batch {tuple(bad_images.shape)} "
                             f"{bad_images.dtype} with {len(bad_prompts)} prompts")


METRIC_CHECKS = (check_metric_metadata, check_metric_result, check_metric_streams_merges_and_resets,
                 check_metric_rejects_bad_batches)


# --------------------------------------------------------------------------------------------------
# Backbones: a built (tiny) instance


def check_backbone_shapes_and_dtypes(backbone) -> None:
    """encode → velocity of the latent's shape in float32 → decode to (B, 3, H, W) in [0, 1]; a frozen teacher."""
    cond = backbone.encode_prompts(list(CONTRACT_CAPTIONS[:3]))
    assert cond.batch_size == 3
    x = torch.randn(3, *backbone.latent_shape, device=backbone.device)
    v = backbone.velocity(backbone.teacher, x, torch.tensor([1.0, 0.5, 0.02], device=backbone.device), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    img = backbone.decode(x)
    assert img.dim() == 4 and img.shape[:2] == (3, 3) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert all(not p.requires_grad for p in backbone.teacher.parameters())


def check_backbone_uncond(backbone) -> None:
    """The unconditional input is the encoded empty prompt, not zeros."""
    u, e = backbone.uncond(2), backbone.encode_prompts(["", ""])
    for k in e.batched:
        torch.testing.assert_close(u.batched[k], e.batched[k])


def check_backbone_trainable_copy(backbone) -> None:
    """A trainable copy is independent of the frozen teacher and round-trips through its saved state."""
    net = backbone.trainable_copy()
    assert any(p.requires_grad for p in net.parameters())
    p = next(q for q in net.parameters() if q.requires_grad)
    with torch.no_grad():
        p.add_(1.0)
    assert all(not q.requires_grad for q in backbone.teacher.parameters())
    state = backbone.net_state_dict(net)
    again = backbone.load_net(state)
    for k, val in backbone.net_state_dict(again).items():
        torch.testing.assert_close(val, state[k])


def check_backbone_batch_independence(backbone) -> None:
    """A sample is its (prompt id, seed): the same image at batch size 1 and 8 (teacher, CFG, 2 steps)."""
    from cdmbench.sampling import Denoiser, sample_euler
    from cdmbench.seeding import StackedGenerator

    keys = [(f"p{i}", 7) for i in range(8)]
    sched = backbone.schedule(2)

    def generate(idx):
        rng = StackedGenerator.for_samples([keys[i] for i in idx])
        prompts = [CONTRACT_CAPTIONS[i] for i in idx]
        den = Denoiser(backbone, backbone.teacher, backbone.encode_prompts(prompts), backbone.uncond(len(idx)),
                       backbone.default_guidance)
        return sample_euler(den, rng.randn(backbone.latent_shape, device=backbone.device), sched.sigmas(backbone.device))

    full = generate(list(range(8)))
    for i in (0, 5):
        torch.testing.assert_close(generate([i])[0], full[i], atol=1e-5, rtol=1e-4)


def check_backbone_schedule(backbone) -> None:
    """Every step count records its nominal and effective (shifted) σ, decreasing from 1."""
    s = backbone.schedule(4)
    assert s.nominal == (1.0, 0.75, 0.5, 0.25)
    assert len(s.effective) == 4 and abs(s.effective[0] - 1.0) < 1e-6
    assert list(s.effective) == sorted(s.effective, reverse=True)


def check_backbone_declarations(backbone) -> None:
    """What the eval layer reads without building the backbone: evaluators whose ``not_applicable`` names
    registered metrics and whose models are loaders, and a bundled prompt set (if any) with unique ids that
    file prompts keep through ``annotate_prompts``."""
    from cdmbench.eval.metrics import METRICS

    cls = type(backbone)
    declared = cls.evaluators()
    assert isinstance(declared, Evaluators)
    unknown = sorted(set(declared.not_applicable) - set(METRICS.names()))
    assert not unknown, f"{cls.__name__}.evaluators() marks unregistered metrics not applicable: {unknown}"
    assert all(isinstance(r, str) and r for r in declared.not_applicable.values())
    assert all(callable(f) for f in (declared.fid, declared.clip, declared.attributes) if f is not None)
    bundled = cls.prompt_set()
    if bundled is not None:
        assert bundled and all(isinstance(p, Prompt) for p in bundled)
        assert len({p.id for p in bundled}) == len(bundled), "bundled prompt ids must be unique"
    read = [Prompt(f"file-{i}", t) for i, t in enumerate(CONTRACT_CAPTIONS)]
    annotated = cls.annotate_prompts(read)
    assert [(p.id, p.text) for p in annotated] == [(p.id, p.text) for p in read]


BACKBONE_CHECKS = (check_backbone_shapes_and_dtypes, check_backbone_uncond, check_backbone_trainable_copy,
                   check_backbone_batch_independence, check_backbone_schedule, check_backbone_declarations)
