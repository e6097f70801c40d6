"""Checks and conversions of user images before any engine sees them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .device import check_memory, memory_guard
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


#: An RGB(A) image's channel axis is at most this fraction of its two spatial axes.
RGB_MAX_RATIO = 0.25


def looks_rgb(shape: Sequence[int]) -> bool | None:
    """Whether an array of ``shape`` is a 2D RGB(A) image ``(y, x, 3|4)``, whatever its dtype.

    True when the last axis holds 3 or 4 values and the two others are each at least four times
    longer (an RGB picture); False when the last axis is not 3 or 4 long or the array is not 3D
    (a volume in napari order has its short axis, if any, first: ``(z, y, x)``); ``None`` when it
    cannot be told (e.g. ``(8, 12, 4)``: a tiny RGBA picture, or a volume only 4 voxels wide).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or shape[-1] not in (3, 4):
        return False
    if min(shape[:2]) * RGB_MAX_RATIO >= shape[-1]:
        return True
    return None


def prepare_image(
    image, name: str = "image", rgb: bool | None = None, notes: list | None = None
) -> np.ndarray:
    """Return a float32 copy of ``image`` fit for registration, or raise :class:`InputError`.

    ``rgb=True`` converts channels-last RGB(A) to grayscale (luminance, alpha ignored);
    ``rgb=False`` never converts. ``rgb=None`` converts, with a warning and a note in ``notes``,
    arrays that :func:`looks_rgb` (``(y, x, 3|4)`` with y and x at least four times longer than
    the channel axis, any dtype), and raises when the shape is ambiguous. The input is never
    modified.
    """
    if image is None:
        raise InputError(f"No {name} image given.")
    if rgb not in (None, True, False):
        raise InputError(f"rgb must be True, False or None (decide from the shape), got {rgb!r}.")
    with memory_guard(f"reading the {name} image"):
        arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(
            f"The {name} image must hold real numbers (bool, integer or float), got dtype {arr.dtype}."
        )
    if arr.size == 0:
        raise InputError(f"The {name} image is empty (shape {arr.shape}).")
    copies = 2 if rgb or (rgb is None and looks_rgb(arr.shape)) else 1  # luminance, then float32
    check_memory(
        4.0 * arr.size * copies,
        torch.device("cpu"),
        f"float32 copy of the {name} image {arr.shape}",
        "Downsample or crop the image first, or register a coarser level of its pyramid.",
    )
    if rgb is None:
        guess = looks_rgb(arr.shape)
        if guess is None:
            raise InputError(
                f"The {name} image has shape {arr.shape}: it may be a small RGB(A) picture or a volume "
                f"{arr.shape[-1]} voxels wide. Pass rgb=True to convert it to grayscale, or rgb=False "
                "to register it as a volume."
            )
        rgb = guess
    if rgb:
        with memory_guard(f"converting the {name} image to grayscale"):
            arr = to_grayscale(arr)
        msg = f"The {name} image was RGB; it was converted to grayscale (luminance) for registration."
        warnings.warn(msg, UserWarning, stacklevel=3)
        if notes is not None:
            notes.append(msg)
    with memory_guard(f"copying the {name} image"):
        arr = np.array(arr, dtype=np.float32, copy=True)
    if arr.ndim not in (2, 3):
        raise InputError(
            f"The {name} image must be 2D (y, x) or 3D (z, y, x), got {arr.ndim}D shape {arr.shape}. "
            "For channels, pick one channel or pass rgb=True for RGB images."
        )
    if min(arr.shape) < 4:
        raise InputError(
            f"The {name} image {arr.shape} is too small; every axis needs 4 voxels or more "
            "(a volume 4 slices or more)."
        )
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


def min_mask_voxels(ndim: int) -> int:
    """Fewest voxels a mask must cover: a 4-voxel-wide patch (16 in 2D, 64 in 3D)."""
    return 4**ndim


def prepare_mask(mask, shape: Sequence[int], name: str = "mask") -> np.ndarray | None:
    """A boolean copy of ``mask`` for an image of ``shape``, or ``None``; :class:`InputError` if unusable.

    A mask is boolean-like: ``bool``, integer labels (nonzero is inside, as a napari Labels layer
    painted with any label) or floats holding only 0 and 1. It must have the image's shape, hold no
    NaN and cover at least :func:`min_mask_voxels` voxels. The input is never modified.
    """
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype == object or m.dtype.kind not in "biuf":
        raise InputError(
            f"The {name} must be boolean-like (True/False, 0/1 or integer labels), got dtype {m.dtype}."
        )
    if m.shape != tuple(shape):
        raise DimensionMismatchError(
            f"The {name} has shape {m.shape} but its image has {tuple(shape)}; "
            "give a mask of the image's shape."
        )
    if m.dtype.kind == "f":
        if not np.all(np.isfinite(m)):
            raise InputError(
                f"The {name} holds NaN or infinite values; a mask is 0 (outside) and 1 (inside)."
            )
        if np.any((m != 0) & (m != 1)):
            raise InputError(
                f"The {name} must hold only 0 and 1 (or True/False), got values such as "
                f"{float(m[(m != 0) & (m != 1)].flat[0])}; threshold it first (e.g. mask > 0.5)."
            )
    m = m.astype(bool)
    covered = int(np.count_nonzero(m))
    if covered == 0:
        raise InputError(f"The {name} is empty; draw or load a mask that covers the tissue.")
    need = min_mask_voxels(len(shape))
    if covered < need:
        raise InputError(
            f"The {name} covers only {covered} voxel{'s' if covered != 1 else ''}; a registration needs at "
            f"least {need} inside the mask. Draw a larger mask, or register without one."
        )
    return m
