"""Real training data (cdmbench.data): the three on-disk forms, pairing, sharding, resume, latent cache,
one-line errors; the toy's procedural source."""

import pytest
import torch

from cdmbench.data import ImageCaptionSource, ProceduralSource, build_data_source, require_data
from cdmbench.errors import CdmbenchError
from tiny_data import colour_of, make_image_caption_folder, make_webdataset_shards


def _index(caption: str) -> int:
    return int(caption.rsplit(" ", 1)[1])


def _check_pairs(batch, backbone):
    """Each latent is the encoding of its own caption's image (a flat colour)."""
    r = backbone.image_resolution
    for z, c in zip(batch.latents, batch.captions):
        colour = torch.tensor(colour_of(_index(c)), dtype=torch.float32) / 255
        want = backbone.encode_images(colour[None, :, None, None].expand(1, 3, r, r))[0]
        torch.testing.assert_close(z, want, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_caption_folder(tmp_path_factory.mktemp("data") / "pairs", n=6)


def test_image_folder_pairs_each_latent_with_its_caption(toy, folder):
    src = ImageCaptionSource(str(folder), toy, seed=0)
    b = src.next(4)
    assert b.latents.shape == (4, *toy.latent_shape) and b.latents.dtype == torch.float32
    _check_pairs(b, toy)
    assert src.describe()["examples"] == 6 and src.describe()["caption_column"] == "text"


def test_saved_dataset_and_webdataset_shards_give_the_same_pairs(toy, folder, tmp_path):
    import datasets

    ref = ImageCaptionSource(str(folder), toy, seed=0)
    datasets.load_dataset("imagefolder", data_dir=str(folder), split="train").save_to_disk(str(tmp_path / "saved"))
    shards = make_webdataset_shards(tmp_path / "wds", n=6, per_shard=4)
    specs = [str(tmp_path / "saved"), str(tmp_path / "wds"), ",".join(map(str, shards)), str(tmp_path / "wds" / "*.tar")]
    want = sorted(ImageCaptionSource(str(folder), toy, seed=0).next(6).captions)
    for spec in specs:
        src = ImageCaptionSource(spec, toy, seed=0)
        b = src.next(6)
        _check_pairs(b, toy)
        assert sorted(b.captions) == want, spec  # one epoch = every example once
    del ref


def test_processes_get_disjoint_shards_and_epochs_cover_the_data(toy, tmp_path):
    folder = make_image_caption_folder(tmp_path / "seven", n=7)
    a = ImageCaptionSource(str(folder), toy, seed=3, process_index=0, num_processes=2)
    b = ImageCaptionSource(str(folder), toy, seed=3, process_index=1, num_processes=2)
    ia, ib = a.indices(3), b.indices(3)
    assert not set(ia) & set(ib) and len(set(ia) | set(ib)) == 6  # 2·⌊7/2⌋ of 7 in epoch 0
    assert a.state_dict() == b.state_dict() == {"epoch": 1, "offset": 0, "num_processes": 2}
    ja, jb = a.indices(3), b.indices(3)  # epoch 1: a fresh permutation, again disjoint
    assert not set(ja) & set(jb) and len(set(ja) | set(jb)) == 6
    assert (ia, ib) != (ja, jb)


def test_resume_continues_with_the_next_unseen_example(toy, folder):
    full = ImageCaptionSource(str(folder), toy, seed=1)
    whole = full.indices(10)  # crosses into epoch 1
    first = ImageCaptionSource(str(folder), toy, seed=1)
    head = first.indices(4)
    resumed = ImageCaptionSource(str(folder), toy, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.indices(6) == whole


def test_latent_cache_is_written_once_and_read_back(toy, folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    src = ImageCaptionSource(str(folder), toy, seed=0, cache_dir=str(cache))
    first = src.next(6)
    files = list(cache.rglob("*.safetensors"))
    assert len(files) == 6
    again = ImageCaptionSource(str(folder), toy, seed=0, cache_dir=str(cache))
    monkeypatch.setattr(type(toy), "encode_images", lambda self, x: pytest.fail("encoded a cached image"))
    second = again.next(6)
    torch.testing.assert_close(first.latents, second.latents)
    assert first.captions == second.captions


def test_bad_data_specs_are_one_clear_line(toy, tmp_path, folder):
    (tmp_path / "empty").mkdir()
    for spec, words in [(str(tmp_path / "nope"), "does not exist"), (str(tmp_path / "empty"), "not an image-caption"),
                        (str(tmp_path / "x*.tar"), "no webdataset shard")]:
        with pytest.raises(CdmbenchError, match=words) as e:
            ImageCaptionSource(spec, toy, seed=0)
        assert "\n" not in str(e.value)
    with pytest.raises(CdmbenchError, match="data_caption_column='nope' is not a column; valid: image, text"):
        ImageCaptionSource(str(folder), toy, seed=0, caption_column="nope")
    with pytest.raises(CdmbenchError, match="at least one per process"):
        ImageCaptionSource(str(folder), toy, seed=0, process_index=0, num_processes=7)


def test_toy_source_is_the_procedural_generator_and_resumes(toy):
    src = build_data_source(toy, spec=None, seed=5)
    assert isinstance(src, ProceduralSource)
    a = src.next(3)
    state = src.state_dict()
    b = src.next(3)
    again = build_data_source(toy, spec=None, seed=5)
    again.load_state_dict(state)
    torch.testing.assert_close(again.next(3).latents, b.latents)
    assert a.latents.shape == (3, *toy.latent_shape) and not torch.equal(a.latents, b.latents)
    # latents of images: decoding and re-encoding moves them little (about 0.03 mean abs, latents ~0.6)
    assert float((toy.encode_images(toy.decode(a.latents)) - a.latents).abs().mean()) < 0.1


def test_a_method_without_data_fails_in_one_line():
    with pytest.raises(CdmbenchError, match=r"dmd2 \(gan_weight > 0\) needs real training images, and backbone "
                                            r"'sd3' has none: pass --set train.data=PATH") as e:
        require_data(None, "dmd2 (gan_weight > 0)", "sd3")
    assert "\n" not in str(e.value)
