"""Where a command runs and in which precision, as accelerate decides them (no silent fall-back to the CPU).

- Device: ``--cpu`` (or ``accelerate launch --cpu``, which sets ``ACCELERATE_USE_CPU``) forces the CPU; an explicit
  ``--device D`` must be present here; otherwise it is accelerate's choice, ``PartialState().device``: under
  ``accelerate launch`` / ``torchrun`` each process's own accelerator, in a single process the machine's
  accelerator, and the CPU only on a machine without one.
- Mixed precision: ``accelerate launch --mixed_precision X`` and the accelerate config file reach the process as
  ``ACCELERATE_MIXED_PRECISION``. It overrides the backbone's and the method's preset precision (those are
  defaults); a ``--set train.mixed_precision=X`` on the command line overrides it in turn.

The run's ``config.json`` records what ran: ``backbone.device`` and ``train.mixed_precision`` as accelerate set them.
"""

from __future__ import annotations

import os

from cdmbench.errors import CdmbenchError

PRECISIONS = ("no", "bf16", "fp16")
MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` from --mixed_precision / its config
USE_CPU_ENV = "ACCELERATE_USE_CPU"  # set by `accelerate launch --cpu`


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def select_device(device: str | None = None, *, cpu: bool = False, what: str = "--device") -> str:
    """The device this process runs on, as a torch device string.

    Args:
        device: an explicit device (``cpu``, ``cuda``, ``cuda:N``, ``mps`` …); None: accelerate's choice.
        cpu: force the CPU (``--cpu``); contradicting an explicit accelerator ``device`` is an error.
        what: the option named in errors.

    Returns ``"cpu"``, the accelerator's device of a single process (e.g. ``"cuda"``, or ``"cuda:1"`` when asked for),
    or the accelerator's type (``"cuda"``) under a multi-process launch, where each process takes its own index.

    Raises:
        CdmbenchError: an unknown device, one absent here (``--device cuda`` without CUDA), an index under a
            multi-process launch, or a device type accelerate does not run on here.
    """
    import torch

    from cdmbench.paths import check_device

    if device is not None:
        check_device(device, what)
        d = torch.device(str(device))
        if d.type == "cpu":
            return "cpu"
        if cpu or _flag(USE_CPU_ENV):
            raise CdmbenchError(f"{what} {device!r} contradicts --cpu (or `accelerate launch --cpu`); pass one of them")
    if cpu or _flag(USE_CPU_ENV):
        return "cpu"
    from accelerate import PartialState

    has_accelerator = torch.accelerator.is_available()
    # without cpu=True accelerate treats a CPU-only multi-process launch as N single processes
    state = PartialState(cpu=not has_accelerator)
    actual = state.device
    if device is not None:
        d = torch.device(str(device))
        if d.type != actual.type:
            raise CdmbenchError(f"{what} {device!r}: accelerate runs this process on {actual.type} here; "
                                f"pass --device {actual.type} or --cpu")
        if d.index is not None:
            if state.num_processes > 1:
                raise CdmbenchError(f"{what} {device!r}: under a multi-process launch each process takes its own "
                                    f"device; pass --device {d.type} (or no --device)")
            torch.get_device_module(d.type).set_device(d.index)
            return str(d)
    return actual.type if state.num_processes > 1 else str(actual)


def launch_mixed_precision() -> str | None:
    """The mixed precision ``accelerate launch`` (or its config file) asked for, or None outside a launch."""
    value = os.environ.get(MIXED_PRECISION_ENV, "").strip().lower()
    if not value:
        return None
    if value not in PRECISIONS:
        raise CdmbenchError(f"accelerate launch's mixed precision {value!r} ({MIXED_PRECISION_ENV}) is not supported; "
                            f"use one of {', '.join(PRECISIONS)}")
    return value
