"""Shared fixtures: offline, CPU, fixed seeds, the toy backbone built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# Under pytest-xdist (`-n N`) the workers share the cores: each gets its share of intra-op threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def toy():
    from cdmbench.backbones import build_backbone

    return build_backbone("toy")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Small per-method settings so one train step takes about a second on 2 cores.
TINY_METHOD_SETTINGS = {
    "cdm": {"warmup": "0", "max_rollout_steps": "3"},
    "ddmd": {"warmup": "0"},
    "dmd2": {"warmup": "0", "update_ratio": "2"},
    "dmd": {"warmup": "0", "num_pairs": "4", "pair_steps": "2"},
    "cd": {"warmup": "0"},
    "scm": {"num_pairs": "4", "pair_steps": "2", "tangent_warmup": "2"},
    "rcm": {"num_pairs": "4", "pair_steps": "2", "tangent_warmup": "0", "update_ratio": "2"},
}


def tiny_overrides(method: str, steps: int = 2, batch: int = 2, **extra) -> dict[str, str]:
    out = {"train.steps": str(steps), "train.batch_size": str(batch), "train.checkpoint_every": "1",
           "train.log_every": "1"}
    out.update(TINY_METHOD_SETTINGS.get(method, {}))  # a method without an entry runs its toy preset
    out.update({k: str(v) for k, v in extra.items()})
    return out
