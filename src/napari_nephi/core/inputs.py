"""Checks and conversions of user images before any engine sees them."""

from __future__ import annotations

import warnings

import numpy as np

from .errors import DimensionMismatchError, InputError

RGB_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)  # as skimage.color.rgb2gray


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """Luminance of an RGB(A) image with channels last (alpha ignored), float32."""
    img = np.asarray(image)
    if img.ndim < 3 or img.shape[-1] not in (3, 4):
        raise InputError(f"Expected an RGB(A) image with channels last, got shape {img.shape}.")
    rgb = img[..., :3].astype(np.float32)
    if img.dtype == np.uint8:
        rgb /= 255.0
    return rgb @ RGB_WEIGHTS


def prepare_image(
    image, name: str = "image", rgb: bool | None = None, notes: list | None = None
) -> np.ndarray:
    """Return a float32 copy of ``image`` fit for registration, or raise :class:`InputError`.

    ``rgb=True`` converts channels-last RGB(A) to grayscale; ``rgb=None`` does so only for
    2D uint8 arrays shaped ``(y, x, 3|4)`` and records a note; ``rgb=False`` never converts.
    """
    if image is None:
        raise InputError(f"No {name} image given.")
    arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(f"The {name} image must be numeric, got dtype {arr.dtype}.")
    if arr.size == 0:
        raise InputError(f"The {name} image is empty (shape {arr.shape}).")
    looks_rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8
    if rgb or (rgb is None and looks_rgb):
        arr = to_grayscale(arr)
        msg = f"The {name} image was RGB; it was converted to grayscale (luminance) for registration."
        warnings.warn(msg, UserWarning, stacklevel=3)
        if notes is not None:
            notes.append(msg)
    arr = np.array(arr, dtype=np.float32, copy=True)
    if arr.ndim not in (2, 3):
        raise InputError(
            f"The {name} image must be 2D (y, x) or 3D (z, y, x), got {arr.ndim}D shape {arr.shape}. "
            "For channels, pick one channel or pass rgb=True for RGB images."
        )
    if min(arr.shape) < 4:
        raise InputError(f"The {name} image {arr.shape} is too small; every axis needs 4 voxels or more.")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(
            f"The {name} image holds {bad} NaN or infinite values; fill or mask them before registering."
        )
    if float(arr.max()) == float(arr.min()):
        raise InputError(
            f"The {name} image is constant (every voxel is {float(arr.min())}); there is nothing to align."
        )
    return arr


def normalize_intensity(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale to [0, 1] between percentiles, clipping outliers."""
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
    out = np.array(image, dtype=np.float32, copy=True)  # float32 in place: no float64 temporaries
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return np.clip(out, 0, 1, out=out)


def check_pair(fixed: np.ndarray, moving: np.ndarray) -> None:
    if fixed.ndim != moving.ndim:
        raise DimensionMismatchError(
            f"Fixed image is {fixed.ndim}D {fixed.shape} but moving image is {moving.ndim}D "
            f"{moving.shape}; both must be 2D or both 3D."
        )


def prepare_mask(mask, shape, name: str = "mask") -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise DimensionMismatchError(f"The {name} has shape {m.shape} but its image has {tuple(shape)}.")
    m = m.astype(bool)
    if not m.any():
        raise InputError(f"The {name} is empty; draw or load a mask that covers the tissue.")
    return m
