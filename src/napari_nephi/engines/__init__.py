"""Registration engines. Importing this package registers every built-in engine."""

from . import affine, mito  # noqa: F401
