"""Identity grids and conversions between voxel, normalised and physical coordinates.

Coordinates are in numpy/napari axis order, ``(y, x)`` or ``(z, y, x)``. Normalised
coordinates map voxel centre 0 to -1 and voxel centre ``n - 1`` to +1 (``align_corners=True``);
``torch.nn.functional.grid_sample`` wants them in reversed order, see :func:`to_grid_sample`.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch

from .errors import InputError


def check_spacing(spacing: Sequence[float] | float | None, ndim: int) -> tuple[float, ...]:
    """Validate a voxel spacing: one positive number, or one per axis; ``None`` means 1 everywhere.

    Raises :class:`InputError` for text, non-numbers, the wrong number of values, and values that
    are NaN, infinite, zero or negative.
    """
    if spacing is None:
        return (1.0,) * ndim
    example = ", ".join(["1.0"] + ["0.5"] * (ndim - 1))
    usage = f"give one positive number, or one per axis in (z, y, x) order, e.g. spacing=({example})"
    if isinstance(spacing, np.ndarray) and spacing.ndim == 0:
        spacing = spacing.item()
    if isinstance(spacing, Real):
        values = [spacing] * ndim  # a single number
    elif isinstance(spacing, (str, bytes)):
        values = None
    else:
        try:
            values = list(spacing)
        except TypeError:
            values = None
    if values is None or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        raise InputError(f"spacing must be numbers, got {spacing!r}; {usage}.")
    sp = tuple(float(v) for v in values)
    if len(sp) != ndim:
        raise InputError(
            f"spacing has {len(sp)} values but the image has {ndim} dimensions; give one "
            "spacing per axis in (z, y, x) order."
        )
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise InputError(f"spacing must be finite and positive, got {sp}; {usage}.")
    return sp


def identity_grid(
    shape: Sequence[int], device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """Voxel coordinates of every voxel, shape ``(*shape, D)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _half(shape: Sequence[int]) -> np.ndarray:
    return np.asarray([(n - 1) / 2.0 if n > 1 else 1.0 for n in shape], dtype=np.float64)


def _centre(shape: Sequence[int]) -> np.ndarray:
    return np.asarray([(n - 1) / 2.0 for n in shape], dtype=np.float64)


def voxel_to_normalized(points, shape: Sequence[int]):
    """Voxel coordinates ``(..., D)`` to normalised [-1, 1] coordinates (same axis order)."""
    return (points - _as(_centre(shape), points)) / _as(_half(shape), points)


def normalized_to_voxel(points, shape: Sequence[int]):
    """Inverse of :func:`voxel_to_normalized`."""
    return points * _as(_half(shape), points) + _as(_centre(shape), points)


def voxel_to_physical(points, spacing: Sequence[float]):
    return points * _as(spacing, points)


def physical_to_voxel(points, spacing: Sequence[float]):
    return points / _as(spacing, points)


def _as(values, like):
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return np.asarray(values, dtype=np.float64)


def to_grid_sample(points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(..., D)`` to the reversed normalised order grid_sample expects."""
    return voxel_to_normalized(points, shape).flip(-1)


def voxel_affine_from_normalized(
    matrix: np.ndarray, fixed_shape: Sequence[int], moving_shape: Sequence[int]
) -> np.ndarray:
    """Convert a homogeneous map between normalised coordinates into voxel coordinates."""
    d = len(fixed_shape)
    to_norm = np.eye(d + 1)  # fixed voxel -> normalised
    to_norm[:d, :d] = np.diag(1.0 / _half(fixed_shape))
    to_norm[:d, d] = -_centre(fixed_shape) / _half(fixed_shape)
    to_vox = np.eye(d + 1)  # normalised -> moving voxel
    to_vox[:d, :d] = np.diag(_half(moving_shape))
    to_vox[:d, d] = _centre(moving_shape)
    return to_vox @ np.asarray(matrix, dtype=np.float64) @ to_norm
