"""Pixel grids of a whole slide at a chosen pixel size, reading a slide on them, and fields on them.

A :class:`Grid` is the slide's level-0 plane sampled every ``factor`` level-0 pixels, pixel centres
aligned as in a pyramid (grid pixel ``i`` is centred on level-0 coordinate ``(i + 0.5) * factor - 0.5``,
the convention of :func:`napari_nephi.core.lazy_warp.warp_lazy` and OpenCV's area resize). Slides are
read onto a grid lazily, tile by tile, from the level closest in pixel size; nothing is loaded whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...core.lazy_warp import warp_lazy
from ...core.transform import AffineTransform, DisplacementTransform, IdentityTransform, Transform


@dataclass(frozen=True)
class Grid:
    """``shape`` pixels of ``um`` um/px covering a level-0 plane of ``level0_shape`` at ``level0_um``."""

    level0_shape: tuple[int, int]
    level0_um: float
    um: float

    @property
    def factor(self) -> float:
        """Level-0 pixels per grid pixel."""
        return self.um / self.level0_um

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(max(1, math.ceil(n / self.factor)) for n in self.level0_shape)

    def to_level0(self) -> np.ndarray:
        """3x3 homogeneous map of grid pixels (y, x) to level-0 pixels."""
        f = self.factor
        return np.array([[f, 0, (f - 1) / 2], [0, f, (f - 1) / 2], [0, 0, 1.0]])

    def from_level0(self) -> np.ndarray:
        """3x3 homogeneous map of level-0 pixels (y, x) to grid pixels."""
        return np.linalg.inv(self.to_level0())

    def world_affine(self) -> np.ndarray:
        """4x4 NIfTI affine (i, j -> um) of the grid, level-0 pixel 0 at the origin."""
        off = (self.um - self.level0_um) / 2
        return np.array([[self.um, 0, 0, off], [0, self.um, 0, off], [0, 0, 1, 0], [0, 0, 0, 1.0]])

    def level0_world_affine(self) -> np.ndarray:
        return np.diag([self.level0_um, self.level0_um, 1.0, 1.0])


def read_on_grid(levels, grid: Grid, transform: Transform | None = None, *, fill: float = 255.0):
    """The slide (``levels``, level 0 first) on ``grid`` as a lazy float32 dask array.

    Without ``transform`` the grid is the slide's own; with it, ``grid`` is a fixed grid and the
    transform maps fixed level-0 pixels to the slide's level-0 pixels (the slide warped onto it).
    """
    t = IdentityTransform(2) if transform is None else transform
    return warp_lazy(levels, t, grid.shape, out_level_scale=grid.factor, fill=fill, dtype=np.float32)


def field_on_grid(field: np.ndarray, grid: Grid) -> list[Transform]:
    """Transforms that apply a ``(2, *grid.shape)`` pixel field of ``grid`` to level-0 pixels.

    ``[to grid, x -> x + u(x), back to level 0]``: a displacement on a coarser grid, in level-0
    pixels, with the existing transform kinds (so it saves and loads with the project format).
    """
    frames = {"spacing": (grid.um,) * 2, "world_affine": grid.world_affine()}
    level0 = {"spacing": (grid.level0_um,) * 2, "world_affine": grid.level0_world_affine()}
    down = AffineTransform(
        grid.from_level0(),
        **level0,
        moving_spacing=frames["spacing"],
        moving_world_affine=frames["world_affine"],
    )
    disp = DisplacementTransform(
        field, **frames, moving_spacing=frames["spacing"], moving_world_affine=frames["world_affine"]
    )
    up = AffineTransform(
        grid.to_level0(),
        **frames,
        moving_spacing=level0["spacing"],
        moving_world_affine=level0["world_affine"],
    )
    return [down, disp, up]


def grid_box(points: Sequence[float], grid: Grid) -> np.ndarray:
    """Level-0 points ``(N, 2)`` in grid pixels."""
    p = np.asarray(points, dtype=np.float64)
    return p @ grid.from_level0()[:2, :2].T + grid.from_level0()[:2, 2]
