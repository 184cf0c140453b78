"""Teacher pair sets (cdmbench.pairs): made once, sharded, stored in the run folder, read back on resume."""

import threading

import pytest
import torch

import cdmbench.pairs as pairs_mod
from cdmbench.errors import CdmbenchError
from cdmbench.pairs import Processes, teacher_pair_set

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow circle", "a large red square"]


def test_sharded_generation_makes_each_pair_once_and_equals_one_process(toy, tmp_path, monkeypatch):
    made = []
    real = pairs_mod._generate

    def counting(backbone, prompts, idx, **kw):
        made.extend(idx)
        return real(backbone, prompts, idx, **kw)

    monkeypatch.setattr(pairs_mod, "_generate", counting)
    one = teacher_pair_set(toy, PROMPTS, steps=2, guidance=2.0, seed=3, run_dir=tmp_path / "one", progress=False)
    assert sorted(made) == list(range(5))
    made.clear()
    barrier, out = threading.Barrier(2), {}

    def proc(r):
        out[r] = teacher_pair_set(toy, PROMPTS, steps=2, guidance=2.0, seed=3, run_dir=tmp_path / "two",
                                  processes=Processes(r, 2, barrier.wait), batch_size=2, progress=False)

    threads = [threading.Thread(target=proc, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(made) == list(range(5))  # each pair once in total
    for r in (0, 1):
        torch.testing.assert_close(out[r].samples, one.samples, rtol=0, atol=2e-3)  # batching: float rounding only
        assert out[r].prompts == PROMPTS
    record = (tmp_path / "two" / "pairs" / "pairs.json").read_text()
    assert '"0": 3' in record and '"1": 2' in record
    assert sorted(p.name for p in (tmp_path / "two" / "pairs").iterdir()) == ["pairs.json", "pairs.safetensors"]
    assert one.samples.dtype == torch.float16 and one.samples.shape == (5, *toy.latent_shape)
    torch.testing.assert_close(one.noise([1, 3], "cpu"), out[0].noise([1, 3], "cpu"))


def test_stored_pairs_are_read_back_and_must_match_the_settings(toy, tmp_path, monkeypatch):
    first = teacher_pair_set(toy, PROMPTS, steps=2, guidance=2.0, seed=3, run_dir=tmp_path, progress=False)
    monkeypatch.setattr(pairs_mod, "_generate", lambda *a, **k: pytest.fail("generated again"))
    again = teacher_pair_set(toy, PROMPTS, steps=2, guidance=2.0, seed=3, run_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.samples, first.samples)
    with pytest.raises(CdmbenchError, match=r"other settings \(guidance\)") as e:
        teacher_pair_set(toy, PROMPTS, steps=2, guidance=3.0, seed=3, run_dir=tmp_path, progress=False)
    assert "\n" not in str(e.value)
