"""Per-sample randomness: a sample's identity is (prompt id, seed), never its batch position.

After NVlabs/edm ``generate.py::StackedRandomGenerator``: one CPU generator per sample, so image i gets
the same noise at any batch size or process count.
"""

from __future__ import annotations

import hashlib
import re

import torch

from cdmbench.errors import CdmbenchError
from cdmbench.paths import MAX_INT, MAX_LIST


def parse_int_list(text: str, *, name: str = "value", maximum: int = MAX_INT, max_count: int = MAX_LIST) -> list[int]:
    """Parse '1,2,4' or '0-3,8' into a list of ints (ranges are inclusive).

    Bounded before anything is built: every value must be <= ``maximum`` and the list at most ``max_count``
    long, so '0-99999999999999' is one clear error, not a list that fills the memory.
    """
    out: list[int] = []
    if text is None or not str(text).strip():
        raise CdmbenchError(f"--{name}: empty list; expected e.g. '1,2,4' or '0-15'")
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d{1,19})(?:-(\d{1,19}))?", part)
        if not m:
            raise CdmbenchError(f"--{name}: cannot parse {part!r}; expected non-negative integers like '1,2,4' or '0-15'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise CdmbenchError(f"--{name}: range {part!r} is empty")
        if hi > maximum:
            raise CdmbenchError(f"--{name}: {hi} is too large (at most {maximum})")
        if len(out) + (hi - lo + 1) > max_count:
            raise CdmbenchError(f"--{name}: {text!r} lists more than {max_count} values")
        out.extend(range(lo, hi + 1))
    if len(set(out)) != len(out):
        raise CdmbenchError(f"--{name}: {text!r} lists a value twice")
    return out


def sample_seed(prompt_id: str | int, seed: int) -> int:
    """A 63-bit seed derived from (prompt id, seed) alone."""
    h = hashlib.sha256(f"{prompt_id}|{seed}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class StackedGenerator:
    """One ``torch.Generator`` per sample; ``randn`` stacks per-sample draws along dim 0."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_samples(cls, keys: list[tuple[str | int, int]]) -> "StackedGenerator":
        return cls([sample_seed(pid, s) for pid, s in keys])

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        """Draw (len(self), *shape) in float32 on the CPU, then move."""
        x = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators])
        return x.to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == len(self), (x.shape, len(self))
        return self.randn(tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
