"""PickScore, the LAION aesthetic predictor and intra-prompt LPIPS end to end on small random models of the
same classes, saved and loaded through the real loading code (local paths, HF_HUB_OFFLINE)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cdmbench.errors import CdmbenchError, MissingWeightsError  # noqa: E402
from cdmbench.eval.metrics import MetricOptions  # noqa: E402
from cdmbench.eval.metrics.aesthetic import Aesthetic, AestheticMLP  # noqa: E402
from cdmbench.eval.metrics.base import to_pil  # noqa: E402
from cdmbench.eval.metrics.pickscore import PickScore  # noqa: E402
from cdmbench.types import Evaluators  # noqa: E402

PROMPTS = ["a red circle", "a photo of a dog", "green triangle in the top left", "a cat"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny transformers CLIPModel (projection 16) and a CLIPProcessor with a byte-level tokenizer."""
    from cdmbench.eval.metrics.hf_clip import build_tiny_hf_clip

    return build_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip"))


def batch(n=4):
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(3))


def reference_outputs(folder, imgs, prompts):
    """The stock transformers forward: logits_per_image and the normalised image_embeds."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    inputs = proc(text=prompts, images=to_pil(imgs), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal().double().numpy(), out.image_embeds


def test_pickscore_is_logit_scale_times_cosine(tiny_clip_dir):
    imgs = batch()
    m = PickScore.from_options(Evaluators(), MetricOptions(pickscore_model=str(tiny_clip_dir),
                                                    pickscore_processor=str(tiny_clip_dir)))
    m.update(imgs[:3], PROMPTS[:3])
    m.update(imgs[3:], PROMPTS[3:])
    r = m.compute()
    want, _ = reference_outputs(tiny_clip_dir, imgs, PROMPTS)
    np.testing.assert_allclose(r.per_image, want, rtol=1e-4, atol=1e-4)
    assert r.n == 4 and m.higher_is_better and "score=logit_scale*cos" in m.protocol
    # the prompt matters: another prompt changes the score
    m.reset()
    m.update(imgs[:1], ["something else entirely"])
    assert abs(m.compute().value - want[0]) > 1e-6


def test_aesthetic_is_the_mlp_of_the_normalised_embedding(tiny_clip_dir, tmp_path):
    torch.manual_seed(1)
    mlp = AestheticMLP(input_size=16).eval()
    head = tmp_path / "aesthetic-model.pth"
    torch.save(mlp.state_dict(), head)
    imgs = batch()
    m = Aesthetic.from_options(Evaluators(), MetricOptions(aesthetic_clip=str(tiny_clip_dir), aesthetic_path=str(head)))
    m.update(imgs, PROMPTS)
    r = m.compute()
    _, emb = reference_outputs(tiny_clip_dir, imgs, PROMPTS)
    with torch.no_grad():
        want = mlp(emb).reshape(-1).double().numpy()
    np.testing.assert_allclose(r.per_image, want, rtol=1e-4, atol=1e-5)
    assert m.protocol.startswith("aesthetic|laion-improved-v2|")
    torch.save(AestheticMLP(input_size=8).state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(CdmbenchError, match="do not fit"):
        Aesthetic.from_options(Evaluators(), MetricOptions(aesthetic_clip=str(tiny_clip_dir), aesthetic_path=str(tmp_path / "wrong.pth")))


def test_missing_weights_fail_with_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="PickScore model .* not available locally.*pickscore_model="):
        PickScore.from_options(Evaluators(), MetricOptions(pickscore_model="nobody/no-such-model-xyz"))
    with pytest.raises(MissingWeightsError, match="not found at"):
        PickScore.from_options(Evaluators(), MetricOptions(pickscore_model=str(tmp_path / "nothing")))
    with pytest.raises(MissingWeightsError, match="aesthetic predictor head"):
        Aesthetic.from_options(Evaluators(), MetricOptions(aesthetic_path=str(tmp_path / "none.pth")))


def test_not_applicable_to_the_toy():
    from cdmbench.backbones.toy import ToyBackbone

    for cls in (PickScore, Aesthetic):
        assert not cls.applies_to(ToyBackbone.evaluators())
        with pytest.raises(CdmbenchError, match="does not apply"):
            cls.from_options(ToyBackbone.evaluators())


# --------------------------------------------------------------------------------------------------
# Intra-prompt LPIPS


@pytest.fixture(scope="module")
def tiny_lpips():
    from cdmbench.eval.metrics.lpips_div import build_lpips

    torch.manual_seed(0)
    return build_lpips("squeeze")  # random SqueezeNet trunk (1.2 M parameters), the wheel's v0.1 heads


def test_pairwise_lpips_equals_the_package_forward(tiny_lpips):
    from cdmbench.eval.metrics.lpips_div import lpips_features, mean_pairwise_lpips, pairwise_lpips

    imgs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pairs = [(0, 1), (0, 3), (2, 1)]
    got = pairwise_lpips(tiny_lpips, lpips_features(tiny_lpips, imgs), pairs)
    with torch.no_grad():
        want = [float(tiny_lpips(imgs[i:i + 1], imgs[j:j + 1], normalize=True)) for i, j in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    same = imgs[:1].expand(5, -1, -1, -1)
    assert mean_pairwise_lpips(tiny_lpips, same) == pytest.approx(0.0, abs=1e-9)
    assert mean_pairwise_lpips(tiny_lpips, imgs) > 0.0
    with pytest.raises(CdmbenchError, match="at least 2 images"):
        mean_pairwise_lpips(tiny_lpips, imgs[:1])


def test_lpips_trunk_loads_from_a_torchvision_file_and_never_downloads_offline(tmp_path, monkeypatch):
    import torchvision

    from cdmbench.eval.metrics.lpips_div import load_lpips, trunk_file

    torch.manual_seed(2)
    tv = torchvision.models.squeezenet1_1(weights=None)
    torch.save(tv.state_dict(), tmp_path / trunk_file("squeeze"))
    model = load_lpips("squeeze", str(tmp_path))  # a folder holding the file
    torch.testing.assert_close(model.net.slice1[0].weight, tv.features[0].weight)
    torch.testing.assert_close(getattr(model.net.slice7, "12").expand3x3.weight, tv.features[12].expand3x3.weight)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    with pytest.raises(MissingWeightsError, match="not cached .*lpips_trunk_path="):
        load_lpips("alex")
