"""The unwarped moving region behind a grid box: the same level, pixels and coordinates as the lazy warp."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import data
from skimage.transform import downscale_local_mean

from napari_nephi.core.transform import AffineTransform
from napari_nephi.engines.histology.grids import Grid, read_on_grid
from napari_nephi.engines.histology.moving_region import MovingRegions


def _slide_and_map():
    img = data.camera()[:300, :260].astype(np.float32)
    levels = [img, downscale_local_mean(img, 2).astype(np.float32)]
    a = np.deg2rad(7.0)
    m = np.array([[np.cos(a), -np.sin(a), 12.5], [np.sin(a), np.cos(a), -8.25], [0, 0, 1.0]]) * [
        [1.9],
        [1.9],
        [1],
    ]
    grid = Grid(level0_shape=(300, 260), level0_um=1.0, um=2.0)  # half the fixed resolution
    return levels, grid, AffineTransform(m)


def test_region_sampled_at_its_coordinates_equals_the_lazy_warp():
    """Bilinear samples of the region at the returned coordinates equal read_on_grid's warped slide
    (which reads the level closest in pixel size: level 1 for a map scaling by 1.9 at grid factor 2)."""
    levels, grid, transform = _slide_and_map()
    regions = MovingRegions(levels, grid, transform, fill=7.0)
    assert regions.level is levels[1]
    warped = np.asarray(read_on_grid(levels, grid, transform, fill=7.0))
    for box in [(10, 60, 20, 90), (0, 150, 0, 130)]:  # inside; the whole grid (partly off the slide)
        region, coords = regions(box)
        y0, y1, x0, x1 = box
        got = ndimage.map_coordinates(region, coords, order=1, mode="nearest")
        np.testing.assert_allclose(got, warped[y0:y1, x0:x1], atol=1e-2)
    assert (region == 7.0).any()  # outside the slide: the fill value


def test_region_is_none_where_the_map_spreads_too_far():
    """A map that blows a box up over far more pixels than it has: no region (the caller falls back)."""
    levels, grid, _ = _slide_and_map()
    wide = AffineTransform(np.diag([40.0, 40.0, 1.0]))
    assert MovingRegions(levels[:1], grid, wide, fill=0.0)((0, 20, 0, 20)) is None
