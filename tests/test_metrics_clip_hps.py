"""CLIP score and HPS v2.1 on a tiny open_clip model built from a custom config (no hub)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cdmbench.errors import CdmbenchError, MissingWeightsError  # noqa: E402
from cdmbench.eval.metrics import MetricOptions, build_metric  # noqa: E402
from cdmbench.eval.metrics.base import to_pil  # noqa: E402
from cdmbench.eval.metrics.clip_score import CLIPScore, PILBatchPreprocess  # noqa: E402
from cdmbench.eval.metrics.hps import HPSv21  # noqa: E402

TINY = "cdmbench-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle", "a blue square in the top left", "a photo of a dog", "green triangle"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny open_clip CLIP, its inference transform and tokenizer, plus a saved checkpoint."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(TINY, pretrained=None)
    model.eval()
    ckpt = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)  # the HPS file layout
    return model, transform, open_clip.get_tokenizer(TINY), ckpt


@pytest.fixture
def hub_offline(monkeypatch):
    """Offline even if huggingface_hub was imported before HF_HUB_OFFLINE was set."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def batch(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 3, 48, 40, generator=g)


def cosine_independently(model, transform, tokenizer, imgs, prompts) -> np.ndarray:
    """cos(image, text) with open_clip's own PIL transform, one image at a time."""
    out = []
    with torch.no_grad():
        for im, p in zip(to_pil(imgs), prompts):
            fi = model.encode_image(transform(im)[None], normalize=True)
            ft = model.encode_text(tokenizer([p]), normalize=True)
            out.append(float((fi * ft).sum()))
    return np.array(out)


def test_clip_score_is_100_max_cos_0(tiny_clip):
    model, transform, tokenizer, _ = tiny_clip
    imgs = batch()
    m = CLIPScore(model, PILBatchPreprocess(transform), tokenizer, f"open_clip:{TINY}:random")
    m.update(imgs[:2], PROMPTS[:2])
    m.update(imgs[2:], PROMPTS[2:])
    r = m.compute()
    cos = cosine_independently(model, transform, tokenizer, imgs, PROMPTS)
    want = 100 * np.maximum(cos, 0)
    np.testing.assert_allclose(r.per_image, want, rtol=1e-4, atol=1e-4)
    assert r.value == pytest.approx(want.mean(), abs=1e-4) and r.n == 4
    assert m.protocol == f"clip|open_clip:{TINY}:random|prefix=''|score=100*max(cos,0)"


def test_clip_from_options_loads_a_local_checkpoint_and_applies_the_prefix(tiny_clip, tmp_path):
    model, transform, tokenizer, _ = tiny_clip
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    m = build_metric("clip", options=MetricOptions(clip_model=TINY, clip_pretrained=str(path), clip_prefix="A photo depicts "))
    assert m.protocol == f"clip|open_clip:{TINY}:clip.pt|prefix='A photo depicts '|score=100*max(cos,0)"
    imgs = batch()
    m.update(imgs, PROMPTS)
    cos = cosine_independently(model, transform, tokenizer, imgs, ["A photo depicts " + p for p in PROMPTS])
    np.testing.assert_allclose(m.compute().per_image, 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-4)


def test_clip_reads_env_vars(tiny_clip, tmp_path, monkeypatch):
    model = tiny_clip[0]
    torch.save(model.state_dict(), tmp_path / "c.pt")
    monkeypatch.setenv("CDMBENCH_CLIP_MODEL", TINY)
    monkeypatch.setenv("CDMBENCH_CLIP_PRETRAINED", str(tmp_path / "c.pt"))
    assert build_metric("clip").protocol.startswith(f"clip|open_clip:{TINY}:c.pt|")


def test_clip_missing_weights_offline_is_one_line(hub_offline, tmp_path):
    with pytest.raises(MissingWeightsError, match="CLIP weights ViT-L-14/openai are not available locally") as e:
        build_metric("clip", options=MetricOptions(clip_model="ViT-L-14", clip_pretrained="openai"))
    assert "\n" not in str(e.value) and "CDMBENCH_CLIP_PRETRAINED" in str(e.value)
    with pytest.raises(MissingWeightsError, match="checkpoint not found"):
        build_metric("clip", options=MetricOptions(clip_pretrained=str(tmp_path / "nope.pt")))
    with pytest.raises(CdmbenchError, match="no pretrained tag 'bogus'"):
        build_metric("clip", options=MetricOptions(clip_pretrained="bogus"))


def test_hps_loads_the_local_checkpoint_and_scores_100_cos(tiny_clip):
    model, transform, tokenizer, ckpt = tiny_clip
    m = build_metric("hps", options=MetricOptions(hps_path=str(ckpt), hps_model=TINY))
    assert isinstance(m, HPSv21)
    assert m.protocol == f"hps-v2.1|open_clip:{TINY}|ckpt=HPS_v2.1_compressed.pt|score=100*cos"
    imgs = batch()
    m.update(imgs, PROMPTS)
    want = 100 * cosine_independently(model, transform, tokenizer, imgs, PROMPTS)
    np.testing.assert_allclose(m.compute().per_image, want, rtol=1e-4, atol=1e-4)


def test_hps_checkpoint_for_another_architecture_fails(tiny_clip, tmp_path):
    sd = {k: v for k, v in tiny_clip[0].state_dict().items() if not k.startswith("visual.")}
    torch.save(sd, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(CdmbenchError, match=f"do not fit open_clip {TINY}"):
        build_metric("hps", options=MetricOptions(hps_path=str(tmp_path / "HPS_v2.1_compressed.pt"), hps_model=TINY))


def test_hps_missing_weights_offline_is_one_line(hub_offline, tmp_path, monkeypatch):
    monkeypatch.delenv("CDMBENCH_HPS_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(MissingWeightsError) as e:
        build_metric("hps")
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in ("HPS_v2.1_compressed.pt", "xswu/HPSv2", "CDMBENCH_HPS_PATH"))
    monkeypatch.setenv("CDMBENCH_HPS_PATH", str(tmp_path / "missing.pt"))
    with pytest.raises(MissingWeightsError, match="not found at .*missing.pt"):
        build_metric("hps")
