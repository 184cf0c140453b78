"""Quality guards for the shipped toy evaluators (classifier, toy CLIP, toy-FID reference statistics)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from cdmbench.errors import MissingWeightsError
from cdmbench.eval.metrics.clip_score import openclip_cosine
from cdmbench.eval.metrics.fid import FID, ReferenceStats, frechet_distance
from cdmbench.toy import evaluators as ev
from cdmbench.toy import shapes
from cdmbench.types import ATTRS

NOISE_STDS = (0.05, 0.1, 0.2, 0.4)


@pytest.fixture(scope="module")
def classifier() -> ev.ShapeClassifier:
    return ev.load_toy_classifier()


@pytest.fixture(scope="module")
def toy_clip():
    return ev.load_toy_clip()


@pytest.fixture(scope="module")
def fresh() -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """1,024 fresh real images (a stream seed no training run uses), with captions and labels."""
    return next(shapes.ShapesStream(seed=4242, batch_size=1024))


def _real_images(seed: int, per_prompt: int) -> torch.Tensor:
    """``per_prompt`` real images for every eval prompt, rendered in batches from one generator.

    Same distribution as ``shapes.real_images_for`` (which the reference uses), but batched: per-image
    rendering is slow when torch's threads compete with another process for the cores.
    """
    attrs = torch.tensor([p.meta[ATTRS] for p in shapes.eval_prompts()]).repeat(per_prompt, 1)
    g = torch.Generator().manual_seed(seed)
    return torch.cat([shapes.render(chunk, g) for chunk in attrs.split(480)])


# ---------------------------------------------------------------------------------------------- classifier


def test_classifier_all_attributes_accuracy(classifier, fresh):
    images, _, attrs = fresh
    pred = ev.attribute_predictions(classifier, images)
    acc = float(ev.attribute_accuracy(pred, attrs).mean())
    per = ev.per_attribute_accuracy(pred, attrs)
    assert acc >= 0.97, (acc, per)
    assert min(per.values()) >= acc


def test_classifier_is_frozen_eval_and_fid_compatible(classifier):
    assert not classifier.training
    assert not any(p.requires_grad for p in classifier.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert classifier.features(x).shape == (2, classifier.num_features) == (2, 128)
    spec = ev.fid_features()
    assert spec.extractor(x).dtype == torch.float32 and spec.protocol == "toy-classifier-features-128|float64"


def test_attribute_accuracy_needs_all_four():
    target = torch.tensor([[0, 1, 2, 1], [2, 3, 0, 0]])
    pred = torch.tensor([[0, 1, 2, 1], [2, 3, 0, 1]])  # second image: size wrong
    assert ev.attribute_accuracy(pred, target).tolist() == [1.0, 0.0]
    assert ev.per_attribute_accuracy(pred, target) == {"shape": 1.0, "color": 1.0, "position": 1.0, "size": 0.5}


# ---------------------------------------------------------------------------------------------- toy CLIP


def test_toy_clip_is_an_open_clip_model(toy_clip):
    import open_clip

    model, preprocess, tokenizer = toy_clip
    assert isinstance(model, open_clip.model.CLIP)
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert preprocess(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_toy_clip_ranks_true_caption_above_other(toy_clip, fresh):
    """For each image: cos(image, own caption) > cos(image, caption of image perm[i]), where perm is a
    fixed random derangement and only pairs whose attributes differ count."""
    model, preprocess, tokenizer = toy_clip
    images, caps, attrs = (t[:512] for t in fresh)
    g = torch.Generator().manual_seed(7)
    order = torch.randperm(len(caps), generator=g)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)  # no fixed points
    differ = (attrs != attrs[perm]).any(dim=1)
    own = torch.from_numpy(openclip_cosine(model, preprocess, tokenizer, images, caps))
    other = torch.from_numpy(openclip_cosine(model, preprocess, tokenizer, images, [caps[j] for j in perm]))
    rank_acc = float((own > other)[differ].float().mean())
    assert differ.sum() > 400
    assert rank_acc >= 0.95, rank_acc


# ---------------------------------------------------------------------------------------------- toy FID


def test_fid_reference_protocol(classifier):
    mu, sigma, meta = ev.load_toy_fid_reference()
    assert mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (classifier.num_features,) and sigma.shape == (classifier.num_features,) * 2
    assert meta["extractor_sha256"] == ev.file_sha256(ev.default_classifier_path())
    assert meta["prompt_set"] == shapes.PROMPT_SET_VERSION and meta["version"] == ev.TOY_FID_VERSION
    assert meta["n"] == len(shapes.eval_prompts()) * 50


def _stats(classifier, images) -> ReferenceStats:
    with torch.no_grad():
        return ReferenceStats.from_features(classifier.features(images).double(), "x")


def test_fid_real_vs_real_is_small_and_grows_with_noise(classifier):
    ref = ev.fid_features().reference()
    a, b = _real_images(seed=1, per_prompt=20), _real_images(seed=2, per_prompt=20)  # 1,920 each; bias ~ 1/n
    sa, sb = _stats(classifier, a), _stats(classifier, b)
    real_vs_real = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    metric = FID(ev.fid_features().extractor, ref, "fid|toy")  # the eval path against the shipped statistics
    metric.update(a, [""] * len(a))
    real_vs_ref = metric.compute().value
    g = torch.Generator().manual_seed(0)
    noisy, half = [], a[:960]  # 10 per prompt suffice: noise moves FID far more than the 1/n bias
    for std in NOISE_STDS:
        x = _stats(classifier, (half + std * torch.randn(half.shape, generator=g)).clamp(0, 1))
        noisy.append(frechet_distance(x.mu, x.sigma, sb.mu, sb.sigma))
    assert all(lo < hi for lo, hi in zip(noisy, noisy[1:])), noisy
    # "near zero": the finite-sample bias of two real sets stays well below the barely visible noise
    # std 0.05 and is negligible next to std 0.1 (shipped: 25.9 vs 87.5 / 741 at 1,920 images)
    for value in (real_vs_real, real_vs_ref):
        assert value < 0.35 * noisy[0] and value < 0.05 * noisy[1], (value, noisy)


# ---------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("loader", [ev.load_toy_classifier, ev.load_toy_clip, ev.load_toy_fid_reference])
def test_missing_file_raises_with_rebuild_hint(loader, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(MissingWeightsError) as err:
        loader(missing)
    message = str(err.value)
    assert str(missing) in message and ev.REBUILD_COMMAND in message and "\n" not in message


def test_training_is_deterministic_and_round_trips(tmp_path):
    from cdmbench.io import load_safetensors
    from cdmbench.toy import train_evaluators as te

    for name in ("a", "b"):
        te.train_classifier(tmp_path / f"{name}.safetensors", steps=2, batch_size=16, heldout=32, progress=False)
    a, b = load_safetensors(tmp_path / "a.safetensors"), load_safetensors(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ev.load_toy_classifier(tmp_path / "a.safetensors").num_features == 128


# ---------------------------------------------------------------------------------------------- declaration


def test_the_toy_backbone_declares_its_evaluators_with_stable_protocols():
    """What the toy bench scores with; the protocol strings go into every result row."""
    from cdmbench.backbones.toy import ToyBackbone
    from cdmbench.eval.metrics import METRICS, build_metric

    declared = ToyBackbone.evaluators()
    applies = {n for n in METRICS.names() if METRICS.get(n).applies_to(declared)}
    generic = {"clip", "fid", "vendi", "precision", "recall", "density", "coverage", "teacher_fd", "teacher_dist"}
    assert generic | {"attr_acc", "factor_w1", "detail"} <= applies
    assert not {"hps", "imagereward", "pickscore", "aesthetic", "intra_lpips"} & applies
    assert METRICS.get("hps").applies_to(declared).status.endswith("the toy backbone draws 32x32 shapes")
    protocols = {n: build_metric(n, declared).protocol for n in ("fid", "clip", "attr_acc")}
    assert protocols == {"fid": "fid|toy-classifier-features-128|float64|ref=toy-shipped:toy-fid-v2",
                         "clip": "clip|toy-clip|prefix=''|score=100*max(cos,0)",
                         "attr_acc": "attr_acc|toy-classifier|all-4-attributes"}
