"""Contrast check before the ``nephi`` engine's stages: NCC assumes the two images' intensities are
related linearly, and a monotone but non-linear change (a gamma, a saturating stain) breaks that (a
pure shift of the retina with the moving image at gamma 2 ended at 5.78 px of endpoint error, 4.25
before registering). The quantiles of the two images give their intensity map whatever the
alignment; where it is far from a line, the moving image's intensities are mapped onto the fixed
image's by their quantiles (histogram matching) before any stage runs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...core.registration import Pair

#: Quantile levels compared (the 1st to 99th percentile: the tails hold outliers and clipped values).
LEVELS = np.linspace(0.01, 0.99, 99)
#: RMS distance of the quantile map from its least-squares line, as a share of the fixed image's
#: 1-99 % range, above which the moving image is matched (``contrast_match="auto"``).
NONLINEAR = 0.02
#: Voxels sampled (a regular subsample) for the quantiles of large images.
MAX_SAMPLES = 1 << 20


def _sample(image: np.ndarray, mask) -> np.ndarray:
    step = max(1, image.size // MAX_SAMPLES)
    values = np.asarray(image).reshape(-1)[::step]
    if mask is not None:
        inside = np.asarray(mask).reshape(-1)[::step] != 0
        values = values[inside] if inside.any() else values
    return values.astype(np.float64)


def quantile_map(fixed, moving, fixed_mask=None, moving_mask=None, levels=LEVELS):
    """Quantiles ``(q_fixed, q_moving)`` of both images (inside their masks) at ``levels``."""
    return (
        np.quantile(_sample(fixed, fixed_mask), levels),
        np.quantile(_sample(moving, moving_mask), levels),
    )


def nonlinearity(q_fixed: np.ndarray, q_moving: np.ndarray) -> float:
    """RMS residual of the least-squares line ``q_fixed ~ a q_moving + b`` over the fixed range
    (0: the intensities are related linearly, as NCC assumes)."""
    span = float(q_fixed[-1] - q_fixed[0])
    if span <= 0 or float(q_moving[-1] - q_moving[0]) <= 0:
        return 0.0
    design = np.stack([q_moving, np.ones_like(q_moving)], 1)
    coef, *_ = np.linalg.lstsq(design, q_fixed, rcond=None)
    return float(np.sqrt(np.mean((q_fixed - design @ coef) ** 2)) / span)


def match_to(moving: np.ndarray, fixed, moving_mask=None, fixed_mask=None) -> np.ndarray:
    """A float32 copy of ``moving`` with its intensities mapped onto ``fixed``'s by their quantiles
    (piecewise linear between 257 levels, the end segments' slopes continued beyond them)."""
    levels = np.linspace(0.0, 1.0, 257)
    q_f, q_m = quantile_map(fixed, moving, fixed_mask, moving_mask, levels)
    keep = np.concatenate([[True], np.diff(q_m) > 0])  # ties (flat backgrounds): one knot each
    q_f, q_m = q_f[keep], q_m[keep]
    m = np.asarray(moving, np.float64)
    if len(q_m) < 2:
        return np.array(moving, np.float32, copy=True)
    out = np.interp(m, q_m, q_f)
    lo, hi = m < q_m[0], m > q_m[-1]
    out[lo] = q_f[0] + (m[lo] - q_m[0]) * (q_f[1] - q_f[0]) / (q_m[1] - q_m[0])
    out[hi] = q_f[-1] + (m[hi] - q_m[-1]) * (q_f[-1] - q_f[-2]) / (q_m[-1] - q_m[-2])
    return out.astype(np.float32)


def prepare(pair: Pair, mode: bool | str | None) -> tuple[Pair, float | None, bool]:
    """The pair the stages register (its moving image matched to the fixed one where ``mode`` is
    True, or ``"auto"`` and the quantile map is further than :data:`NONLINEAR` from a line), the
    quantile map's :func:`nonlinearity` (None when ``mode`` is False or None: not measured), and
    whether it was matched. ``pair`` is not modified."""
    if not mode:
        return pair, None, False
    fixed_mask, moving_mask = pair.fixed_mask, pair.moving_mask
    nonlin = nonlinearity(*quantile_map(pair.fixed, pair.moving, fixed_mask, moving_mask))
    matched = mode is True or (mode == "auto" and nonlin > NONLINEAR)
    if not matched:
        return pair, nonlin, False
    return replace(pair, moving=match_to(pair.moving, pair.fixed, moving_mask, fixed_mask)), nonlin, True


def note(nonlin: float) -> str:
    """The note a run with a matched moving image carries."""
    return (
        f"The images' intensities are not related linearly (their quantiles are {nonlin:.3f} of the "
        f"fixed range from a line, above {NONLINEAR}), which NCC assumes: the stages registered the "
        "moving image with its intensities mapped onto the fixed image's by their quantiles "
        "(histogram matching; the result warps the moving image as given). contrast_match=False "
        "registers it as given."
    )
