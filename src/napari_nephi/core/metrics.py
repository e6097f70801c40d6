"""Metrics that every engine reports in ``Registration.metrics``."""

from __future__ import annotations

import resource
import sys

import numpy as np
import torch

from .device import peak_memory_bytes
from .jacobian import fold_statistics, jacobian_determinant
from .similarity import metric
from .transform import IdentityTransform, Transform
from .warp import iter_slabs


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (CPU side)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def overlap_mask(transform: Transform, fixed_shape, moving_shape) -> np.ndarray:
    """Fixed voxels that the transform maps inside the moving image."""
    return transform.warp(np.ones(moving_shape, np.float32), output_shape=fixed_shape) > 0.999


def similarity_report(fixed, moving, warped, mask=None, transform: Transform | None = None) -> dict:
    """NCC and MSE of the pair before (moving on the fixed grid, unmoved) and after.

    Only voxels inside ``mask`` and, after registration, inside the overlap with the moving
    image (when ``transform`` is given) count, so zero padding does not distort the numbers.
    """
    identity = IdentityTransform(fixed.ndim)
    before = moving if moving.shape == fixed.shape else identity.warp(moving, output_shape=fixed.shape)
    if moving.shape == fixed.shape:  # the identity keeps every voxel inside: no need to warp
        m_before = np.ones(fixed.shape, bool)
    else:
        m_before = overlap_mask(identity, fixed.shape, moving.shape)
    m_after = overlap_mask(transform, fixed.shape, moving.shape) if transform is not None else None
    if mask is not None:
        m_before = m_before & mask
        m_after = mask if m_after is None else m_after & mask
    nan = float("nan")  # no voxel to compare: say so rather than fall back to the whole image
    empty_before = not m_before.any()
    empty_after = m_after is not None and not m_after.any()
    return {
        "ncc_before": nan if empty_before else metric("ncc", fixed, before, m_before),
        "ncc_after": nan if empty_after else metric("ncc", fixed, warped, m_after),
        "mse_before": nan if empty_before else _masked_mse(fixed, before, m_before),
        "mse_after": nan if empty_after else _masked_mse(fixed, warped, m_after),
    }


def _masked_mse(a, b, mask, slab_voxels: int = 1 << 20) -> float:
    """Mean squared difference (inside ``mask``), in float64 slab by slab to bound memory."""
    a, b = np.asarray(a), np.asarray(b)
    total, count = 0.0, 0
    for s, e in iter_slabs(a.shape, slab_voxels):
        diff = (a[s:e].astype(np.float64) - b[s:e].astype(np.float64)) ** 2
        if mask is not None:
            diff = diff[np.asarray(mask[s:e], bool)]
        total, count = total + float(diff.sum()), count + diff.size
    return total / count if count else float("nan")


def regularity_report(transform: Transform, shape, mask=None) -> dict:
    """Fold statistics of the transform's displacement on the fixed grid."""
    field = getattr(transform, "field", None)  # a stored field is read, not copied
    if field is None or field.shape[1:] != tuple(int(n) for n in shape):
        field = transform.displacement(shape)
    det = jacobian_determinant(field)
    stats = fold_statistics(det, mask)
    return {
        "folds": stats["folds"],
        "fold_percent": stats["fold_percent"],
        "jacobian_min": stats["jacobian_min"],
        "jacobian_max": stats["jacobian_max"],
    }


def memory_report(device: torch.device) -> dict:
    gpu = peak_memory_bytes(device)
    out = {"peak_rss_mb": process_peak_rss_mb()}
    if gpu is not None:
        out["peak_gpu_mb"] = gpu / 2**20
    return out


def finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
