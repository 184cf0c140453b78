"""A run: its resolved configuration (``RunConfig``) and its folder (``RunDir``).

Training writes a run folder, eval, export and bench read it; they go through ``RunDir``, the one place
that knows the layout (what may start or resume in a folder is ``cdmbench.resume``'s decision) (EDM's run dir with ``training_options.json``). Runs live in
``WORKSPACE/runs/NAME``::

    RUN/config.json                     the resolved RunConfig (+ world_size), written before training starts
    RUN/checkpoints/step_NNNNNNN/       one folder per checkpoint (``cdmbench.checkpoint``): a safetensors file
                                        per network (student, student_ema, players), training_state.pt, meta.json
    RUN/checkpoints/latest              the name of the newest complete checkpoint folder
    RUN/pairs/                          teacher ODE pair sets some methods make once per run (``cdmbench.pairs``)
    RUN/metrics.csv                     the health log (step, key, value)
    RUN/compute.json                    compute totals (passes, TFLOPs, minutes) at the latest checkpoint
    RUN/tensorboard/cdmbench/           accelerate trackers: the same scalars, sample grids, the config as hparams
    RUN/done.json                       the finished marker: steps, final checkpoint, train minutes

Compute totals: every checkpoint's ``meta.json`` holds the training minutes (and compute) so far, which
accumulate across resumes; ``done.json`` holds the totals of a finished run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdmbench.backbones.base import BackboneOptions
from cdmbench.config import TrainConfig, apply_overrides, from_jsonable, to_jsonable
from cdmbench.errors import CdmbenchError
from cdmbench.io import read_json, write_json

# ------------------------------------------------------------------------------------------------
# Resolved run configuration


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` in the run folder."""

    method: str
    arch: str
    method_config: Any
    train: TrainConfig
    backbone: BackboneOptions

    def to_dict(self) -> dict:
        import torch

        import cdmbench

        return {"method": self.method, "arch": self.arch, "method_config": to_jsonable(self.method_config),
                "train": to_jsonable(self.train), "backbone": to_jsonable(self.backbone),
                "cdmbench_version": cdmbench.__version__, "torch": torch.__version__}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        from cdmbench.methods import METHODS

        m = METHODS.get(d["method"])
        return cls(d["method"], d["arch"], from_jsonable(m.Config, d["method_config"]),
                   from_jsonable(TrainConfig, d["train"]), from_jsonable(BackboneOptions, d["backbone"]))


def resolve_config(method: str, arch: str, overrides: dict[str, str] | None = None,
                   backbone_options: BackboneOptions | None = None) -> RunConfig:
    """Method defaults × the backbone's training defaults × the method's preset for ``arch`` × the launch's mixed
    precision × user overrides.

    The backbone says what is a fact of the backbone (precision, gradient checkpointing, batch: its
    ``training_defaults``); the method's preset says what is specific to the method on that backbone
    (learning rates, guidance, budget). Both are defaults: ``accelerate launch --mixed_precision`` (or the
    accelerate config, ``cdmbench.accel.launch_mixed_precision``) overrides their precision, and an explicit
    ``train.mixed_precision`` override wins over the launch. Keys: ``train.<field>`` (TrainConfig), ``backbone.<field>``
    (BackboneOptions), anything else a field of the method's config.
    """
    from cdmbench.backbones import BACKBONES
    from cdmbench.methods import METHODS

    m = METHODS.get(method)
    backbone_cls = BACKBONES.get(arch)  # fails early on an unknown arch
    from cdmbench.accel import launch_mixed_precision

    launch = launch_mixed_precision()
    merged = {**backbone_cls.training_defaults, **m.presets.get(arch, {}),
              **({"train.mixed_precision": launch} if launch else {}), **(overrides or {})}
    groups: dict[str, dict] = {"train": {}, "backbone": {}, "method": {}}
    for k, v in merged.items():
        head, _, rest = k.partition(".")
        if rest and head in ("train", "backbone"):
            groups[head][rest] = v
        else:
            groups["method"][k] = v
    return RunConfig(
        method, arch,
        apply_overrides(m.Config(), groups["method"]),
        apply_overrides(TrainConfig(), groups["train"], prefix="train."),
        apply_overrides(backbone_options or BackboneOptions(), groups["backbone"], prefix="backbone."),
    )


# ------------------------------------------------------------------------------------------------
# The run folder

RUNS = "runs"  # a workspace's folder of run folders (WORKSPACE/runs/NAME)


class RunDir:
    """The folder of one run (layout in the module docstring). Reading a field never writes anything."""

    CONFIG = "config.json"  # = cdmbench.resume.CONFIG
    FINISHED = "done.json"  # = cdmbench.resume.FINISHED
    METRICS = "metrics.csv"
    COMPUTE = "compute.json"  # compute totals at the latest checkpoint (``cdmbench.compute``)
    TENSORBOARD = "tensorboard"
    STUDENT_EMA = "student_ema"  # the student's EMA weights in each checkpoint (what eval and export use)
    STUDENT = "student"  # the optimised (raw) student weights

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def named(cls, workspace: str | Path, name: str) -> "RunDir":
        """The folder of run ``name`` in a workspace: ``WORKSPACE/runs/NAME`` (it need not exist yet)."""
        return cls(Path(workspace) / RUNS / name)

    @classmethod
    def find(cls, run: str | Path, workspace: str | Path) -> "RunDir":
        """A run folder given as a path, or a run name under ``WORKSPACE/runs``; it must hold a config."""
        rd = cls(run) if Path(run).is_dir() else cls.named(workspace, str(run))
        if not rd.exists:
            raise CdmbenchError(f"no run {str(run)!r}: {rd.path / cls.CONFIG} not found")
        return rd

    @classmethod
    def in_workspace(cls, workspace: str | Path) -> list["RunDir"]:
        """Every run folder (one with a config) under ``WORKSPACE/runs``, by name."""
        root = Path(workspace) / RUNS
        if not root.is_dir():
            return []
        return [cls(p) for p in sorted(root.iterdir()) if (p / cls.CONFIG).is_file()]

    # -- config ----------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        """Whether this is a run folder (it has a config.json)."""
        return (self.path / self.CONFIG).is_file()

    def config_dict(self) -> dict:
        return read_json(self.path / self.CONFIG, what="run config")

    def config(self) -> RunConfig:
        """The saved config; a missing, partial or invalid one is one ``CorruptStateError`` line naming the file."""
        from cdmbench.errors import CorruptStateError

        path = self.path / self.CONFIG
        fix = "restore it, or delete the run folder and train again"
        d = read_json(path, what="run config", fix=fix)
        try:
            return RunConfig.from_dict(d)
        except CdmbenchError as e:
            raise CorruptStateError(f"run config {path} is invalid ({e}); {fix}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptStateError(f"run config {path} is incomplete or invalid ({type(e).__name__}: {e}); "
                                    f"{fix}") from None

    def write_config(self, cfg: RunConfig, **extra: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / self.CONFIG, {**cfg.to_dict(), **extra})

    # -- checkpoints -----------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The checkpoint the ``latest`` pointer names (None before the first one)."""
        from cdmbench.checkpoint import latest_checkpoint

        return latest_checkpoint(self.path)

    def weights(self, checkpoint: Path | None = None, which: str = "ema") -> Path:
        """The student weights file (``which`` = "ema" or "raw") of ``checkpoint`` (default: the latest)."""
        if which not in ("ema", "raw"):
            raise CdmbenchError(f"weights must be 'ema' or 'raw', got {which!r}")
        ckpt = checkpoint or self.latest_checkpoint()
        if ckpt is None:
            raise CdmbenchError(f"run {self.path} has no checkpoint yet")
        path = Path(ckpt) / f"{self.STUDENT_EMA if which == 'ema' else self.STUDENT}.safetensors"
        if not path.is_file():
            raise CdmbenchError(f"run {self.name!r}: checkpoint {ckpt} has no {path.name}")
        return path

    @staticmethod
    def checkpoint_meta(checkpoint: Path) -> dict:
        """A checkpoint's meta.json: step, method, arch, training minutes so far."""
        return read_json(Path(checkpoint) / "meta.json")

    # -- the finished marker and compute totals ---------------------------------------------------
    @property
    def finished(self) -> bool:
        return (self.path / self.FINISHED).is_file()

    def finish(self, steps: int, checkpoint: Path | str, train_minutes: float, **extra: Any) -> None:
        """Write the finished marker (after the final checkpoint): the iterations done, the final checkpoint,
        the training minutes and ``extra`` (e.g. what stopped the run, its compute totals)."""
        write_json(self.path / self.FINISHED, {"steps": steps, "checkpoint": Path(checkpoint).name,
                                               "train_minutes": round(train_minutes, 3), **extra})

    def train_minutes(self) -> float | None:
        """Total training minutes of a finished run (None when unfinished or not recorded)."""
        if not self.finished:
            return None
        marker = read_json(self.path / self.FINISHED, what="finished marker")
        minutes = marker.get("train_minutes") if isinstance(marker, dict) else None
        return float(minutes) if isinstance(minutes, (int, float)) else None

    @property
    def metrics_csv(self) -> Path:
        return self.path / self.METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD
