"""The backbone adapter protocol: thin and uniform (style.md principle 3; k-diffusion ``external.py``).

A backbone owns the frozen teacher network, the prompt encoders and the decoder. Networks (teacher,
student, fake score) are plain ``nn.Module``s of one class; the adapter maps (x_σ, σ, cond) to that
class's call and returns a velocity v̂ with the flow-matching convention of cdm.md §1.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from cdmbench.errors import CdmbenchError
from cdmbench.sampling import Schedule, make_schedule, nominal_sigmas, static_shift
from cdmbench.types import Evaluators, Prompt


PROMPTS_HINT = "--set train.prompts=PATH (a .txt, .jsonl, .json, .csv or .tsv prompt file, as for eval)"


@dataclass
class Cond:
    """Encoded prompts. ``batched`` tensors have the batch on dim 0; ``shared`` ones (e.g. position ids)
    are the same for every sample."""

    batched: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.batched.values())).shape[0]

    def __getitem__(self, idx) -> "Cond":
        return Cond({k: v[idx] for k, v in self.batched.items()}, self.shared)

    def cat(self, *others: "Cond") -> "Cond":
        return Cond({k: torch.cat([self.batched[k], *(o.batched[k] for o in others)]) for k in self.batched}, self.shared)

    def repeat(self, n: int) -> "Cond":
        return Cond({k: v.repeat_interleave(n, 0) for k, v in self.batched.items()}, self.shared)

    def expand_to(self, batch_size: int) -> "Cond":
        """A batch-of-one Cond (e.g. the empty prompt) repeated to ``batch_size``."""
        if self.batch_size != 1:
            raise ValueError(f"expand_to needs a batch of one, got {self.batch_size}")
        return Cond({k: v.expand(batch_size, *v.shape[1:]) for k, v in self.batched.items()}, self.shared)

    def to(self, device=None, dtype=None) -> "Cond":
        def mv(t):
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return Cond({k: mv(v) for k, v in self.batched.items()}, {k: mv(v) for k, v in self.shared.items()})


@dataclass(frozen=True)
class BackboneOptions:
    """How to build a backbone; every backbone accepts these (unused ones must stay at their default)."""

    model: str | None = None  # hub id or local folder; None = the backbone's default
    device: str | None = None  # torch device; None = accelerate's choice (cdmbench.accel.select_device)
    dtype: str = "float32"  # float32 | bfloat16 | float16: weights of the frozen parts and the nets
    allow_remote_code: bool = False  # never run code from a model repository unless asked
    lora_rank: int = 0  # 0: full fine-tuning of trainable copies; >0: peft LoRA adapters of this rank
    lora_alpha: float = 0.0  # 0 means alpha = rank
    gradient_checkpointing: bool = False
    max_sequence_length: int | None = None  # text length for backbones that have one (SD3's T5)
    resolution: int | None = None  # square image side in pixels; None = the backbone's default

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise CdmbenchError(f"dtype must be one of float32, bfloat16, float16; got {self.dtype!r}")
        if self.lora_rank < 0:
            raise CdmbenchError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.resolution is not None and self.resolution <= 0:
            raise CdmbenchError(f"resolution must be a positive number of pixels, got {self.resolution}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class Backbone(ABC):
    """A frozen teacher plus its encoders/decoder, with one calling convention for every network.

    Subclasses set the class attributes and implement the abstract methods; ``register`` them in
    ``cdmbench.backbones``.
    """

    name: ClassVar[str]
    shift: ClassVar[float] = 1.0  # static scheduler shift applied to every nominal σ list
    default_guidance: ClassVar[float] = 1.0  # teacher CFG scale (standard form, 1 = none)
    default_teacher_steps: ClassVar[int] = 28
    # Training defaults that are facts of this backbone (precision, gradient checkpointing, batch), as
    # ``train.<field>`` / ``backbone.<field>`` settings; a method's preset and the user's --set go on top.
    training_defaults: ClassVar[dict[str, str]] = {}
    decodes_to_images: ClassVar[bool] = True
    # Whether ``train_prompts`` draws training prompts of its own (the toy's grammar); False: a run needs
    # ``train.prompts`` (checked before anything is built or written).
    has_train_prompts: ClassVar[bool] = False

    def __init__(self, options: BackboneOptions):
        self.options = options
        if options.device is None:
            from cdmbench.accel import select_device

            options = dataclasses.replace(options, device=select_device(None))
            self.options = options
        self.device = torch.device(options.device)
        self._uncond: Cond | None = None

    # -- the five verbs --------------------------------------------------------------------------
    @property
    @abstractmethod
    def teacher(self) -> nn.Module:
        """The frozen teacher network (eval mode, no grad)."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent (no batch dim)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Encode prompts with the frozen text encoder(s), no grad."""

    @abstractmethod
    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v̂(x_σ, σ, cond) of ``net`` (teacher, student or fake score); sigma is (B,) in [0, 1]."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images, float32 in [0, 1], (B, 3, H, W)."""

    def velocity_jvp(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, dx: torch.Tensor,
                     dsigma, *, mode="exact", fd_step: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """(v̂, ∂v̂ along (dx, dσ)) of ``net``, fp32, no grad; σ-tangent in σ units. Every backbone gets it from
        its ``velocity`` (``cdmbench.backbones.jvp``: exact forward-mode AD on the math attention kernel, or an
        explicit finite difference)."""
        from cdmbench.backbones.jvp import velocity_jvp

        return velocity_jvp(self, net, x, sigma, cond, dx, dsigma, mode=mode, fd_step=fd_step)

    # -- shared helpers ------------------------------------------------------------------------
    def uncond(self, batch_size: int) -> Cond:
        """The encoded empty prompt "" (not zeros), repeated to the batch."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand_to(batch_size)

    def shift_sigmas(self, nominal: list[float]) -> list[float]:
        """Nominal σ → effective σ as the backbone's scheduler would run them (cdm.md §1.1)."""
        return [float(static_shift(s, self.shift)) for s in nominal]

    def schedule(self, steps: int) -> Schedule:
        return make_schedule(nominal_sigmas(steps), self.shift_sigmas)

    def trainable_copy(self) -> nn.Module:
        """A trainable copy of the teacher (student / fake-score initialisation), fp32 master weights."""
        net = copy.deepcopy(self.teacher).float()
        net.train()
        net.requires_grad_(True)
        return net

    def net_state_dict(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """What is saved for a network: its full state dict on the CPU (LoRA backbones may save adapters only).

        ``net`` may be DDP-wrapped or FSDP2-sharded (a collective then: every process calls it; ranks other
        than 0 get ``{}``); see ``cdmbench.checkpoint.full_model_state``.
        """
        from cdmbench.checkpoint import full_model_state

        return full_model_state(net)

    def load_net_state(self, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a state from ``net_state_dict`` into ``net`` (plain, DDP-wrapped or FSDP2-sharded), strictly."""
        from cdmbench.checkpoint import load_full_model_state

        try:
            load_full_model_state(net, state)
        except CdmbenchError as e:
            raise CdmbenchError(f"{self.name}: {e}") from e

    def load_net(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A network of the teacher's class with ``state`` loaded strictly (a mismatch is an error)."""
        net = self.trainable_copy()
        self.load_net_state(net, state)
        net.eval().requires_grad_(False)
        return net

    def train_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        """Training prompts for data-free distillation (the toy draws captions from its grammar)."""
        raise CdmbenchError(f"backbone {self.name!r} needs a training prompt file: {PROMPTS_HINT}")

    # -- real training data (cdmbench.data) ------------------------------------------------------
    @property
    def image_resolution(self) -> int:
        """Side in pixels of the square images this backbone's latents decode to (and encode from)."""
        raise CdmbenchError(f"backbone {self.name!r} does not work on images of a fixed size")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images, float in [0, 1], (B, 3, r, r) with r = ``image_resolution`` → clean latents (B, *latent_shape)."""
        raise CdmbenchError(f"backbone {self.name!r} cannot encode images, so it cannot train on train.data")

    def data_source(self, *, seed: int, process_index: int = 0):
        """The backbone's own training data (a ``cdmbench.data.DataSource``) when ``train.data`` is not set;
        ``None``: it has none (methods that need real data then ask for ``train.data``)."""
        return None

    @classmethod
    def tiny(cls, workdir: Path) -> "Backbone":
        """A small instance without downloads for the contract checks (``cdmbench.testing.BACKBONE_CHECKS``);
        any files it needs (e.g. a tiny pipeline folder) go under ``workdir``."""
        raise NotImplementedError(f"{cls.__name__} has no tiny() test instance; the backbone contract tests need one")

    # -- what the eval layer scores this backbone's images with (style.md principle 16) -------------
    # Class methods: the harness asks before (and without) building the backbone.
    @classmethod
    def evaluators(cls) -> Evaluators:
        """The models this backbone's metrics use and the metrics that do not apply to its images.
        Nothing declared (the default, right for text-to-image photos and art): every metric uses its
        real default (clean-fid Inception, OpenAI CLIP, HPS, ImageReward), attribute accuracy does not apply."""
        return Evaluators()

    @classmethod
    def prompt_set(cls) -> list[Prompt] | None:
        """The bundled eval prompt set (``--prompts default``), or None when the backbone has none."""
        return None

    @classmethod
    def annotate_prompts(cls, prompts: list[Prompt]) -> list[Prompt]:
        """Prompts read from a file, with this backbone's metadata attached (``Prompt.meta``); default: as read."""
        return prompts

    def describe(self) -> dict[str, Any]:
        """What identifies this backbone in run configs and result rows."""
        return {"arch": self.name, "model": self.options.model, "shift": self.shift,
                "latent_shape": list(self.latent_shape), "dtype": self.options.dtype}

    # -- scale hints used by the training loop (FSDP wrap policy, LoRA targets) -------------------
    fsdp_block_classes: ClassVar[tuple[str, ...]] = ()
    lora_target_modules: ClassVar[tuple[str, ...]] = ()


def options_fields() -> list[str]:
    return [f.name for f in fields(BackboneOptions)]
