"""Math shared by every engine: grids, warping, transforms, Jacobians, similarity, progress.

Plain torch and numpy; nothing here imports Qt, napari or an engine (the engine registry and
``register()`` live in :mod:`napari_nephi.engines.registry`).
"""

from .errors import (
    Cancelled,
    DimensionMismatchError,
    InputError,
    OutOfMemoryError,
    RegistrationError,
    UnsupportedFileError,
)
from .jacobian import fold_statistics, jacobian_determinant
from .progress import Progress, ProgressEvent
from .registration import Pair, Registration
from .transform import (
    AffineTransform,
    ComposedTransform,
    DisplacementTransform,
    ElasticSectionTransform,
    IdentityTransform,
    PerSectionTransform,
    Transform,
)
from .transform_io import load_transform, save_transform

__all__ = [
    "AffineTransform",
    "Cancelled",
    "ComposedTransform",
    "DimensionMismatchError",
    "DisplacementTransform",
    "ElasticSectionTransform",
    "IdentityTransform",
    "InputError",
    "OutOfMemoryError",
    "PerSectionTransform",
    "Pair",
    "Progress",
    "ProgressEvent",
    "Registration",
    "RegistrationError",
    "Transform",
    "UnsupportedFileError",
    "fold_statistics",
    "jacobian_determinant",
    "load_transform",
    "save_transform",
]
