"""napari-nephi: interactive image registration for napari.

``napari_nephi.register(fixed, moving, method=...)`` is the one entry point; see DESIGN.md.
"""

try:
    from ._version import version as __version__
except ImportError:  # not installed from a git checkout
    __version__ = "0.0.0"

from .core import (
    AffineTransform,
    Cancelled,
    ComposedTransform,
    DimensionMismatchError,
    DisplacementTransform,
    ElasticSectionTransform,
    InputError,
    OutOfMemoryError,
    PerSectionTransform,
    Registration,
    RegistrationError,
    Transform,
    UnsupportedFileError,
    load_transform,
)
from .engines.mito import align_stack
from .engines.registry import available_methods, method_descriptions, register, register_engine

__all__ = [
    "AffineTransform",
    "AtlasLookup",
    "Cancelled",
    "ComposedTransform",
    "DimensionMismatchError",
    "DisplacementTransform",
    "ElasticSectionTransform",
    "InputError",
    "OutOfMemoryError",
    "PerSectionTransform",
    "Registration",
    "RegistrationError",
    "Transform",
    "UnsupportedFileError",
    "__version__",
    "align_stack",
    "available_methods",
    "load_transform",
    "method_descriptions",
    "register",
    "register_engine",
]


def __getattr__(name: str):
    # AtlasLookup is imported on first use, so ``import napari_nephi`` stays light.
    if name == "AtlasLookup":
        from .engines.atlas.lookup import AtlasLookup

        return AtlasLookup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
