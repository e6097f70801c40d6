"""Errors a user can cause. Every message says what is wrong and what to do."""

from __future__ import annotations


class RegistrationError(Exception):
    """Base class for errors caused by input or settings, not by a bug."""


class InputError(RegistrationError, ValueError):
    """An image, mask, spacing or option is unusable (shape, NaN, empty, constant ...)."""


class DimensionMismatchError(InputError):
    """Fixed and moving (or image and transform) have different dimensionality."""


class UnsupportedFileError(RegistrationError, OSError):
    """A file cannot be read or written: unknown format, corrupt or truncated."""


class OutOfMemoryError(RegistrationError, MemoryError):
    """The computation does not fit in the memory of the chosen device."""


class Cancelled(RegistrationError):
    """The user cancelled a running registration."""
