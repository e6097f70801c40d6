"""Math shared by every engine: grids, warping, transforms, Jacobians, similarity, progress.

Plain torch and numpy; nothing here imports Qt or napari.
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
from .registration import Registration, available_methods, register, register_engine
from .transform import (
    AffineTransform,
    ComposedTransform,
    DisplacementTransform,
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
    "IdentityTransform",
    "InputError",
    "OutOfMemoryError",
    "PerSectionTransform",
    "Progress",
    "ProgressEvent",
    "Registration",
    "RegistrationError",
    "Transform",
    "UnsupportedFileError",
    "available_methods",
    "fold_statistics",
    "jacobian_determinant",
    "load_transform",
    "register",
    "register_engine",
    "save_transform",
]
