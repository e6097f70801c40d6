"""The unwarped moving region behind a box of a fixed grid, and where the box's pixels fall in it.

The refinement samples the moving slide once through the composed map (current map, then its
correction) instead of resampling a pre-warped image; this gives it what it samples.
"""

from __future__ import annotations

import numpy as np

from ...core.lazy_warp import choose_level, level_factors, transform_scale
from ...core.transform import Transform
from .grids import Grid

#: A region read for a box may hold at most this many pixels per box pixel (else: ``None``).
MAX_AREA_RATIO = 16.0


class MovingRegions:
    """Reads, for boxes of ``grid``, the moving level that ``warp_lazy`` would read (the one closest
    in pixel size) and the coordinates of the box's pixels in it under ``transform``."""

    def __init__(self, levels, grid: Grid, transform: Transform, fill: float):
        self.grid, self.transform, self.fill = grid, transform, float(fill)
        factors = level_factors(levels)
        shape0 = tuple(max(1, round(n * grid.factor)) for n in grid.shape)
        k = choose_level(factors, grid.factor * transform_scale(transform, shape0))
        self.level, self.factor = levels[k], np.asarray(factors[k], dtype=np.float64)

    def coords(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """``(2, y1 - y0, x1 - x0)`` level coordinates (y, x) of the box's grid pixels."""
        y0, y1, x0, x1 = box
        f = self.grid.factor
        ys, xs = ((np.arange(a, b, dtype=np.float64) + 0.5) * f - 0.5 for a, b in ((y0, y1), (x0, x1)))
        pts = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
        mapped = (self.transform.map_points(pts) + 0.5) / self.factor - 0.5
        return mapped.T.reshape(2, y1 - y0, x1 - x0)

    def __call__(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """``(region, coords)``: the level's pixels around the mapped box (``fill`` outside the slide,
        float32, samples last as in the slide) and the box's coordinates relative to the region's
        corner; ``None`` when the box maps nowhere finite or spreads over too large a region."""
        c = self.coords(box)
        finite = np.isfinite(c).all(axis=0)
        if not finite.any():
            return None
        lo = np.floor(c[:, finite].min(axis=1)).astype(int) - 2
        hi = np.ceil(c[:, finite].max(axis=1)).astype(int) + 3
        if np.prod(hi - lo) > MAX_AREA_RATIO * c[0].size:
            return None
        h, w = self.level.shape[:2]
        r0, r1 = np.clip([lo[0], hi[0]], 0, h)
        s0, s1 = np.clip([lo[1], hi[1]], 0, w)
        region = np.full((hi[0] - lo[0], hi[1] - lo[1], *self.level.shape[2:]), self.fill, np.float32)
        if r1 > r0 and s1 > s0:
            region[r0 - lo[0] : r1 - lo[0], s0 - lo[1] : s1 - lo[1]] = np.asarray(self.level[r0:r1, s0:s1])
        c -= lo[:, None, None]
        return region, np.nan_to_num(c, nan=-1e6).astype(np.float32)


__all__ = ["MovingRegions"]
