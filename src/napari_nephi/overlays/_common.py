"""Small helpers shared by the overlay builders (no napari, no Qt)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.errors import DimensionMismatchError, InputError
from ..core.grid import check_spacing

#: A napari LayerData tuple: ``(data, layer keyword arguments, layer type)``.
LayerData = tuple[Any, dict, str]

#: Diverging colormap known to napari by name (no matplotlib needed).
DIVERGING = "PiYG"


def check_shape(transform, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints with one entry per axis of ``transform``."""
    shp = tuple(int(s) for s in shape)
    if len(shp) != transform.ndim:
        raise DimensionMismatchError(
            f"Shape {shp} has {len(shp)} axes but the transform is {transform.ndim}D; pass the "
            "shape of the fixed image."
        )
    if min(shp) < 1:
        raise InputError(f"Shape {shp} has an empty axis.")
    return shp


def layer_scale(scale, ndim: int, default=None) -> tuple[float, ...]:
    """Validated napari ``scale`` (physical voxel size); ``None`` falls back to ``default`` or 1."""
    return check_spacing(scale if scale is not None else default, ndim)


def normalise(image, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Map the ``percentiles`` of ``image`` to 0 and 1 and clip to [0, 1] (float32).

    A constant image becomes all zeros.
    """
    a = np.asarray(image, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.float32)
    if finite.size > 4_000_000:  # percentiles of a regular subsample are plenty
        finite = finite[:: finite.size // 4_000_000]
    lo, hi = np.percentile(finite, percentiles)
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        return np.zeros(a.shape, np.float32)
    out = (a - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)
