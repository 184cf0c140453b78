"""The method protocol (style.md principle 1; FastGen ``single_train_step`` + ``get_optimizers``).

A method is one small class in one file. It owns its networks (``nets``: the student and any
auxiliary players), says which of them step on which iteration (``optimizers_for``), does one
iteration in ``train_step`` — calling ``update(name, loss)`` for each optimiser step, in the order the
algorithm needs — and samples with ``sample(noise, cond, steps)``. The loop does the mechanics
(backward, clipping, NaN guard, EMA, checkpoints, logs) and never looks at which method it runs.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from cdmbench.backbones.base import Backbone, Cond
from cdmbench.errors import CdmbenchError
from cdmbench.sampling import Denoiser, Schedule, sample_euler


@dataclass(frozen=True)
class OptimSpec:
    """AdamW settings of one trainable network."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    warmup: int = 0  # linear warm-up steps of this optimiser (its own step count)


@dataclass
class Batch:
    """One iteration's data. ``shared_seed`` is identical on every process (rank-agreeing choices such
    as CDM's rollout length); everything else may differ per process."""

    prompts: list[str]
    cond: Cond
    shared_seed: int

    @property
    def size(self) -> int:
        return len(self.prompts)

    def shared_rng(self) -> random.Random:
        return random.Random(self.shared_seed)


@dataclass
class StepOutput:
    """``losses``: scalar tensors (detached) under the method's declared ``loss_keys``;
    ``logs``: health statistics (floats)."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, float] = field(default_factory=dict)


Update = Callable[[str, torch.Tensor], None]


@dataclass
class RunContext:
    """What ``Method.prepare`` may use: the run folder, the processes (``cdmbench.pairs.Processes``: rank,
    count, barrier) and whether to show progress."""

    run_dir: Path
    processes: Any
    progress: bool = False


class Method(ABC):
    """Base class; subclasses set ``Config`` (a frozen dataclass), ``loss_keys`` and implement the verbs."""

    name: ClassVar[str]
    Config: ClassVar[type]
    loss_keys: ClassVar[tuple[str, ...]]
    paper: ClassVar[str] = ""
    # Steps this method's student can be sampled with; None means any positive integer.
    supported_steps: ClassVar[tuple[int, ...] | None] = None
    # The config field that fixes the one step count a student is trained for (CD/PCM: phases), or None.
    # ``cdmbench bench`` trains such a method once per evaluated step count and reports it as one row.
    steps_field: ClassVar[str | None] = None
    # Per-backbone presets, only what is specific to this method there (learning rates, guidance, budget):
    # overrides of the method config and of TrainConfig ("train.<field>"). Precision, gradient
    # checkpointing and batch size are the backbone's ``training_defaults``.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, backbone: Backbone, config, *, training: bool = True, data_source=None,
                 prompt_source: Callable[[int, torch.Generator], list[str]] | None = None):
        """``training``: build the networks a run trains (False: the student alone, for sampling);
        ``data_source``: the run's real training data (``cdmbench.data.DataSource``) or None;
        ``prompt_source``: ``(n, generator) -> prompts``, the run's training prompts beyond the batch (None:
        the backbone's own). The training loop passes both; a subclass forwards ``**run`` to here."""
        if not isinstance(config, self.Config):
            raise CdmbenchError(f"{self.name} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.backbone = backbone
        self.config = config
        self.training = training
        self.data_source = data_source
        self.prompt_source = prompt_source
        why = self.needs_data() if training else None
        if why:
            from cdmbench.data import require_data

            require_data(data_source, f"{self.name} ({why})", backbone.name)
        self.nets: dict[str, nn.Module] = {"student": backbone.trainable_copy()}
        if not training:
            self.nets["student"].eval().requires_grad_(False)

    # -- training -------------------------------------------------------------------------------
    @abstractmethod
    def optim_specs(self) -> dict[str, OptimSpec]:
        """One AdamW per trainable network, keyed like ``nets``."""

    @abstractmethod
    def optimizers_for(self, step: int) -> tuple[str, ...]:
        """Names of the networks whose optimiser steps at iteration ``step`` (two-time-scale rules)."""

    @abstractmethod
    def train_step(self, batch: Batch, step: int, update: Update) -> StepOutput:
        """One iteration; call ``update(name, loss)`` once per network in ``optimizers_for(step)``."""

    def needs_data(self) -> str | None:
        """Why this configuration trains on real images (e.g. "gan_weight > 0"), or None if it needs none.
        A method that needs data on a backbone without any fails at construction, in one line."""
        return None

    def prepare(self, run) -> None:
        """One-off work before the first iteration (and again on resume), e.g. a pair set stored in the run
        folder. ``run``: a ``RunContext`` (folder, processes, progress)."""

    def after_update(self, name: str) -> None:
        """Hook after network ``name`` stepped (e.g. CDM merges the student into the fake score)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Method state beyond networks/optimisers that a resume needs (e.g. cached pairs)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def draw_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        """Training prompts beyond the batch (the run's prompt file, else the backbone's own source)."""
        return (self.prompt_source or self.backbone.train_prompts)(n, generator)

    # -- sampling -------------------------------------------------------------------------------
    def schedule(self, steps: int) -> Schedule:
        """The student's σ grid for ``steps`` (nominal 1 − k/steps, shifted by the backbone)."""
        self.check_steps(steps)
        return self.backbone.schedule(steps)

    def check_steps(self, steps: int) -> None:
        if self.supported_steps is not None and steps not in self.supported_steps:
            raise CdmbenchError(
                f"{self.name} cannot sample with {steps} steps; supported: {', '.join(map(str, self.supported_steps))}"
            )

    stochastic_sampling: ClassVar[bool] = False  # DMD2-style x̂0 → fresh-noise re-noising

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Cond, steps: int, rng=None) -> torch.Tensor:
        """Few-step generation with the student at guidance 1 (no CFG): latents at σ = 0."""
        schedule = self.schedule(steps)
        den = Denoiser(self.backbone, self.nets["student"], cond)
        return sample_euler(den, noise, schedule.sigmas(noise.device), stochastic=self.stochastic_sampling, rng=rng)

    def nfe(self, steps: int) -> int:
        return steps

    # -- helpers shared by methods ----------------------------------------------------------------
    def v(self, net_name_or_module, x, sigma, cond) -> torch.Tensor:
        """Velocity of a network (by name in ``nets`` or the teacher module) in fp32."""
        net = self.nets[net_name_or_module] if isinstance(net_name_or_module, str) else net_name_or_module
        return self.backbone.velocity(net, x, sigma, cond).float()

    def teacher_cfg(self, x, sigma, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_uncond, v_cond) of the teacher at (x, σ) in one batched pass; CFG is v_u + g·(v_c − v_u)."""
        B = x.shape[0]
        return self.v(self.teacher, torch.cat([x, x]), torch.cat([sigma, sigma]),
                      self.backbone.uncond(B).cat(cond)).chunk(2)

    @property
    def teacher(self) -> nn.Module:
        return self.backbone.teacher
