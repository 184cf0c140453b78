"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class CdmbenchError(Exception):
    """Base class for errors caused by user input, missing weights or a failed guard."""


class UnknownNameError(CdmbenchError, KeyError):
    """A registry lookup with a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class MissingWeightsError(CdmbenchError):
    """Model weights that are not available locally (offline, or a wrong path)."""


class NonFiniteError(CdmbenchError):
    """Training produced NaN/inf; the last good checkpoint is kept."""


class CorruptStateError(CdmbenchError):
    """A file cdmbench wrote (run config, checkpoint, manifest, results) is missing, truncated or corrupt."""
