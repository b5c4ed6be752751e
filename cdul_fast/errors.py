"""User-facing errors: the CLI prints these as one line and exits non-zero (traceback only with --debug)."""

from __future__ import annotations


class CdulError(Exception):
    """An error caused by input, configuration or environment that the user can fix."""

    exit_code = 2
    from_rank0 = False  # under torchrun: the error rank 0 met and printed, raised again on this rank to end it


class ConfigError(CdulError):
    """Bad flag, config value or combination of options."""


class DatasetError(CdulError):
    """A dataset root that does not have the expected official layout, or unreadable dataset files."""


class StoreError(CdulError):
    """A label store that is missing, torn, corrupted, locked or does not match the run."""


class StoreLockedError(StoreError):
    """A label store another process holds open (its advisory lock is taken)."""


class WeightsError(CdulError):
    """Model weights that are missing (e.g. offline), unreadable or do not fit the model."""


class ImageDecodeError(CdulError):
    """An image file that cannot be decoded."""


class DependencyError(CdulError):
    """A Python package the command needs is not installed (an incomplete or hand-pruned environment)."""
