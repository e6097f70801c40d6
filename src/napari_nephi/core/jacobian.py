"""Jacobian determinant of a displacement field and fold statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .device import memory_guard
from .errors import DimensionMismatchError, InputError
from .grid import check_spacing
from .warp import iter_slabs


def jacobian_determinant(
    displacement,
    spacing: Sequence[float] | None = None,
    units: str = "voxel",
) -> np.ndarray:
    """``det(d phi / d x)`` of ``phi(x) = x + u(x)`` by central finite differences.

    ``displacement`` is ``(D, *shape)``. With ``units="voxel"`` it is in voxels of the grid (the
    package convention), and the determinant does not depend on ``spacing``: rescaling both the
    point and its image by the spacing changes ``d phi / d x`` by a similarity. With
    ``units="physical"`` the field is in physical units and differences are divided by ``spacing``.
    """
    u = np.asarray(displacement)
    d = u.shape[0]
    if u.ndim != d + 1 or d not in (2, 3):
        raise DimensionMismatchError(f"Expected a (D, *shape) field with D = 2 or 3, got {u.shape}.")
    if units not in ("voxel", "physical"):
        raise InputError(f"units must be 'voxel' or 'physical', not {units!r}.")
    sp = check_spacing(spacing, d) if units == "physical" else (1.0,) * d
    if min(u.shape[1:]) < 2:
        raise InputError("The field needs at least 2 voxels along every axis for derivatives.")
    if not np.isfinite(u).all():
        raise InputError("The displacement field holds NaN or infinite values; it has no Jacobian.")
    # Slabs along the first axis, each with one voxel of halo on either side, so the float64
    # temporaries stay small on large volumes; the result equals the whole-array computation.
    n0 = u.shape[1]
    with memory_guard("Jacobian determinant"):
        out = np.empty(u.shape[1:], np.float32)
        for a, b in iter_slabs(out.shape, SLAB_VOXELS):
            lo, hi = max(0, a - 1), min(n0, b + 1)
            out[a:b] = _determinant(np.asarray(u[:, lo:hi], np.float64), sp)[a - lo : a - lo + (b - a)]
    return out


#: Voxels per slab in :func:`jacobian_determinant`.
SLAB_VOXELS = 1 << 16


def _determinant(u: np.ndarray, sp) -> np.ndarray:
    d = u.shape[0]
    jac = np.empty((d, d) + u.shape[1:], dtype=np.float64)
    for i in range(d):
        grads = np.gradient(u[i], *sp)
        for j in range(d):
            jac[i, j] = grads[j] + (1.0 if i == j else 0.0)
    if d == 2:
        return (jac[0, 0] * jac[1, 1] - jac[0, 1] * jac[1, 0]).astype(np.float32)
    return (
        jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
        - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
        + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0])
    ).astype(np.float32)


def fold_statistics(jac_det, mask=None) -> dict:
    """Count and percentage of voxels with ``det <= 0`` (inside ``mask`` when given)."""
    det = np.asarray(jac_det)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != det.shape:
            raise DimensionMismatchError(f"Mask shape {m.shape} differs from field shape {det.shape}.")
        det = det[m]
    total = int(det.size)
    folds = int(np.count_nonzero(det <= 0))
    return {
        "folds": folds,
        "voxels": total,
        "fold_percent": 100.0 * folds / total if total else 0.0,
        "jacobian_min": float(det.min()) if total else float("nan"),
        "jacobian_max": float(det.max()) if total else float("nan"),
        "jacobian_std": float(det.std()) if total else float("nan"),
    }
