"""Registration engines. Importing this package registers every built-in engine."""

from . import affine, mito, nephi  # noqa: F401
