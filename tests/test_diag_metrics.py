"""The registered diagnostic metrics on the toy: known answers with real, collapsed and blurred images, the
free-factor regressor's accuracy, and teacher fidelity / skip rows through the eval harness."""

import numpy as np
import pytest
import torch

from cdmbench.eval.harness import EvalConfig, run_eval
from cdmbench.eval.metrics import METRICS, build_metric
from cdmbench.eval.metrics.sets import MetricSkipped
from cdmbench.eval.results import read_results
from cdmbench.backbones.toy import ToyBackbone
from cdmbench.toy import factors, shapes

SEEDS = 5  # the step-sweep default: 5 seeds per prompt


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts():
    return shapes.eval_prompts()[::2]  # 48 prompts, every shape/colour/position/size still present


def score(name: str, images: torch.Tensor, prompts, seeds: int = SEEDS):
    m = build_metric(name, ToyBackbone.evaluators())
    items = [p for p in prompts for _ in range(seeds)]
    for lo in range(0, len(items), 64):
        m.update(images[lo:lo + 64], items[lo:lo + 64])
    return m.compute()


@pytest.fixture(scope="module")
def sets(prompts):
    real = shapes.real_images_for(prompts, list(range(SEEDS)))
    other = shapes.real_images_for(prompts, list(range(100, 100 + SEEDS)))
    collapsed = real[::SEEDS].repeat_interleave(SEEDS, dim=0)  # the same image for every seed of a prompt
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 16
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(real, (1, 1, 1, 1), mode="replicate"),
                                         k.expand(3, 1, 3, 3), groups=3)
    return {"real": real, "other": other, "collapsed": collapsed, "blurred": blurred}


def test_factor_regressor_reads_held_out_renders_accurately():
    err = factors.heldout_errors(factors.load_factor_regressor(), 512, seed=4242)
    assert err["x"]["mae"] < 0.2 and err["y"]["mae"] < 0.2  # pixels
    assert err["radius"]["mae"] < 0.2  # pixels
    assert err["shade"]["mae"] < 0.01 and all(err[f"jitter_{c}"]["mae"] < 0.01 for c in "rgb")  # intensity
    assert min(v["r2"] for v in err.values()) > 0.8


def test_factor_w1_real_is_near_its_floor_and_a_collapsed_generator_is_clearly_worse(sets, prompts):
    real = score("factor_w1", sets["real"], prompts)
    other = score("factor_w1", sets["other"], prompts)
    collapsed = score("factor_w1", sets["collapsed"], prompts)
    assert real.per_image.shape == (len(prompts),) and real.n == len(prompts) * SEEDS
    assert abs(real.value - other.value) < 0.25 * other.value  # real images: the finite-sample floor
    assert collapsed.value > 1.8 * real.value
    lo, hi = collapsed.interval()
    assert lo > real.interval()[1]


def test_detail_real_is_one_and_blur_loses(sets, prompts):
    real = score("detail", sets["real"], prompts)
    blurred = score("detail", sets["blurred"], prompts)
    noisy = score("detail", (sets["real"] + 0.1 * torch.randn(sets["real"].shape)).clamp(0, 1), prompts)
    assert real.value > 0.85
    assert blurred.value < real.value - 0.2
    assert noisy.value < real.value - 0.2  # excess high frequency is not detail either


def test_vendi_and_prdc_see_the_collapse(sets, prompts):
    real = score("vendi", sets["real"], prompts)
    collapsed = score("vendi", sets["collapsed"], prompts)
    np.testing.assert_allclose(collapsed.per_image, 1.0, atol=1e-6)  # identical seeds: one effective sample
    assert real.value > 1.1 and real.interval()[0] > 1.05  # cosine kernel on non-negative features: a narrow range
    # coverage sees the lost seeds; recall does not here: duplicated samples blow up the generated set's k-NN
    # balls (k=5 > 4 copies), the outlier weakness of recall that Naeem et al. designed coverage against
    assert score("coverage", sets["collapsed"], prompts).value < score("coverage", sets["real"], prompts).value - 0.05
    assert score("precision", sets["real"], prompts).value > 0.8


def test_per_prompt_metrics_skip_with_one_seed(sets, prompts):
    for name in ("vendi", "factor_w1"):
        with pytest.raises(MetricSkipped, match="needs >= 2 seeds per prompt, got 1"):
            score(name, sets["real"][::SEEDS], prompts, seeds=1)


@pytest.fixture(scope="module")
def teacher_eval(tmp_path_factory):
    """Teacher rows at 2 and 28 (reference) steps, 8 prompts × 8 seeds, every diagnostic metric."""
    out = tmp_path_factory.mktemp("diag_eval")
    names = ("teacher_fd", "teacher_dist", "vendi", "factor_w1", "detail", "intra_lpips")
    cfg = EvalConfig(workspace=str(out / "ws"), arch="toy", steps=(2,), teacher_steps=(2, 28), metrics=names,
                     num_prompts=8, seeds=tuple(range(8)), out=str(out / "eval"), batch_size=64, progress=False)
    return cfg, read_results(run_eval(cfg))


def test_teacher_fidelity_rows_and_their_floor(teacher_eval):
    from cdmbench.eval.generate import image_relpath, read_pngs
    from cdmbench.prompts import load_prompt_set

    cfg, rows = teacher_eval
    get = rows.set_index(["steps", "metric"])
    assert get.loc[(28, "teacher_fd"), "status"] == "skipped: this is the teacher reference row itself"
    assert get.loc[(2, "teacher_fd"), "status"] == "ok" and get.loc[(2, "teacher_dist"), "status"] == "ok"
    assert get.loc[(28, "intra_lpips"), "status"].startswith("not_applicable")
    assert get.loc[(28, "vendi"), "status"] == "ok"
    # floor: the 28-step teacher's seeds 0-3 against its own seeds 4-7 (same prompts)
    prompts = load_prompt_set("default", "toy")[:8]
    images = {s: read_pngs([cfg.out_dir / image_relpath("teacher-toy", 28, p.id, s) for p in prompts]) for s in range(8)}
    m = build_metric("teacher_fd", ToyBackbone.evaluators())
    for s in range(4):
        m.update(images[s], [p.text for p in prompts])
        m.update_teacher(images[s + 4])
    floor = m.compute().value
    assert get.loc[(2, "teacher_fd"), "value"] > 3 * floor


def test_teacher_metrics_skip_without_teacher_reference_rows(teacher_eval, tmp_path):
    cfg, _ = teacher_eval
    import dataclasses

    rows = read_results(run_eval(dataclasses.replace(cfg, teacher_steps=(2,), seeds=(0,), metrics=("teacher_fd", "vendi"),
                                                     out=str(tmp_path / "eval"))))
    status = dict(zip(rows["metric"], rows["status"]))
    assert status["teacher_fd"].startswith("skipped: no teacher rows at the reference 28 steps")
    assert status["vendi"] == "skipped: needs >= 2 seeds per prompt, got 1 (e.g. --seeds 0-4)"


def test_every_registered_metric_declares_direction_and_a_one_line_summary():
    for name, cls in METRICS.items():
        assert isinstance(cls.higher_is_better, bool), name
        assert (cls.__doc__ or "").strip().splitlines()[0], name


def test_train_evaluators_only_names_its_steps(tmp_path):
    from cdmbench.errors import CdmbenchError
    from cdmbench.toy.train_evaluators import train_all

    with pytest.raises(CdmbenchError, match="valid steps: classifier, clip, fid-reference, factors"):
        train_all(tmp_path, only=("factor",))
    assert not any(tmp_path.iterdir())  # nothing written


def test_factor_regressor_fit_is_reproducible_and_loads(tmp_path):
    a = factors.train_factor_regressor(tmp_path / "a.safetensors", n=768, heldout=256, progress=False)
    b = factors.train_factor_regressor(tmp_path / "b.safetensors", n=768, heldout=256, progress=False)
    assert a["heldout"] == b["heldout"]
    wa = factors.load_factor_regressor(tmp_path / "a.safetensors").weights
    torch.testing.assert_close(wa, factors.load_factor_regressor(tmp_path / "b.safetensors").weights)
    assert a["heldout"]["x"]["mae"] < 0.3
