"""Metrics of a histology registration: NCC, MSE, NMI before/after on tissue, folds, TRE."""

from __future__ import annotations

import numpy as np

from ...core.jacobian import fold_statistics, jacobian_determinant
from ...core.similarity import metric
from ...core.transform import Transform
from .slide_inputs import resize_mask
from .stain import tissue_mask


def field_folds(field: np.ndarray, mask) -> float:
    """Percentage of pixels (inside ``mask``) where ``x + u(x)`` folds (Jacobian determinant <= 0)."""
    return float(fold_statistics(jacobian_determinant(field), mask)["fold_percent"])


def _table(fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray) -> dict:
    a, b = fixed[mask], moving[mask]
    return {
        "ncc": metric("ncc", a, b),
        "mse": float(np.mean((a.astype(np.float64) - b) ** 2)),
        "nmi": metric("nmi", a, b),
    }


def similarity_table(run, grid, transform: Transform, fixed_mask=None) -> dict:
    """NCC, MSE and NMI of the stain channels on the fixed tissue at ``grid`` (the working level).

    "Before" is the moving slide placed by its pixel size only (no registration); "after" is it
    warped by ``transform``. Channels are in [0, 1]; the tissue is the fixed slide's.
    """
    f_img = run.read_fixed(grid)
    fc = run.channel.one(f_img, "fixed")
    if fixed_mask is None:
        mask = tissue_mask(f_img)
    else:
        mask = resize_mask(fixed_mask, grid.shape)
    before = run.channel.one(run.read_moving(grid, run.initial), "moving")
    after = run.channel.one(run.read_moving(grid, transform), "moving")
    tb, ta = _table(fc, before, mask), _table(fc, after, mask)
    out = {f"{k}_before": v for k, v in tb.items()}
    out.update({f"{k}_after": v for k, v in ta.items()})
    out["metrics_um"] = grid.um
    return out


def tre_report(transform: Transform, points: tuple[np.ndarray, np.ndarray], run) -> dict:
    """TRE (um: mean, median, 90th percentile) and rTRE (TRE / fixed slide diagonal) of landmarks."""
    fixed_pts, moving_pts = points
    mapped = transform.map_points(fixed_pts)
    tre = np.linalg.norm(mapped - moving_pts, axis=1) * run.um_m
    diag = float(np.hypot(*run.fixed.shape[:2])) * run.um_f
    return {
        "tre_mean_um": float(tre.mean()),
        "tre_median_um": float(np.median(tre)),
        "tre_p90_um": float(np.percentile(tre, 90)),
        "rtre_median": float(np.median(tre) / diag),
        "rtre_mean": float(tre.mean() / diag),
        "landmarks": len(tre),
    }
