"""Registration engines. Importing this package registers every built-in engine.

The registry (``register_engine``, ``available_methods``, ``register``) is in :mod:`.registry`.
"""

from . import affine, mito, nephi  # noqa: F401
from .histology import engine as _histology_engine  # noqa: F401
from .registry import available_methods, method_descriptions, register, register_engine

__all__ = ["available_methods", "method_descriptions", "register", "register_engine"]
