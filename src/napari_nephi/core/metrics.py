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


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (CPU side)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def similarity_report(fixed, moving, warped, mask=None) -> dict:
    """NCC and MSE of the pair before (moving on the fixed grid, unmoved) and after."""
    before = moving
    if moving.shape != fixed.shape:
        before = IdentityTransform(fixed.ndim).warp(moving, output_shape=fixed.shape)
    return {
        "ncc_before": metric("ncc", fixed, before, mask),
        "ncc_after": metric("ncc", fixed, warped, mask),
        "mse_before": metric("mse", fixed, before),
        "mse_after": metric("mse", fixed, warped),
    }


def regularity_report(transform: Transform, shape, mask=None) -> dict:
    """Fold statistics of the transform's displacement on the fixed grid."""
    det = jacobian_determinant(transform.displacement(shape))
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
