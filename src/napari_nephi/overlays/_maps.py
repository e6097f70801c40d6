"""Image, Labels and Vectors overlays: Jacobian map, folds, warped labels, comparisons, landmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import DimensionMismatchError, InputError
from ..core.grid import check_spacing
from ..core.jacobian import fold_statistics, jacobian_determinant
from ._common import DIVERGING, LayerData, check_shape, layer_scale, normalise

#: What the Jacobian layer's colours mean (its ``metadata["legend"]``; the colour bar shows the scale).
JACOBIAN_LEGEND = (
    "det(d phi / d x), phi: fixed -> moving voxels. 1 (white): volume kept; > 1 (green): a fixed "
    "region takes its content from a larger moving region (the moving image was shrunk there); "
    "< 1 (pink): from a smaller one (stretched); <= 0 (darkest pink, red in the folds layer): folded."
)


def jacobian_layer(
    transform,
    shape: Sequence[int],
    spacing: Sequence[float] | None = None,
    *,
    displacement: np.ndarray | None = None,
    name: str = "Jacobian determinant",
    slice_axis: int = 0,
) -> LayerData:
    """Image layer of ``det(d phi / d x)`` on the fixed grid of ``shape``.

    Diverging colormap centred on 1 (no change): contrast limits ``(1 - r, 1 + r)`` with ``r`` the
    99.5th percentile of ``|det - 1|`` kept within [0.05, 1], so folds (``det <= 0``) always show in
    the darkest colour. Displacements are in voxels, so the determinant does not depend on the
    spacing, which only becomes the layer ``scale`` (default ``transform.spacing``).
    ``displacement`` may be given to avoid recomputing it.

    Legend: ``metadata["legend"]`` says what the colours mean (:data:`JACOBIAN_LEGEND`) and
    ``metadata["contrast_range"]`` gives the range; :func:`~napari_nephi.overlays.style_layer`
    turns on napari's colour bar for the live layer. In napari's 3D view a 3D map is drawn as one
    plane (``depiction="plane"``) across ``slice_axis`` at the middle slice (``style_layer`` with a
    viewer moves it to the current slice): a volume rendering of a quantity that is 1 almost
    everywhere shows only its outer faces (translucent) or only expansions (maximum intensity).
    Fold statistics go to ``metadata["fold_statistics"]``.
    """
    shape = check_shape(transform, shape)
    u = transform.displacement(shape) if displacement is None else displacement
    det = jacobian_determinant(u)
    r = float(np.clip(np.percentile(np.abs(det - 1.0), 99.5), 0.05, 1.0))
    lo, hi = 1.0 - r, 1.0 + r
    kwargs = {
        "name": name,
        "colormap": DIVERGING,
        "contrast_limits": (lo, hi),
        "scale": layer_scale(spacing, len(shape), transform.spacing),
        "metadata": {
            "fold_statistics": fold_statistics(det),
            "legend": JACOBIAN_LEGEND,
            "contrast_range": f"{lo:.2f} (pink) - 1 (white) - {hi:.2f} (green)",
        },
    }
    if len(shape) == 3:
        if not -3 <= slice_axis < 3:
            raise InputError(f"slice_axis must be 0, 1 or 2 for a 3D map, got {slice_axis}.")
        ax = slice_axis % 3
        normal = [0.0, 0.0, 0.0]
        normal[ax] = 1.0
        centre = [(n - 1) / 2 for n in shape]
        centre[ax] = float(shape[ax] // 2)
        kwargs["depiction"] = "plane"
        kwargs["blending"] = "translucent_no_depth"  # a volume rendering's depth does not hide it
        kwargs["plane"] = {"position": tuple(centre), "normal": tuple(normal), "thickness": 1.0}
        kwargs["metadata"].update({"view_3d": "current slice", "slice_axis": ax})
    return det, kwargs, "image"


def folds_layer(
    jac_det, scale: Sequence[float] | None = None, *, mask=None, name: str = "folds"
) -> LayerData:
    """Labels layer, ``uint8``, 1 where ``jac_det <= 0`` (folded voxels), 0 elsewhere.

    Red on transparent. In napari's 3D view a 3D layer is drawn as red iso-surfaces of the folded
    regions, blended without depth (``translucent_no_depth``) so that folds inside the volume show
    through the image. ``metadata["fold_statistics"]`` holds
    :func:`~napari_nephi.core.jacobian.fold_statistics` (count, percentage, min/max/std of the
    determinant; inside ``mask`` when given; the layer itself marks every folded voxel).
    """
    det = np.asarray(jac_det)
    folds = (det <= 0).astype(np.uint8)
    kwargs = {
        "name": name,
        "scale": layer_scale(scale, det.ndim),
        "colormap": {None: "transparent", 1: "red"},
        "opacity": 0.8,
        "blending": "translucent_no_depth",
        "metadata": {"fold_statistics": fold_statistics(det, mask)},
    }
    if det.ndim == 3:
        kwargs["rendering"] = "iso_categorical"
    return folds, kwargs, "labels"


def warped_labels_layer(
    transform,
    labels,
    output_shape: Sequence[int] | None = None,
    scale: Sequence[float] | None = None,
    *,
    name: str = "warped labels",
) -> LayerData:
    """Moving ``labels`` resampled onto the fixed grid by nearest neighbour (dtype and values kept)."""
    warped = transform.warp_labels(labels, output_shape)
    kwargs = {"name": name, "scale": layer_scale(scale, warped.ndim, transform.spacing), "opacity": 0.5}
    return warped, kwargs, "labels"


def _gray(image, rgb: bool) -> np.ndarray:
    a = np.asarray(image)
    return a.mean(axis=-1) if rgb else a


def _pair(fixed, warped, rgb: bool) -> tuple[np.ndarray, np.ndarray]:
    f, w = _gray(fixed, rgb), _gray(warped, rgb)
    if f.shape != w.shape:
        raise DimensionMismatchError(
            f"fixed {f.shape} and warped {w.shape} differ; compare the fixed image with the "
            "moving image warped onto the fixed grid."
        )
    return normalise(f), normalise(w)


def checkerboard(
    fixed,
    warped,
    tiles: int = 8,
    scale: Sequence[float] | None = None,
    *,
    rgb: bool = False,
    name: str = "checkerboard",
) -> LayerData:
    """Image alternating tiles of the fixed and warped images, each normalised to [0, 1].

    Every axis is cut into ``min(tiles, n)`` tiles (voxel ``i`` is in tile ``i * tiles // n``); the
    tile whose indices sum to an even number shows ``fixed``, the others ``warped``. Intensities are
    mapped to [0, 1] by the 1st and 99th percentiles of each image. ``rgb=True``: channels last,
    averaged to grey first.
    """
    if int(tiles) < 1:
        raise InputError(f"tiles must be at least 1, got {tiles}.")
    f, w = _pair(fixed, warped, rgb)
    parity = np.zeros(f.shape, dtype=np.int64)
    for axis, n in enumerate(f.shape):
        t = min(int(tiles), n)
        idx = np.arange(n) * t // n
        parity = parity + idx.reshape([-1 if a == axis else 1 for a in range(f.ndim)])
    out = np.where(parity % 2 == 0, f, w).astype(np.float32)
    kwargs = {
        "name": name,
        "colormap": "gray",
        "contrast_limits": (0.0, 1.0),
        "scale": layer_scale(scale, f.ndim),
    }
    return out, kwargs, "image"


def difference(
    fixed,
    warped,
    scale: Sequence[float] | None = None,
    *,
    rgb: bool = False,
    name: str = "difference",
) -> LayerData:
    """Image of ``normalised(fixed) - normalised(warped)`` in [-1, 1], diverging colormap at 0."""
    f, w = _pair(fixed, warped, rgb)
    diff = f - w
    r = float(np.clip(np.percentile(np.abs(diff), 99.5), 0.05, 1.0))
    kwargs = {
        "name": name,
        "colormap": DIVERGING,
        "contrast_limits": (-r, r),
        "scale": layer_scale(scale, f.ndim),
    }
    return diff.astype(np.float32), kwargs, "image"


def landmark_residuals(
    transform,
    fixed_points,
    moving_points,
    spacing: Sequence[float] | None = None,
    *,
    name: str = "landmark residuals",
) -> tuple[LayerData, dict]:
    """Vectors from each fixed landmark mapped into the moving image to its moving landmark.

    ``fixed_points`` and ``moving_points`` are corresponding ``(N, D)`` voxel coordinates (napari
    order) in the fixed and the moving image. ``transform.map_points`` carries the fixed landmarks
    into moving coordinates, so the layer lies over the *moving* image. Vectors data is napari's
    ``(N, 2, D)`` ``[start, direction]``: start ``phi(p_fixed)``, direction
    ``p_moving - phi(p_fixed)``.

    Returns ``(layer, stats)`` with stats ``tre_mean``, ``tre_max`` and ``tre_per_point`` (a list):
    lengths of the residuals in physical units, each axis scaled by ``spacing`` (the voxel size of
    the moving grid; default ``transform.spacing``), which is also the layer ``scale``.
    """
    d = transform.ndim
    fp = np.asarray(fixed_points, dtype=np.float64)
    mp = np.asarray(moving_points, dtype=np.float64)
    for label, pts in (("fixed_points", fp), ("moving_points", mp)):
        if pts.ndim != 2 or pts.shape[1] != d:
            raise DimensionMismatchError(f"{label} must be an (N, {d}) array, got shape {pts.shape}.")
    if len(fp) != len(mp):
        raise InputError(
            f"{len(fp)} fixed and {len(mp)} moving landmarks; give corresponding points in the same order."
        )
    sp = np.asarray(check_spacing(spacing if spacing is not None else transform.spacing, d))
    mapped = transform.map_points(fp) if len(fp) else np.zeros((0, d))
    residual = mp - mapped
    tre = np.linalg.norm(residual * sp, axis=1)
    stats = {
        "tre_mean": float(tre.mean()) if len(tre) else float("nan"),
        "tre_max": float(tre.max()) if len(tre) else float("nan"),
        "tre_per_point": tre.tolist(),
    }
    data = np.stack([mapped, residual], axis=1)
    kwargs = {
        "name": name,
        "edge_color": "red",
        "edge_width": 1.0,
        "length": 1.0,
        "vector_style": "arrow",
        "ndim": d,
        "scale": tuple(float(s) for s in sp),
        "features": {"tre": tre},
        "metadata": {"tre": stats},
    }
    return (data, kwargs, "vectors"), stats
