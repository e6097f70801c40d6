"""Warp whole slides lazily: a dask array computed tile by tile, each tile reading only what it needs.

The moving slide is a list of levels (level 0 first; numpy, dask, or any array-like with ``shape``,
``dtype`` and slicing), or an object with such a ``levels`` attribute. Pixel ``i`` of a level
downsampled by ``f`` is centred on level-0 pixel ``(i + 0.5) * f - 0.5`` (a 2x2-mean pyramid).
The transform maps fixed level-0 pixels (y, x) to moving level-0 pixels (a pull-back).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch

from .errors import DimensionMismatchError, InputError
from .options import check_choice, check_float, check_int
from .transform import Transform, check_grid_shape
from .warp import sample

__all__ = ["warp_lazy", "warp_pyramid"]

#: a tile whose source box holds more than this many times its own pixels is split in four
MAX_READ_RATIO = 16
#: output pixels mapped through the transform at once
POINTS_PER_MAP = 1 << 16


def _levels(moving: Any) -> list[Any]:
    levels = getattr(moving, "levels", moving)
    levels = list(levels) if isinstance(levels, list | tuple) else [levels]
    if not levels:
        raise InputError("The moving slide has no levels; give at least one image.")
    samples = tuple(levels[0].shape[2:])
    for k, level in enumerate(levels):
        shape = tuple(level.shape)
        if len(shape) not in (2, 3) or tuple(shape[2:]) != samples or (samples and samples[0] > 4):
            raise DimensionMismatchError(
                f"Moving level {k} has shape {shape}; every level must be (y, x), or (y, x, C) with the "
                "same 1-4 samples last (RGB)."
            )
    return levels


def _factor(n0: int, n: int) -> float:
    """Level-0 pixels per level pixel along one axis: the whole ratio when the size is a rounding of it."""
    r = max(1, round(n0 / n))
    return float(r) if n in (n0 // r, -(-n0 // r)) else n0 / n


def level_factors(levels: Sequence[Any]) -> list[tuple[float, float]]:
    """``(y, x)`` downsample factor of every pyramid level against level 0."""
    y0, x0 = levels[0].shape[:2]
    return [(_factor(y0, level.shape[0]), _factor(x0, level.shape[1])) for level in levels]


def _map(transform: Transform, points: np.ndarray) -> np.ndarray:
    """``transform`` applied to ``(n, 2)`` points in float32, as :meth:`Transform.warp` does.

    float32 keeps a dense displacement field in its stored precision (no float64 copy of a large
    field); at 100000 px its rounding is below 0.01 px.
    """
    with torch.no_grad():
        return transform(torch.as_tensor(points, dtype=torch.float32)).numpy()


def transform_scale(transform: Transform, shape: Sequence[int], samples: int = 9) -> float:
    """Moving level-0 pixels per fixed level-0 pixel: ``sqrt(|det|)`` of the map's affine fit on ``shape``."""
    axes = [np.linspace(0, max(n - 1, 1), samples) for n in shape]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    y = _map(transform, x)
    fit = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0][:2]
    return float(math.sqrt(max(abs(np.linalg.det(fit)), 1e-12)))


def choose_level(factors: Sequence[tuple[float, float]], wanted: float) -> int:
    """The level whose downsample factor is closest to ``wanted`` (in log scale)."""
    cost = [abs(math.log(max(np.mean(f), 1e-12) / max(wanted, 1e-12))) for f in factors]
    return int(np.argmin(cost))


def _read(level: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, y1, x0, x1 = box
    part = level[y0:y1, x0:x1]
    if isinstance(part, da.Array):
        return part.compute(scheduler="synchronous")
    return np.asarray(part)


class _TileWarper:
    """One output tile: fixed coordinates -> moving level coordinates -> read their bounding box -> sample."""

    def __init__(self, level, factor, transform, scale, order, fill, dtype):
        self.level, self.factor, self.transform = level, factor, transform
        self.scale, self.order, self.fill, self.dtype = scale, order, float(fill), dtype
        self.samples = tuple(level.shape[2:])

    def coords(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Moving-level coordinates ``(n, 2)`` of output pixels on the grid ``ys`` x ``xs``.

        Mapped a few rows at a time (about :data:`POINTS_PER_MAP` points), so the transform's
        temporaries stay small.
        """
        out = np.empty((len(ys) * len(xs), 2), dtype=np.float64)
        fx = (xs.astype(np.float64) + 0.5) * self.scale - 0.5
        rows = max(1, POINTS_PER_MAP // max(len(xs), 1))
        for s in range(0, len(ys), rows):
            fy = (ys[s : s + rows].astype(np.float64) + 0.5) * self.scale - 0.5
            grid = np.stack(np.meshgrid(fy, fx, indexing="ij"), -1).reshape(-1, 2)
            out[s * len(xs) : s * len(xs) + len(grid)] = _map(self.transform, grid)
        out += 0.5
        out /= np.asarray(self.factor)
        out -= 0.5
        return out

    def __call__(self, block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"][:2]
        return self.tile(y0, y1, x0, x1)

    def tile(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        pts = self.coords(np.arange(y0, y1), np.arange(x0, x1))
        shape = (y1 - y0, x1 - x0) + self.samples
        low, high = _finite_bounds(pts)
        if low is None:
            return np.full(shape, self.fill, dtype=self.dtype)
        lo = np.floor(low).astype(np.int64) - 1
        hi = np.ceil(high).astype(np.int64) + 2
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.level.shape[:2])
        if np.any(hi <= lo):  # the whole tile maps outside the moving slide
            return np.full(shape, self.fill, dtype=self.dtype)
        area = float(np.prod(hi - lo))
        if area > MAX_READ_RATIO * max(pts.shape[0], 4096) and (y1 - y0 > 16 or x1 - x0 > 16):
            return self.split(y0, y1, x0, x1)
        src = _read(self.level, (int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1])))
        rel = np.empty(pts.shape, np.float32)  # relative to the box corner: float32 is exact enough
        np.subtract(pts, lo, out=rel, casting="same_kind")
        del pts
        return self.sample(src, rel, shape)

    def split(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
        ys = [(y0, ym), (ym, y1)] if y1 - y0 > 16 else [(y0, y1)]
        xs = [(x0, xm), (xm, x1)] if x1 - x0 > 16 else [(x0, x1)]
        return np.concatenate(
            [np.concatenate([self.tile(a, b, c, d) for c, d in xs], axis=1) for a, b in ys], axis=0
        )

    def sample(self, src: np.ndarray, pts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Interpolate ``src`` at float32 ``pts`` relative to its corner (``pts`` is overwritten).

        Works in place where it can: a float32 copy of ``src``, the points and the samples are the
        only arrays of the tile's size held at once.
        """
        chans = src.reshape(src.shape[:2] + (-1,))
        vol = np.moveaxis(chans, -1, 0).astype(np.float32)
        vol -= np.float32(self.fill)
        p = torch.as_tensor(np.nan_to_num(pts, copy=False, nan=-1e9))
        vals = sample(torch.as_tensor(vol), p, mode="nearest" if self.order == 0 else "bilinear").numpy()
        del vol, p
        vals += np.float32(self.fill)
        vals = np.moveaxis(vals, 0, -1).reshape(shape)
        if np.dtype(self.dtype).kind in "iub":
            info = np.iinfo(self.dtype) if np.dtype(self.dtype).kind != "b" else None
            vals = np.round(vals, out=vals)
            if info is not None:
                vals = np.clip(vals, info.min, info.max, out=vals)
        return vals.astype(self.dtype, copy=False)


def _finite_bounds(pts: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-column min and max of ``(n, 2)`` points over the rows that are finite (``None`` if none),
    without copying ``pts`` when no infinity is present (NaN is skipped by ``fmin``/``fmax``)."""
    low, high = np.fmin.reduce(pts, axis=0), np.fmax.reduce(pts, axis=0)
    if np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
        finite = ~np.isnan(pts).any(axis=1)  # a row with one NaN coordinate is not a point
        if finite.all():
            return low, high
    finite = np.isfinite(pts).all(axis=1)
    if not finite.any():
        return None, None
    good = pts[finite]
    return good.min(axis=0), good.max(axis=0)


def warp_lazy(
    moving: Any,
    transform: Transform,
    out_shape: Sequence[int],
    *,
    out_level_scale: float = 1,
    chunk: int = 1024,
    order: int = 1,
    fill: float = 255,
    dtype: Any = None,
) -> da.Array:
    """The moving slide warped onto a fixed grid of ``out_shape`` (y, x), lazily, tile by tile.

    ``out_level_scale``: fixed level-0 pixels per output pixel (``2**k`` for pyramid level ``k``);
    the moving level read is the one whose pixel size is closest to what the output needs. Each
    ``chunk`` x ``chunk`` tile maps its pixel centres, reads only the bounding box of the mapped
    coordinates (plus one pixel) and samples it linearly (``order=1``) or by nearest neighbour
    (``order=0``); outside the moving slide the value is ``fill`` (255: white brightfield
    background; 0: dark). The result has the moving dtype (integers rounded and clipped) unless
    ``dtype`` is given, and the moving samples (RGB) last. Memory is bounded by a few tiles.
    """
    levels = _levels(moving)
    if not isinstance(transform, Transform) or transform.ndim != 2:
        raise DimensionMismatchError(f"warp_lazy needs a 2D napari_nephi Transform, got {transform!r}.")
    shape = check_grid_shape(out_shape, 2, "out_shape")
    scale = check_float("out_level_scale", out_level_scale, 0, low_open=True)
    chunk = check_int("chunk", chunk, 16, 1 << 14)
    order = check_choice("order", order, (0, 1))
    fill = check_float("fill", fill)
    dtype = np.dtype(levels[0].dtype if dtype is None else dtype)
    factors = level_factors(levels)
    fixed0 = tuple(max(1, int(round(n * scale))) for n in shape)
    wanted = scale * transform_scale(transform, fixed0)
    k = choose_level(factors, wanted)
    warper = _TileWarper(levels[k], factors[k], transform, scale, order, fill, dtype)
    samples = tuple(levels[0].shape[2:])
    chunks = tuple(_split(n, chunk) for n in shape) + tuple((s,) for s in samples)
    name = f"warp-lazy-{uuid.uuid4().hex}"
    return da.map_blocks(
        warper, chunks=chunks, dtype=dtype, name=name, meta=np.empty((0,) * len(chunks), dtype)
    )


def _split(n: int, chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, n - s) for s in range(0, n, chunk))


def warp_pyramid(
    moving_levels: Any,
    transform: Transform,
    fixed_level0_shape: Sequence[int],
    n_levels: int | None = None,
    fill: float = 255,
    *,
    chunk: int = 1024,
    order: int = 1,
) -> list[da.Array]:
    """A lazy multiscale pyramid of the warped moving slide on the fixed slide's grid.

    Level ``k`` has the fixed level-0 shape halved ``k`` times (rounded up), samples fixed level-0
    coordinates ``(i + 0.5) * 2**k - 0.5`` and reads the moving level closest in pixel size.
    ``n_levels`` defaults to halving until the longer side is at most 512 pixels.
    """
    shape = check_grid_shape(fixed_level0_shape, 2, "fixed_level0_shape")
    if n_levels is None:
        n_levels = 1 + max(0, math.ceil(math.log2(max(shape) / 512))) if max(shape) > 512 else 1
    n_levels = check_int("n_levels", n_levels, 1, 32)
    out = []
    for k in range(n_levels):
        level_shape = tuple(max(1, math.ceil(n / 2**k)) for n in shape)
        out.append(
            warp_lazy(
                moving_levels,
                transform,
                level_shape,
                out_level_scale=2**k,
                chunk=chunk,
                order=order,
                fill=fill,
            )
        )
    return out
