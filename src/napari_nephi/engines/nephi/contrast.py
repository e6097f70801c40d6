"""Contrast check after the ``nephi`` engine's global stage (opt-in: ``contrast_match="auto"``).

NCC assumes the two images' intensities are related linearly, and a monotone but non-linear change
(a gamma, a saturating stain) breaks that (a pure shift of the retina with the moving image at gamma
2 ended at 5.78 px of endpoint error, 4.25 before registering). On voxels the global map pairs, the
mean fixed intensity per moving-intensity bin (the correlation ratio's regression) shows the
relation; where it explains much more of the fixed image than a line does, the moving image's
intensities are mapped through it before the deformable stages.

Pairing voxels, not comparing histograms: two images whose contents differ a little (a near-binary
image shifted partly out of its frame) have different histograms but a linear joint relation. It
still fires without a contrast change on binary or noisy pairs and on piecewise-constant images a
deformation separates (session-19 review R4, R9), hence opt-in.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Share of the variance a line leaves unexplained that the binned regression explains, above
#: which the moving image is mapped (``contrast_match="auto"``).
NONLINEAR = 0.1
#: Equal-count bins of moving intensity for the regression.
BINS = 32
#: Voxel pairs sampled (a regular subsample of the fixed grid; all of a 256² image). Kept small: the
#: check's float64 temporaries come before the run's peak (2^18 pairs took 16-22 MiB for a moment).
MAX_SAMPLES = 1 << 16


def paired_samples(fixed, moving, matrix=None, fixed_mask=None, moving_mask=None):
    """Intensities ``(f, m)`` at a regular subsample of fixed voxels and at their images under the
    voxel map ``matrix`` (homogeneous, fixed to moving; None: the same voxel), linear interpolation,
    only where that lands inside the moving image (and both masks)."""
    fixed = np.asarray(fixed)
    d = fixed.ndim
    step = max(1, int(np.ceil((fixed.size / MAX_SAMPLES) ** (1 / d))))
    axes = [np.arange(0, n, step, dtype=np.float64) for n in fixed.shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), 0).reshape(d, -1)
    f = fixed[tuple(slice(None, None, step) for _ in range(d))].reshape(-1).astype(np.float64)
    keep = (
        np.ones(f.shape, bool)
        if fixed_mask is None
        else np.asarray(fixed_mask)[tuple(slice(None, None, step) for _ in range(d))].reshape(-1) != 0
    )
    m_pts = pts if matrix is None else np.asarray(matrix)[:d, :d] @ pts + np.asarray(matrix)[:d, d:]
    upper = np.asarray(np.shape(moving), np.float64)[:, None] - 1
    keep &= np.all((m_pts >= 0) & (m_pts <= upper), axis=0)
    m = ndimage.map_coordinates(np.asarray(moving, np.float32), m_pts[:, keep], order=1)
    if moving_mask is not None:
        inside = ndimage.map_coordinates(np.asarray(moving_mask, np.float32), m_pts[:, keep], order=0)
        f, m = f[keep][inside > 0], m[inside > 0]
        return f, m.astype(np.float64)
    return f[keep], m.astype(np.float64)


def regression(f: np.ndarray, m: np.ndarray, bins: int | None = None):
    """``(score, knots_m, knots_f)``: the mean ``m`` and ``f`` in ``bins`` equal-count bins of ``m``
    (bins of one value merged), and the share of the variance of ``f`` left by the least-squares line
    in ``m`` that those means explain (0: linear, as NCC assumes; near 1: a non-linear function)."""
    if bins is None:  # read at the call (session 40)
        bins = BINS
    if len(f) < 4 * bins or np.ptp(m) <= 0 or np.ptp(f) <= 0:
        return 0.0, None, None
    order = np.argsort(m, kind="stable")
    groups = np.array_split(order, bins)
    mb = np.array([m[g].mean() for g in groups])
    fb = np.array([f[g].mean() for g in groups])
    nb = np.array([len(g) for g in groups], np.float64)
    uniq, inv = np.unique(mb, return_inverse=True)  # ties of m: one knot
    w = np.bincount(inv, nb)
    fb = np.bincount(inv, nb * fb) / w
    total = np.sum((f - f.mean()) ** 2)
    eta2 = float(np.sum(w * (fb - f.mean()) ** 2) / total)
    r2 = float(np.corrcoef(f, m)[0, 1] ** 2)
    return max(0.0, (eta2 - r2) / max(1.0 - r2, 1e-12)), uniq, fb


def apply_map(image: np.ndarray, knots_m: np.ndarray, knots_f: np.ndarray) -> np.ndarray:
    """A float32 copy of ``image`` through the piecewise-linear map ``knots_m -> knots_f`` (made
    non-decreasing; the end segments' slopes continued to the image's range), in blocks of 2^20
    voxels (no float64 copy of the whole image)."""
    knots_m = np.asarray(knots_m, np.float64)
    knots_f = np.maximum.accumulate(np.asarray(knots_f, np.float64))
    out = np.array(image, np.float32, copy=True)
    if len(knots_m) > 1:
        lo, hi = float(out.min()), float(out.max())
        slope0 = (knots_f[1] - knots_f[0]) / (knots_m[1] - knots_m[0])
        slope1 = (knots_f[-1] - knots_f[-2]) / (knots_m[-1] - knots_m[-2])
        if lo < knots_m[0]:
            knots_m, knots_f = np.r_[lo, knots_m], np.r_[knots_f[0] + (lo - knots_m[0]) * slope0, knots_f]
        if hi > knots_m[-1]:
            knots_m, knots_f = np.r_[knots_m, hi], np.r_[knots_f, knots_f[-1] + (hi - knots_m[-1]) * slope1]
    flat = out.reshape(-1)
    for start in range(0, flat.size, 1 << 20):
        block = flat[start : start + (1 << 20)]
        block[:] = np.interp(block, knots_m, knots_f)
    return out


def check(fixed, moving, matrix=None, fixed_mask=None, moving_mask=None):
    """``(score, map)`` of the pair aligned by ``matrix``: :func:`regression`'s score and its knots
    ``(knots_m, knots_f)``, or None where the relation is not increasing (a line fits it with a
    negative slope: not a contrast change NCC's assumption can be mended for here)."""
    f, m = paired_samples(fixed, moving, matrix, fixed_mask, moving_mask)
    score, km, kf = regression(f, m)
    if km is None or len(km) < 3 or np.corrcoef(f, m)[0, 1] <= 0:
        return score, None
    return score, (km, kf)


def note(score: float) -> str:
    """The note a run with a mapped moving image carries."""
    return (
        f"The images' intensities are not related linearly (NCC assumes they are): after the global "
        f"stage a non-linear map of the moving intensities explained {score:.0%} of what a line left "
        f"(above {NONLINEAR:.0%}). The deformable stages registered the moving image through that map; "
        "the result warps the moving image as given. contrast_match=False registers it as given."
    )
