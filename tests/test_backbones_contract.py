"""Adapter contract over every registered backbone (the real ones on tiny local pipelines)."""

import pytest
import torch

from cdmbench.backbones import BACKBONES, build_backbone
from cdmbench.backbones.base import BackboneOptions
from cdmbench.sampling import Denoiser, sample_euler
from cdmbench.seeding import StackedGenerator
from tiny_pipelines import SD3_RES, LONGCAT_RES, TEXT_LEN, tiny_longcat_dir, tiny_sd3_dir  # noqa: F401

PROMPTS = ["a small red circle in the top left", "a large blue square in the bottom right", "a green triangle",
           "a small yellow circle in the top right", "red", "a large green square in the bottom left",
           "a small blue triangle in the top left", "a yellow square"]


@pytest.fixture(scope="module", params=BACKBONES.names())
def backbone(request, tmp_path_factory):
    name = request.param
    if name == "toy":
        return build_backbone("toy")
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    res = {"sd3": SD3_RES, "longcat": LONGCAT_RES}[name]
    return build_backbone(name, BackboneOptions(model=str(folder), resolution=res, max_sequence_length=TEXT_LEN))


def test_shapes_and_dtypes(backbone):
    cond = backbone.encode_prompts(PROMPTS[:3])
    assert cond.batch_size == 3
    x = torch.randn(3, *backbone.latent_shape)
    v = backbone.velocity(backbone.teacher, x, torch.tensor([1.0, 0.5, 0.02]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    img = backbone.decode(x)
    assert img.dim() == 4 and img.shape[:2] == (3, 3) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert all(not p.requires_grad for p in backbone.teacher.parameters())


def test_uncond_is_the_encoded_empty_prompt(backbone):
    u, e = backbone.uncond(2), backbone.encode_prompts(["", ""])
    for k in e.batched:
        torch.testing.assert_close(u.batched[k], e.batched[k])


def test_trainable_copy_is_independent(backbone):
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


def test_same_seeds_same_images_at_batch_sizes_1_and_8(backbone):
    keys = [(f"p{i}", 7) for i in range(8)]
    sched = backbone.schedule(2)

    def generate(idx):
        rng = StackedGenerator.for_samples([keys[i] for i in idx])
        prompts = [PROMPTS[i] for i in idx]
        den = Denoiser(backbone, backbone.teacher, backbone.encode_prompts(prompts), backbone.uncond(len(idx)),
                       backbone.default_guidance)
        return sample_euler(den, rng.randn(backbone.latent_shape), sched.sigmas())

    full = generate(list(range(8)))
    for i in (0, 5):
        torch.testing.assert_close(generate([i])[0], full[i], atol=1e-5, rtol=1e-4)


def test_schedule_records_nominal_and_effective(backbone):
    s = backbone.schedule(4)
    assert s.nominal == (1.0, 0.75, 0.5, 0.25)
    assert len(s.effective) == 4 and s.effective[0] == pytest.approx(1.0)
    assert list(s.effective) == sorted(s.effective, reverse=True)
