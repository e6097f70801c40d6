"""Deformation grid overlay: grid lines as napari 'path' shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..core.errors import InputError
from ._common import LayerData, check_shape, layer_scale

#: At most this many lines per axis and slice; a finer grid is coarsened by an integer factor.
MAX_LINES = 512
#: A 3D grid has lines on at most this many slices by default.
MAX_SLICES = 64

_MODES = ("warped", "sampling")

#: The automatic grid spacing aims at this many lines across the shortest and the longest axis.
LINES_SHORT_AXIS, LINES_LONG_AXIS = 12, 20


def auto_spacing(shape: Sequence[int]) -> float:
    """Grid spacing in voxels giving about 10-20 lines per axis of an image of ``shape``.

    ``max(shortest / 12, longest / 20, 1)`` rounded to two significant digits: about 12 lines across
    a square image of any size, at most about 20 along the longest axis (an image more than twice
    as long as wide has fewer than 10 across its short axis), never more than one line per voxel.
    """
    shp = [int(n) for n in shape]
    if not shp or min(shp) < 1:
        raise InputError(f"Shape {tuple(shp)} has an empty axis.")
    raw = max(min(shp) / LINES_SHORT_AXIS, max(shp) / LINES_LONG_AXIS, 1.0)
    return float(f"{raw:.2g}")


def auto_line_width(shape: Sequence[int]) -> float:
    """Line width in voxels (napari data units): about 2 screen pixels when the image fills ~1000 px.

    ``longest / 500`` kept within [0.08, 0.8] voxel, so a line is always narrower than a voxel row:
    on the 41-voxel MRI sample 0.08 voxel, on a 512 x 512 image 0.8 voxel.
    """
    return float(np.clip(max(int(n) for n in shape) / 500.0, 0.08, 0.8))


def deformation_grid(
    transform,
    shape: Sequence[int],
    spacing_px: float | None = None,
    scale: Sequence[float] | None = None,
    slice_axis: int = 0,
    *,
    mode: str = "warped",
    slice_step: int | None = None,
    sample_px: float | None = 2.0,
    displacement: np.ndarray | None = None,
    name: str = "deformation grid",
    edge_color: str = "yellow",
    edge_width: float | None = None,
) -> LayerData:
    """Grid lines that show a deformation, as a napari Shapes layer of ``'path'`` shapes.

    Convention (``mode="warped"``, the default): imagine a regular grid painted on the *moving*
    image, one line every ``spacing_px`` moving voxels along each axis (lines at moving
    coordinates ``0, s, 2s, ...``). The paths are where those lines end up in the *warped* image,
    i.e. on the fixed grid: the level sets ``{x : phi_i(x) = k * s}``. Draw the layer over the
    warped (or fixed) image: the grid moves with the image content. A pure translation
    ``phi(x) = x + t`` moves every line by ``-t`` (content of the moving image at ``c`` appears in
    the warped image at ``c - t``), a region the registration expanded shows wider cells, and
    folds show as lines that cross or loop. Warping a rasterised grid image with
    ``transform.warp`` draws exactly these lines. The lines are found as contours of ``phi`` on the
    fixed voxel grid (exact at every vertex for fields interpolated linearly between voxels) and
    thinned to one vertex about every ``sample_px`` voxels of arc length (``None`` keeps all).

    ``mode="sampling"``: regular lines of the *fixed* grid (positions ``0, s, 2s, ...``, sampled every
    ``sample_px`` voxels) mapped by ``phi``: they show where each fixed grid line samples the
    moving image, in moving voxel coordinates, so draw them over the *moving* image. A translation
    ``t`` moves every line by ``+t``.

    Size: ``spacing_px=None`` picks :func:`auto_spacing` of the in-plane axes (in 3D the axes other
    than ``slice_axis``; about 10-20 lines per axis whatever the
    image size) and ``edge_width=None`` :func:`auto_line_width` (a fraction of a voxel, in napari
    data units: both Shapes and Vectors layers build their line meshes in data coordinates).

    In 3D the grid is drawn per slice: for every ``slice_step``-th slice along ``slice_axis``
    (default: every slice, or every few slices so that there are at most 64), the 2D grid lines of
    the two other axes, each path a 3D path whose coordinate along ``slice_axis`` is the slice
    index, so napari's 2D view shows the grid of the slice it is at. napari's 3D view would show
    every slice's lines at once, a cage that hides the volume; ``metadata["view_3d"]`` says that
    :func:`~napari_nephi.overlays.style_layer` should keep only the current slice's lines there.
    In ``"warped"`` mode a slice shows where the moving grid *planes* cut it; in ``"sampling"``
    mode the out-of-slice component of ``phi`` is dropped.

    ``displacement`` (``(D, *shape)``, as ``transform.displacement(shape)``) may be given to avoid
    recomputing it. ``scale`` is the napari layer scale (default: ``transform.spacing``). Each shape
    has features ``axis`` (the axis whose coordinate is constant along the undeformed line),
    ``level`` (that coordinate, voxels) and ``slice`` (-1 in 2D). ``metadata["spacing_px"]`` is the
    spacing used.
    """
    shape = check_shape(transform, shape)
    d = len(shape)
    if mode not in _MODES:
        raise InputError(f"mode must be one of {_MODES}, not {mode!r}.")
    if spacing_px is None:  # from the axes the lines are drawn in: a 3D grid is drawn slice by slice
        in_plane = shape if d != 3 or not -3 <= slice_axis < 3 else np.delete(shape, slice_axis % 3)
        spacing_px = auto_spacing(in_plane)
    if not (np.isfinite(spacing_px) and spacing_px > 0):
        raise InputError(f"spacing_px must be a positive number of voxels, got {spacing_px}.")
    if edge_width is None:
        edge_width = auto_line_width(shape)
    if not (np.isfinite(edge_width) and edge_width > 0):
        raise InputError(f"edge_width must be a positive number of voxels, got {edge_width}.")
    if sample_px is not None and not (np.isfinite(sample_px) and sample_px > 0):
        raise InputError(f"sample_px must be positive or None, got {sample_px}.")
    if d == 3:
        if not -3 <= slice_axis < 3:
            raise InputError(f"slice_axis must be 0, 1 or 2 for a 3D grid, got {slice_axis}.")
        ax = slice_axis % 3
        n = shape[ax]
        step = int(slice_step) if slice_step is not None else max(1, math.ceil(n / MAX_SLICES))
        if step < 1:
            raise InputError(f"slice_step must be at least 1, got {slice_step}.")
        slices: list[int | None] = list(range(0, n, step))
        plane = tuple(a for a in range(3) if a != ax)
    elif d == 2:
        ax, slices, plane = None, [None], (0, 1)
    else:
        raise InputError(f"A deformation grid needs a 2D or 3D transform, got {d}D.")
    if displacement is not None:
        displacement = np.asarray(displacement)
        if displacement.shape != (d, *shape):
            raise InputError(f"displacement has shape {displacement.shape}, expected {(d, *shape)}.")

    paths: list[np.ndarray] = []
    feats: dict[str, list] = {"axis": [], "level": [], "slice": []}
    used = float(spacing_px)
    for s in slices:
        if mode == "warped":
            phi = _phi_on_plane(transform, shape, ax, s, plane, displacement)
            lines = []
            for j, p in enumerate(plane):
                found, used_j = _level_lines(phi[j], spacing_px, sample_px)
                used = max(used, used_j)
                lines += [(p, level, line) for level, line in found]
        else:
            lines = _sampling_lines(transform, shape, ax, s, plane, spacing_px, sample_px)
        for p, level, line in lines:
            full = np.empty((len(line), d), dtype=np.float64)
            full[:, list(plane)] = line
            if ax is not None:
                full[:, ax] = s
            paths.append(full)
            feats["axis"].append(p)
            feats["level"].append(level)
            feats["slice"].append(-1 if s is None else s)

    kwargs = {
        "name": name,
        "shape_type": "path",
        "edge_color": edge_color,
        "edge_width": edge_width,
        "face_color": "transparent",
        "opacity": 0.8,
        "blending": "translucent_no_depth",  # in 3D drawn over volume renderings, not into them
        "ndim": d,
        "scale": layer_scale(scale, d, transform.spacing),
        "features": {
            "axis": np.asarray(feats["axis"], dtype=np.int64),
            "level": np.asarray(feats["level"], dtype=np.float64),
            "slice": np.asarray(feats["slice"], dtype=np.int64),
        },
        "metadata": {
            "mode": mode,
            "spacing_px": used,
            "slice_axis": ax,
            "slices": [s for s in slices if s is not None],
            **({"view_3d": "current slice"} if ax is not None else {}),
        },
    }
    return paths, kwargs, "shapes"


def grid_as_vectors(grid: LayerData) -> LayerData:
    """The same grid lines as a napari Vectors layer: one line segment per pair of path vertices.

    napari draws a Vectors layer with one shader program and builds its mesh with numpy, where a
    Shapes layer triangulates each path in Python and needs four programs; the picture is the same
    (segments of ``edge_width`` along the paths). Features are repeated per segment.
    """
    paths, kwargs, kind = grid
    if kind != "shapes":
        raise InputError(f"Expected the Shapes layer data of a deformation grid, got {kind!r}.")
    d = int(kwargs.get("ndim", paths[0].shape[1] if paths else 2))
    counts = np.array([max(len(p) - 1, 0) for p in paths], dtype=np.int64)
    if counts.sum():
        starts = np.concatenate([p[:-1] for p in paths if len(p) > 1])
        steps = np.concatenate([np.diff(p, axis=0) for p in paths if len(p) > 1])
        data = np.stack([starts, steps], axis=1)
    else:
        data = np.zeros((0, 2, d))
    features = {k: np.repeat(np.asarray(v), counts) for k, v in kwargs.get("features", {}).items()}
    out = {
        "name": kwargs["name"],
        "edge_color": kwargs.get("edge_color", "yellow"),
        "edge_width": kwargs.get("edge_width", 1.0),
        "opacity": kwargs.get("opacity", 0.8),
        "blending": kwargs.get("blending", "translucent_no_depth"),
        "length": 1.0,
        "vector_style": "line",
        "ndim": d,
        "features": features,
        "metadata": {**kwargs.get("metadata", {}), "paths": len(paths)},
    }
    if "scale" in kwargs:
        out["scale"] = kwargs["scale"]
    return data, out, "vectors"


def _plane_points(shape, ax, s, plane) -> np.ndarray:
    """Voxel coordinates ``(h * w, D)`` of slice ``s`` along ``ax`` (the whole grid in 2D)."""
    h, w = shape[plane[0]], shape[plane[1]]
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    pts = np.empty((h * w, len(shape)), dtype=np.float64)
    pts[:, plane[0]] = rr.ravel()
    pts[:, plane[1]] = cc.ravel()
    if ax is not None:
        pts[:, ax] = s
    return pts


def _phi_on_plane(transform, shape, ax, s, plane, displacement) -> np.ndarray:
    """In-plane components of ``phi`` on the voxels of one slice, ``(2, h, w)`` float64."""
    h, w = shape[plane[0]], shape[plane[1]]
    if displacement is not None:
        index = [slice(None)] * len(shape)
        if ax is not None:
            index[ax] = s
        u = np.asarray(displacement[(slice(None), *index)], dtype=np.float64)[list(plane)]
        rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return u + np.stack([rr, cc])
    mapped = transform.map_points(_plane_points(shape, ax, s, plane))
    return mapped[:, list(plane)].T.reshape(2, h, w)


def _level_lines(values: np.ndarray, spacing: float, sample_px):
    """Contours of ``values`` at every multiple of ``spacing`` in its range, clipped to the grid."""
    from skimage.measure import find_contours

    lo, hi = float(values.min()), float(values.max())
    k0, k1 = math.ceil(lo / spacing - 1e-9), math.floor(hi / spacing + 1e-9)
    if k1 - k0 + 1 > MAX_LINES:
        factor = math.ceil((k1 - k0 + 1) / MAX_LINES)
        spacing *= factor
        k0, k1 = math.ceil(lo / spacing - 1e-9), math.floor(hi / spacing + 1e-9)
    # One voxel of linear extrapolation on every side, so that lines lying exactly on the first or
    # last row are found too; the parts outside the voxel centres are cut off again below.
    padded = np.pad(values, 1, mode="reflect", reflect_type="odd")
    upper = np.asarray(values.shape, dtype=np.float64) - 1
    # Value range of each band of cells (two neighbouring rows, or columns): a level can only
    # cross the cells of bands whose range holds it, so each search runs on a small crop.
    bands = []
    for axis in (1, 0):
        lo_, hi_ = padded.min(axis=axis), padded.max(axis=axis)
        bands.append((np.minimum(lo_[:-1], lo_[1:]), np.maximum(hi_[:-1], hi_[1:])))
    out = []
    for k in range(k0, k1 + 1):
        level = k * spacing
        (rlo, rhi), (clo, chi) = bands
        rows = np.flatnonzero((rlo <= level) & (level <= rhi))
        cols = np.flatnonzero((clo <= level) & (level <= chi))
        if len(rows) == 0 or len(cols) == 0:
            continue
        r0, c0 = rows[0], cols[0]
        crop = padded[r0 : rows[-1] + 2, c0 : cols[-1] + 2]
        for c in find_contours(crop, level):
            for piece in _clip(c + (r0 - 1.0, c0 - 1.0), upper):
                piece = _thin(piece, sample_px)
                if piece is not None:
                    out.append((level, piece))
    return out, spacing


def _clip(line: np.ndarray, upper: np.ndarray, tol: float = 1e-3) -> list[np.ndarray]:
    """Runs of consecutive vertices inside ``[0, upper]`` (within ``tol``), clamped into it."""
    inside = np.all((line >= -tol) & (line <= upper + tol), axis=1)
    edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [np.clip(line[a:b], 0.0, upper) for a, b in zip(starts, stops) if b - a >= 2]


def _thin(line: np.ndarray, sample_px) -> np.ndarray | None:
    """Keep a vertex about every ``sample_px`` of arc length (ends kept); ``None`` if degenerate."""
    seg = np.linalg.norm(np.diff(line, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] <= 1e-9:
        return None
    if sample_px is None:
        return line
    idx = np.unique(np.searchsorted(cum, np.arange(0.0, cum[-1], sample_px), side="left"))
    if idx[-1] != len(line) - 1:
        idx = np.append(idx, len(line) - 1)
    return line[idx]


def _sampling_lines(transform, shape, ax, s, plane, spacing, sample_px):
    """Regular fixed-grid lines of one slice mapped by ``phi``, in-plane moving coordinates."""
    step = float(sample_px) if sample_px is not None else 1.0
    lines = []
    for j, p in enumerate(plane):
        q = plane[1 - j]
        levels = np.arange(0.0, shape[p] - 1 + 1e-9, spacing)
        if len(levels) > MAX_LINES:
            levels = levels[:: math.ceil(len(levels) / MAX_LINES)]
        t = np.arange(0.0, shape[q] - 1, step)
        t = np.append(t, shape[q] - 1.0) if shape[q] > 1 else np.zeros(1)
        if len(t) < 2:
            continue
        pts = np.empty((len(levels), len(t), len(shape)), dtype=np.float64)
        pts[..., p] = levels[:, None]
        pts[..., q] = t[None, :]
        if ax is not None:
            pts[..., ax] = s
        mapped = transform.map_points(pts.reshape(-1, len(shape))).reshape(pts.shape)
        for level, line in zip(levels, mapped):
            lines.append((p, float(level), line[:, list(plane)]))
    return lines


def grid_image(
    transform,
    moving_shape: Sequence[int],
    spacing_px: float,
    output_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """The deformation grid as an image on the fixed grid: a grid painted on the moving image, warped.

    Planes (lines in 2D) of value 1 at the moving voxels nearest to ``0, s, 2s, ...`` along each
    axis (``s = spacing_px``, which need not be an integer: use the ``metadata["spacing_px"]`` of
    :func:`deformation_grid`), pulled back with ``transform.warp`` (linear, so lines are about one
    voxel wide): the raster version of the ``"warped"`` grid lines. float32, ``output_shape``
    (default: the transform's fixed shape, as for ``transform.warp``).
    """
    shape = tuple(int(n) for n in moving_shape)
    if len(shape) != transform.ndim or min(shape, default=0) < 1:
        raise InputError(f"moving_shape {shape} must have {transform.ndim} non-empty axes.")
    if not (np.isfinite(spacing_px) and spacing_px > 0):
        raise InputError(f"spacing_px must be a positive number of voxels, got {spacing_px}.")
    painted = np.zeros(shape, np.float32)
    for axis, n in enumerate(shape):
        index = [slice(None)] * len(shape)
        index[axis] = np.unique(np.round(np.arange(0.0, n - 0.5, float(spacing_px))).astype(np.int64))
        painted[tuple(index)] = 1.0
    return np.asarray(transform.warp(painted, output_shape=output_shape), np.float32)
