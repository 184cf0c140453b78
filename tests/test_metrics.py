"""Metric protocol, registry, bootstrap, FID (vs numpy/scipy, torchmetrics, clean-fid), injected models, attr_acc."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cdmbench.errors import CdmbenchError, MissingWeightsError, UnknownNameError  # noqa: E402
from cdmbench.eval.metrics import METRICS, MetricOptions, MetricResult, bootstrap_ci, build_metric  # noqa: E402
from cdmbench.eval.metrics.attr_acc import AttributeModel, AttrAccuracy  # noqa: E402
from cdmbench.eval.metrics.fid import (FID, CleanInceptionFeatures, FIDFeatures, ReferenceStats, frechet_distance,  # noqa: E402
                                       load_clean_inception)
from cdmbench.types import ATTRS, Evaluators, Prompt  # noqa: E402

F = 12


class DummyFeatures(torch.nn.Module):
    """Flatten + fixed random Linear, like torchmetrics' _DummyFeatureExtractor (any image size → F)."""

    def __init__(self, in_pixels: int = 3 * 16 * 16, num_features: int = F):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.num_features = num_features
        self.proj = torch.nn.Linear(in_pixels, num_features)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(num_features, in_pixels, generator=g) / in_pixels**0.5)
            self.proj.bias.zero_()

    def forward(self, x):
        return self.proj(x.float().flatten(1))


def images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size, size, generator=g)
    return (base + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def prompts(n: int) -> list[str]:
    return [f"p{i}" for i in range(n)]


# --------------------------------------------------------------------------------------------------
# protocol, registry, bootstrap


def test_registry_rejects_unknown_names_listing_every_metric():
    assert METRICS.names() == sorted(METRICS.names()) and METRICS.names()
    with pytest.raises(UnknownNameError, match="valid metrics: " + ", ".join(METRICS.names())):
        METRICS.get("no-such-metric")


def test_a_declared_not_applicable_reason_becomes_the_status_and_blocks_building():
    for name in METRICS.names():
        declared = Evaluators(not_applicable={name: "these images are not photos"})
        a = METRICS.get(name).applies_to(declared)
        assert not a and a.status == "not_applicable: these images are not photos"
        with pytest.raises(CdmbenchError, match=f"metric '{name}' does not apply to these images"):
            build_metric(name, declared)


def test_attr_acc_applies_only_with_a_declared_predictor():
    assert not AttrAccuracy.applies_to(Evaluators())
    assert AttrAccuracy.applies_to(Evaluators(attributes=lambda device: None))
    with pytest.raises(CdmbenchError, match="declares no attribute predictor"):
        AttrAccuracy.from_options(Evaluators())


def test_importing_metrics_loads_no_heavy_library():
    code = (
        "import sys, cdmbench.eval.metrics, cdmbench.eval.results;"
        "heavy = [m for m in ('open_clip', 'torchmetrics', 'cleanfid', 'transformers', 'timm', 'ImageReward',"
        " '_cdmbench_imagereward', 'scipy', 'matplotlib', 'lpips') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_bootstrap_ci_is_fixed_seed_and_covers_the_mean():
    x = np.random.default_rng(3).normal(5.0, 2.0, size=400)
    lo, hi = bootstrap_ci(x)
    assert (lo, hi) == bootstrap_ci(x, seed=0)
    assert lo < x.mean() < hi
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci([2.0]) == (2.0, 2.0)
    assert bootstrap_ci(x, seed=1) != (lo, hi)
    with pytest.raises(CdmbenchError):
        bootstrap_ci([])
    with pytest.raises(CdmbenchError):
        bootstrap_ci([1.0, float("nan")])


def test_metric_result_interval():
    r = MetricResult(1.0, np.array([0.0, 1.0, 2.0]), 3)
    assert r.interval() == bootstrap_ci(r.per_image)
    assert all(np.isnan(MetricResult(1.0, None, 3).interval()))


# --------------------------------------------------------------------------------------------------
# FID


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_metric(extractor, real: torch.Tensor) -> FID:
    return FID(extractor, ReferenceStats.from_features(extractor(real).detach(), "real"), "fid|dummy")


def test_fid_matches_float64_scipy_reference():
    ext = DummyFeatures()
    real, fake = images(200, 0), images(150, 1)
    m = fid_metric(ext, real)
    for chunk in fake.split(40):
        m.update(chunk, prompts(len(chunk)))
    result = m.compute()
    want = scipy_fid(ext(fake).detach().double().numpy(), ext(real).detach().double().numpy())
    assert result.n == 150 and result.per_image is None
    assert result.value == pytest.approx(want, rel=1e-6)
    assert m.protocol == "fid|dummy|ref=real"


def test_fid_matches_torchmetrics_with_the_same_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = DummyFeatures()
    real, fake = images(120, 2), images(100, 3)
    tm = FrechetInceptionDistance(feature=ext, normalize=True)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    m = fid_metric(ext, real)
    m.update(fake, prompts(100))
    assert m.compute().value == pytest.approx(float(tm.compute()), rel=1e-3)


def test_fid_of_identical_sets_is_zero_and_grows_with_noise():
    ext = DummyFeatures()
    real = images(200, 4)
    values = []
    for sigma in (0.0, 0.05, 0.15, 0.4):
        m = fid_metric(ext, real)
        g = torch.Generator().manual_seed(9)
        m.update((real + sigma * torch.randn(real.shape, generator=g)).clamp(0, 1), prompts(200))
        values.append(m.compute().value)
    assert abs(values[0]) < 1e-8
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_frechet_distance_accepts_tensors_and_checks_shapes():
    mu, s = np.zeros(3), np.eye(3)
    assert frechet_distance(torch.ones(3), torch.eye(3), mu, s) == pytest.approx(3.0)
    with pytest.raises(CdmbenchError, match="shapes disagree"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))


def test_fid_states_merge_like_one_stream_and_reset():
    ext = DummyFeatures()
    real, fake = images(100, 5), images(90, 6)
    whole, a, b = (fid_metric(ext, real) for _ in range(3))
    whole.update(fake, prompts(90))
    a.update(fake[:50], prompts(50))
    b.update(fake[50:], prompts(40))
    a.merge(b)
    assert a.compute().value == pytest.approx(whole.compute().value, rel=1e-10)
    a.reset()
    with pytest.raises(CdmbenchError, match="at least 2 images"):
        a.compute()
    other = FID(ext, ReferenceStats.from_features(ext(real).detach(), "other"), "fid|dummy")
    with pytest.raises(CdmbenchError, match="cannot merge"):
        whole.merge(other)
    c = fid_metric(ext, real)
    c.merge_state(whole.state_dict())  # what a gather of state dicts from other processes does
    assert c.compute().value == pytest.approx(whole.compute().value, rel=1e-12)


def test_fid_rejects_bad_batches():
    m = fid_metric(DummyFeatures(), images(10, 0))
    with pytest.raises(CdmbenchError, match="prompts"):
        m.update(images(4, 1), prompts(3))
    with pytest.raises(CdmbenchError, match=r"\(B, 3, H, W\)"):
        m.update(torch.rand(4, 16, 16), prompts(4))
    with pytest.raises(CdmbenchError, match="float"):
        m.update((images(4, 1) * 255).to(torch.uint8), prompts(4))


def save_folder(folder, imgs: torch.Tensor):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate((imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(a).save(folder / f"{i:04d}.png")


def test_reference_stats_npz_roundtrip_and_folder_reference(tmp_path):
    ext = DummyFeatures()
    real = (images(30, 7) * 255).round() / 255  # exactly representable as PNG
    save_folder(tmp_path / "ref", real)
    ref = ReferenceStats.from_features(ext(real).detach(), "x")
    ref.save(tmp_path / "coco-mini.npz")
    loaded = ReferenceStats.load(tmp_path / "coco-mini.npz")
    assert loaded.name == "coco-mini" and loaded.n == 30
    np.testing.assert_allclose(loaded.sigma, ref.sigma)
    from cdmbench.eval.metrics.fid import reference_from_folder

    folder_ref = reference_from_folder(tmp_path / "ref", ext, batch_size=7)
    assert folder_ref.name == "ref" and folder_ref.n == 30
    np.testing.assert_allclose(folder_ref.mu, ref.mu, rtol=1e-5, atol=1e-6)
    with pytest.raises(CdmbenchError, match="'mu' and 'sigma'"):
        np.savez(tmp_path / "bad.npz", m=np.zeros(2))
        ReferenceStats.load(tmp_path / "bad.npz")


class FakeInception(torch.nn.Module):
    """Stands in for clean-fid's torchscript Inception: (B, 3, 299, 299) in [0, 255] → (B, F)."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.max() > 1.5
        return self.pool(x / 255.0).flatten(1)


def test_clean_inception_path_matches_clean_fid_on_saved_files(tmp_path):
    from cleanfid import fid as cfid

    imgs = (images(6, 8, size=40) * 255).round() / 255
    save_folder(tmp_path / "imgs", imgs)
    model = FakeInception()
    ours = CleanInceptionFeatures(model)(imgs).numpy()
    theirs = cfid.get_folder_features(
        str(tmp_path / "imgs"), model=model, num_workers=0, batch_size=4, device=torch.device("cpu"), mode="clean", verbose=False
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_missing_inception_weights_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt not found") as e:
        load_clean_inception(tmp_path / "nope" / "inception-2015-12-05.pt")
    assert "\n" not in str(e.value)
    monkeypatch.setattr("cdmbench.eval.metrics.fid._inception_cache_dir", lambda: tmp_path)
    with pytest.raises(MissingWeightsError, match="not cached .*CDMBENCH_INCEPTION_PATH"):
        load_clean_inception(None)
    monkeypatch.setenv("CDMBENCH_INCEPTION_PATH", str(tmp_path / "missing"))
    with pytest.raises(MissingWeightsError, match="CDMBENCH_INCEPTION_PATH"):
        FID.from_options(Evaluators(), MetricOptions(fid_reference=str(tmp_path)))


def test_natural_fid_needs_a_reference(monkeypatch):
    monkeypatch.delenv("CDMBENCH_FID_REF", raising=False)
    with pytest.raises(MissingWeightsError, match="needs a reference set.*CDMBENCH_FID_REF"):
        FID.from_options(Evaluators())


# --------------------------------------------------------------------------------------------------
# Injected models (Evaluators) and attr_acc


class FakeClassifier(torch.nn.Module):
    num_features = F

    def __init__(self):
        super().__init__()
        self.ext = DummyFeatures(3 * 32 * 32)

    def features(self, x):
        return self.ext(x)


def fake_predictions(imgs):
    return torch.stack([(imgs[:, c].mean((1, 2)) * 10).long() % 3 for c in range(3)] + [torch.zeros(len(imgs), dtype=torch.long)], 1)


def test_declared_fid_features_and_reference_are_used_and_an_explicit_reference_wins(tmp_path, monkeypatch):
    real, clf, devices = images(50, 11, size=32), FakeClassifier(), []
    f = clf.features(real).detach()

    def load(device):
        devices.append(device)
        return FIDFeatures(clf.features, "fake-features", lambda: ReferenceStats.from_features(f, "fake-ref"))

    monkeypatch.setenv("CDMBENCH_FID_REF", str(tmp_path / "a-natural-image-set"))  # not used: the backbone brings its own
    m = build_metric("fid", Evaluators(fid=load), MetricOptions(device="cpu"))
    assert devices == ["cpu"] and m.protocol == "fid|fake-features|ref=fake-ref"
    m.update(real, prompts(50))
    assert abs(m.compute().value) < 1e-8
    ReferenceStats.from_features(f[:25], "x").save(tmp_path / "half.npz")
    m = build_metric("fid", Evaluators(fid=load), MetricOptions(fid_reference=str(tmp_path / "half.npz")))
    assert m.protocol == "fid|fake-features|ref=half"


def test_attr_acc_counts_images_with_all_attributes_right():
    imgs = images(8, 12, size=32)
    pred = fake_predictions(imgs)
    target = pred.clone()
    target[1, 0] += 1  # one wrong attribute makes the image wrong
    target[5, 3] += 1
    ps = [Prompt(f"p{i}", f"p{i}", {ATTRS: tuple(t.tolist())}) for i, t in enumerate(target)]
    m = build_metric("attr_acc", Evaluators(attributes=lambda device: AttributeModel(fake_predictions, "fake", 4)))
    assert m.protocol == "attr_acc|fake|all-4-attributes"
    m.update(imgs[:4], ps[:4])
    m.update(imgs[4:], ps[4:])
    r = m.compute()
    assert r.value == pytest.approx(6 / 8) and r.n == 8
    np.testing.assert_array_equal(r.per_image, [1, 0, 1, 1, 1, 0, 1, 1])
    with pytest.raises(CdmbenchError, match=r"needs attribute labels \(Prompt.meta\['attrs'\]\)"):
        m.update(imgs, prompts(8))
