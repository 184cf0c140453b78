"""A fixed set of teacher ODE (noise, sample) pairs, generated once per run and stored in the run folder.

Vanilla DMD's regression loss (baselines.md A1.3) needs it. Pair ``j`` is a pure function of
(seed, j, prompt j): its noise comes from ``StackedGenerator`` keyed by the pair index, so the set does not
depend on the number of processes or the batch size. Generation is sharded: process r of w makes pairs
r, r+w, … (a progress bar on the main process), writes its part, and the main process joins the parts into
``<run>/pairs/pairs.safetensors`` (samples in fp16, as baselines.md A1.3 suggests) with ``pairs.json``
(prompts, settings, who generated how many). Checkpoints do not hold the pairs; a resumed run reads the file
back, and a file made with other settings is an error. The noise is not stored: it is drawn again from its key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cdmbench.errors import CdmbenchError

PAIRS_DIR = "pairs"


@dataclass
class PairSet:
    """``samples`` (n, *latent_shape) fp16 on the CPU; ``prompts`` (n,); ``noise(j)`` redraws pair noise."""

    samples: torch.Tensor
    prompts: list[str]
    seed: int
    latent_shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def noise(self, idx: list[int], device) -> torch.Tensor:
        return pair_noise(self.seed, idx, self.latent_shape, device)


def pair_noise(seed: int, idx: list[int], shape: tuple[int, ...], device) -> torch.Tensor:
    from cdmbench.seeding import StackedGenerator

    return StackedGenerator.for_samples([(f"pair:{seed}", int(j)) for j in idx]).randn(shape, device=device)


@dataclass
class Processes:
    """What sharded one-off work needs from the launcher (accelerate): rank, world size, a barrier."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _settings(backbone, prompts: list[str], steps: int, guidance: float, seed: int) -> dict:
    return {"num_pairs": len(prompts), "steps": steps, "guidance": guidance, "seed": seed,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "backbone": json.loads(json.dumps(backbone.describe(), default=str))}


@torch.no_grad()
def _generate(backbone, prompts: list[str], idx: list[int], *, steps: int, guidance: float, seed: int,
              batch_size: int, progress: bool) -> torch.Tensor:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cdmbench.sampling import Denoiser, sample_euler

    sched = backbone.schedule(steps)
    out = []
    bar = Progress(TextColumn("[bold]teacher pairs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task("pairs", total=len(idx))
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo:lo + batch_size]
            z = pair_noise(seed, chunk, backbone.latent_shape, backbone.device)
            cond = backbone.encode_prompts([prompts[j] for j in chunk])
            den = Denoiser(backbone, backbone.teacher, cond, backbone.uncond(len(chunk)), guidance)
            out.append(sample_euler(den, z, sched.sigmas(backbone.device)).to("cpu", torch.float16))
            bar.update(task, advance=len(chunk))
    return torch.cat(out) if out else torch.empty(0, *backbone.latent_shape, dtype=torch.float16)


def teacher_pair_set(backbone, prompts: list[str], *, steps: int, guidance: float, seed: int, run_dir: str | Path,
                     processes: Processes = Processes(), batch_size: int = 16, progress: bool = True) -> PairSet:
    """The run's pair set: read from ``<run_dir>/pairs`` if there, else generated (sharded) and written there."""
    from cdmbench.io import load_safetensors, save_safetensors, write_json

    folder = Path(run_dir) / PAIRS_DIR
    want = _settings(backbone, prompts, steps, guidance, seed)
    final, record = folder / "pairs.safetensors", folder / "pairs.json"
    if not (final.is_file() and record.is_file()):
        r, w = processes.index, processes.count
        mine = list(range(r, len(prompts), w))
        part = _generate(backbone, prompts, mine, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                         progress=progress and processes.is_main)
        save_safetensors({"samples": part}, folder / f"part-{r:03d}-of-{w:03d}.safetensors")
        processes.barrier()
        if processes.is_main:
            samples = torch.empty(len(prompts), *backbone.latent_shape, dtype=torch.float16)
            made = {}
            for k in range(w):
                p = folder / f"part-{k:03d}-of-{w:03d}.safetensors"
                samples[k::w] = load_safetensors(p)["samples"]
                made[str(k)] = len(range(k, len(prompts), w))
            save_safetensors({"samples": samples}, final)
            write_json(record, {**want, "prompts": prompts, "generated_by_process": made})
            for k in range(w):
                (folder / f"part-{k:03d}-of-{w:03d}.safetensors").unlink()
        processes.barrier()
    held = json.loads(record.read_text())
    if {k: held.get(k) for k in want} != want:
        diff = sorted(k for k in want if held.get(k) != want[k])
        raise CdmbenchError(f"{folder}: the stored teacher pairs were made with other settings ({', '.join(diff)}); "
                            f"use a new run folder or delete {folder}")
    return PairSet(load_safetensors(final)["samples"], list(held["prompts"]), seed, tuple(backbone.latent_shape))
