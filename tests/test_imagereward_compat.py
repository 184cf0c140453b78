"""image-reward 1.5 under transformers 5 (cdmbench.eval.metrics._imagereward_compat) and the ImageReward
metric end to end on a small random ImageReward of the package's own classes, saved and loaded through
the same local-path code as real weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cdmbench.errors import CdmbenchError, MissingWeightsError  # noqa: E402
from cdmbench.eval.metrics import MetricOptions, build_metric  # noqa: E402
from cdmbench.eval.metrics.base import to_pil  # noqa: E402

if importlib.util.find_spec("ImageReward") is None:  # its own __init__ cannot import under transformers 5
    pytest.skip("image-reward is an optional install: scripts/install_scorers.sh", allow_module_level=True)

from cdmbench.eval.metrics import _imagereward_compat as compat  # noqa: E402

VOCAB = list(compat.TINY_VOCAB)
PROMPTS = ["a red circle in the top left", "a large blue square", "a photo of a dog", "small yellow triangle"]
TINY_VIT = compat.TINY_VIT
med_config = compat.tiny_med_config


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    """A random small ImageReward saved as the user's files are: weights .pt, med_config.json, vocab.txt."""
    d = tmp_path_factory.mktemp("imagereward")
    model = compat.build_tiny_imagereward(d)
    torch.save(model.state_dict(), d / "ImageReward.pt")
    return model, d


def options(d, **kw) -> MetricOptions:
    base = dict(imagereward_path=str(d / "ImageReward.pt"), imagereward_med_config=str(d / "med_config.json"), bert_tokenizer_path=str(d / "vocab.txt"))
    return MetricOptions(**{**base, **kw})


def batch(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(3))


def test_import_does_not_touch_the_real_package_name_or_need_clip_and_datasets():
    mods = compat.import_imagereward()
    assert mods.ImageReward.__module__ == "_cdmbench_imagereward.ImageReward"
    code = (
        "import sys; from cdmbench.eval.metrics._imagereward_compat import import_imagereward; import_imagereward();"
        "bad = [m for m in ('ImageReward', 'clip', 'datasets', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    import transformers.modeling_utils as mu

    assert not hasattr(mu, "find_pruneable_heads_and_indices")  # the shims were removed after import


def test_invert_attention_mask_and_get_head_mask_have_transformers4_semantics():
    holder = type("H", (), {"dtype": torch.float32})()
    mask = torch.tensor([[1, 1, 0]])
    ext = compat.invert_attention_mask(holder, mask)
    assert ext.shape == (1, 1, 1, 3)
    assert ext[0, 0, 0, :2].eq(0).all() and ext[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert compat.get_head_mask(holder, None, 3) == [None, None, None]
    assert compat.get_head_mask(holder, torch.ones(4), 3).shape == (3, 1, 4, 1, 1)


def test_vit_spec_is_read_from_checkpoint_shapes(tiny_ir):
    model, _ = tiny_ir
    assert compat.vit_spec_from_state_dict(model.state_dict()) == TINY_VIT
    with pytest.raises(CdmbenchError, match="not an ImageReward checkpoint"):
        compat.vit_spec_from_state_dict({"mlp.layers.0.weight": torch.zeros(1)})


def test_tokenizer_from_vocab_file_and_folder(tiny_ir, tmp_path):
    _, d = tiny_ir
    tok = compat.load_bert_tokenizer(d / "vocab.txt")
    assert len(tok) == len(VOCAB) + 2 and tok.enc_token_id == len(VOCAB) + 1
    assert tok("A Red circle")["input_ids"] == [2, VOCAB.index("a"), VOCAB.index("red"), VOCAB.index("circle"), 3]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text((d / "vocab.txt").read_text())
    assert len(compat.load_bert_tokenizer(tmp_path / "bert")) == len(tok)


def test_a_special_tokens_only_tokenizer_fails_clearly(tiny_ir, tmp_path):
    _, d = tiny_ir
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB[:5]) + "\n")  # what from_pretrained gives offline
    with pytest.raises(MissingWeightsError, match=f"has 7 tokens .* expects vocab_size={len(VOCAB) + 2}") as e:
        build_metric("imagereward", options=options(d, bert_tokenizer_path=str(tmp_path / "vocab.txt")))
    assert "\n" not in str(e.value)


def test_metric_equals_the_package_score_through_the_local_path_loader(tiny_ir):
    model, d = tiny_ir
    m = build_metric("imagereward", options=options(d))
    assert m.protocol == "imagereward-v1.0|blip|ckpt=ImageReward.pt|score=z-normalised reward"
    imgs = batch()
    m.update(imgs[:3], PROMPTS[:3])
    m.update(imgs[3:], PROMPTS[3:])
    r = m.compute()
    want = [model.score(p, im) for p, im in zip(PROMPTS, to_pil(imgs))]  # image-reward's own API
    np.testing.assert_allclose(r.per_image, want, rtol=1e-4, atol=1e-5)
    assert r.n == 4 and np.ptp(r.per_image) > 1e-3


def test_checkpoint_missing_weights_is_an_error(tiny_ir, tmp_path):
    model, d = tiny_ir
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("mlp.")}
    torch.save(sd, tmp_path / "ImageReward.pt")
    with pytest.raises(CdmbenchError, match="lacks 10 ImageReward weights"):
        build_metric("imagereward", options=options(d, imagereward_path=str(tmp_path / "ImageReward.pt")))


def test_missing_weights_offline_are_one_line_errors(tiny_ir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    _, d = tiny_ir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/ImageReward
    for v in ("CDMBENCH_IMAGEREWARD_PATH", "CDMBENCH_IMAGEREWARD_MED_CONFIG", "CDMBENCH_BERT_TOKENIZER_PATH"):
        monkeypatch.delenv(v, raising=False)
    cases = [
        (MetricOptions(), "ImageReward weights ImageReward.pt .*THUDM/ImageReward.*CDMBENCH_IMAGEREWARD_PATH"),
        (options(d, imagereward_med_config=None), "med_config.json"),
        (options(d, bert_tokenizer_path=None), "bert-base-uncased.*CDMBENCH_BERT_TOKENIZER_PATH"),
        (options(d, imagereward_path=str(tmp_path / "x.pt")), "not found at"),
    ]
    for opts, pattern in cases:
        with pytest.raises(MissingWeightsError, match=pattern) as e:
            build_metric("imagereward", options=opts)
        assert "\n" not in str(e.value)


def test_missing_package_is_a_one_line_import_error(monkeypatch):
    monkeypatch.setattr(compat, "import_imagereward", compat.import_imagereward.__wrapped__)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ImageReward" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps image-reward==1.5 fairscale==0.4.13") as e:
        build_metric("imagereward")
    assert isinstance(e.value, CdmbenchError)


@pytest.mark.slow
def test_full_size_random_imagereward_scores(tmp_path):
    """ViT-L + 12-layer BERT (the real architecture, random weights): ~1.3 GB, seconds per image."""
    vocab = VOCAB + [f"w{i}" for i in range(30522 - len(VOCAB))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = {**med_config(30524), "num_hidden_layers": 12, "intermediate_size": 3072, "max_position_embeddings": 512}
    (tmp_path / "med_config.json").write_text(json.dumps(cfg))
    model = compat.build_imagereward(tmp_path / "med_config.json", compat.load_bert_tokenizer(tmp_path / "vocab.txt"))
    torch.save(model.state_dict(), tmp_path / "ImageReward.pt")
    m = build_metric("imagereward", options=options(tmp_path))
    m.update(batch(2), PROMPTS[:2])
    assert np.isfinite(m.compute().per_image).all()
