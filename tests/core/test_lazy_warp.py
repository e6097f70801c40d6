"""Lazy tile-by-tile warps of slides: equal to the in-memory warp, reading only what each tile needs."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.transform import downscale_local_mean

from napari_nephi.core.errors import DimensionMismatchError, InputError
from napari_nephi.core.lazy_warp import warp_lazy, warp_pyramid
from napari_nephi.core.transform import AffineTransform, ComposedTransform, DisplacementTransform
from napari_nephi.io.slides import as_slide

#: both map in float32; the lazy warp samples relative to its read box: a few thousandths of a grey level
TOL = 0.05


def _texture(shape, seed=0, rgb=False):
    rng = np.random.default_rng(seed)
    full = shape + ((3,) if rgb else ())
    sigma = (3, 3, 0) if rgb else 3
    img = gaussian_filter(rng.random(full), sigma)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.float32)


def _rigid(angle_deg, shift, centre):
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = np.asarray(centre, float)
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = c - r @ c + np.asarray(shift, float)
    return AffineTransform(m)


def _smooth_field(shape, amplitude, seed=1):
    u = gaussian_filter(np.random.default_rng(seed).normal(size=(2, *shape)), (0, 12, 12))
    return (u * amplitude / np.abs(u).max()).astype(np.float32)


def _transforms(shape):
    return {
        "affine": _rigid(17.0, (6.5, -4.25), np.asarray(shape) / 2),
        "displacement": DisplacementTransform(_smooth_field(shape, 6.0)),
    }


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("kind", ["affine", "displacement"])
def test_level0_equals_in_memory_warp(rgb, kind):
    moving = _texture((150, 130), rgb=rgb)
    transform = _transforms((140, 120))[kind]
    expected = transform.warp(moving, (140, 120))

    lazy = warp_lazy([moving], transform, (140, 120), chunk=48, fill=0)

    assert isinstance(lazy, da.Array)
    assert lazy.chunks[:2] == ((48, 48, 44), (48, 48, 24))
    out = lazy.compute()
    assert out.shape == expected.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=TOL)


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("kind", ["affine", "displacement"])
def test_pyramid_levels_equal_in_memory_warp_of_the_matching_level(rgb, kind):
    level0 = _texture((256, 224), seed=2, rgb=rgb)
    level1 = downscale_local_mean(level0, (2, 2, 1) if rgb else (2, 2)).astype(np.float32)
    moving = as_slide([level0, level1])
    transform = _transforms((240, 200))[kind]

    pyramid = warp_pyramid(moving, transform, (240, 200), 3, fill=0, chunk=40)

    assert [p.shape[:2] for p in pyramid] == [(240, 200), (120, 100), (60, 50)]
    # level 1: output pixel i sits on fixed level-0 pixel 2 i + 0.5; moving level 1 likewise
    to_fixed0 = AffineTransform([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1]])
    to_moving1 = AffineTransform([[0.5, 0, -0.25], [0, 0.5, -0.25], [0, 0, 1]])
    expected = ComposedTransform([to_fixed0, transform, to_moving1]).warp(level1, (120, 100))
    np.testing.assert_allclose(pyramid[1].compute(), expected, atol=TOL)
    # and it is close to the level-0 result averaged 2x2 (the texture is smooth)
    full = pyramid[0].compute()
    averaged = full.reshape(120, 2, 100, 2, *full.shape[2:]).mean(axis=(1, 3))
    inside = (slice(8, -8), slice(8, -8))
    assert np.median(np.abs(pyramid[1].compute()[inside] - averaged[inside])) < 2.0


def test_uint8_rgb_keeps_dtype_and_fills_outside_with_white():
    moving = np.round(_texture((100, 90), seed=3, rgb=True)).astype(np.uint8)
    shift = AffineTransform([[1, 0, 40], [0, 1, 0], [0, 0, 1]])  # rows 60.. map past the slide

    out = warp_lazy([moving], shift, (100, 90), chunk=32).compute()

    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:59], moving[40:99])
    assert np.all(out[61:] == 255)


class CountingArray:
    """A huge virtual image whose value is linear in (y, x, channel); records every region read."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.reads: list[tuple[int, int, int, int]] = []

    @staticmethod
    def value(y, x, c):
        return 0.01 * y + 0.003 * x + 100.0 * c

    def __getitem__(self, index):
        ys, xs = index[:2]
        (y0, y1, _), (x0, x1, _) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        self.reads.append((y0, y1, x0, x1))
        yy, xx, cc = np.meshgrid(
            np.arange(y0, y1), np.arange(x0, x1), np.arange(self.shape[2]), indexing="ij"
        )
        return self.value(yy, xx, cc).astype(self.dtype)


def test_one_tile_of_a_20000_square_rgb_slide_reads_only_its_region():
    big = CountingArray((20000, 20000, 3))
    moving = da.from_array(big, chunks=(2048, 2048, 3), asarray=False)
    transform = _rigid(30.0, (120.0, -75.0), (10000, 10000))

    lazy = warp_lazy([moving], transform, (20000, 20000), chunk=256)
    assert big.reads == [] or all((r[1] - r[0]) * (r[3] - r[2]) <= 1 for r in big.reads)
    big.reads.clear()
    tile = lazy.blocks[40, 37].compute()

    assert tile.shape == (256, 256, 3)
    area = sum((r[1] - r[0]) * (r[3] - r[2]) for r in big.reads)
    assert 0 < area <= 2 * (256 * 1.37 + 4) ** 2  # the rotated tile's bounding box, not the slide
    ys, xs = np.meshgrid(np.arange(40 * 256, 41 * 256), np.arange(37 * 256, 38 * 256), indexing="ij")
    mapped = transform.map_points(np.c_[ys.ravel(), xs.ravel()].astype(float))
    expected = np.stack([CountingArray.value(mapped[:, 0], mapped[:, 1], c) for c in range(3)], -1)
    np.testing.assert_allclose(tile.reshape(-1, 3), expected, atol=0.01)


def test_coarser_moving_level_is_read_when_the_output_is_coarse():
    levels = [CountingArray((4096 // 2**k, 4096 // 2**k, 1)) for k in range(4)]
    zoom_out = AffineTransform([[4, 0, 0], [0, 4, 0], [0, 0, 1]])  # output px = 4 moving level-0 px

    out = warp_lazy(levels, zoom_out, (1024, 1024), chunk=512).compute()

    assert [bool(level.reads) for level in levels] == [False, False, True, False]
    # output pixel i is moving level-0 4 i, i.e. level-2 pixel (4 i + 0.5) / 4 - 0.5 = i - 0.375
    i = np.arange(1024) - 0.375
    expected = CountingArray.value(i[:, None], np.clip(i, 0, None)[None, :], 0)
    np.testing.assert_allclose(out[1:, 1:, 0], expected[1:, 1:], atol=1e-3)


def test_a_tile_whose_source_is_too_large_is_split():
    level = CountingArray((2048, 2048, 1))
    zoom_out = AffineTransform([[8, 0, 0], [0, 8, 0], [0, 0, 1]])  # only level 0: 8x8 source per pixel

    out = warp_lazy([level], zoom_out, (256, 256), chunk=128).compute()

    assert max((r[1] - r[0]) * (r[3] - r[2]) for r in level.reads) <= 16 * 4096
    y = 8.0 * np.arange(256)
    np.testing.assert_allclose(out[..., 0], CountingArray.value(y[:, None], y[None, :], 0), atol=1e-3)


def test_bad_arguments_raise_clear_errors():
    moving = np.zeros((20, 20), np.float32)
    ident = AffineTransform(np.eye(3))
    with pytest.raises(DimensionMismatchError, match="2D napari_nephi Transform"):
        warp_lazy([moving], AffineTransform(np.eye(4)), (20, 20))
    with pytest.raises(DimensionMismatchError, match="every level must be"):
        warp_lazy([np.zeros((4, 20, 20))], ident, (20, 20))
    with pytest.raises(InputError, match="chunk must be at least 16"):
        warp_lazy([moving], ident, (20, 20), chunk=4)
    with pytest.raises(InputError, match="order must be one of"):
        warp_lazy([moving], ident, (20, 20), order=3)
    with pytest.raises(InputError, match="out_level_scale must be greater than 0"):
        warp_lazy([moving], ident, (20, 20), out_level_scale=0)
    with pytest.raises(InputError, match="no levels"):
        warp_lazy([], ident, (20, 20))


def test_nearest_neighbour_warp_of_labels_matches_warp_labels():
    labels = (np.arange(90 * 80).reshape(90, 80) // 37 % 11).astype(np.uint16)
    transform = _rigid(23.0, (3.3, -2.1), (45, 40))
    expected = transform.warp_labels(labels, (90, 80))

    out = warp_lazy([labels], transform, (90, 80), chunk=32, order=0, fill=0).compute()

    assert out.dtype == np.uint16
    assert np.mean(out == expected) > 0.999  # ties at exactly half a pixel may round either way


def test_a_tile_holds_few_arrays_of_its_size():
    """One 512^2 RGB tile (rotated: its read box is ~1.8x larger) traces under 48 bytes per output
    pixel in numpy arrays (it traced 80 with float64 copies of the points); the values are exact."""
    import tracemalloc

    from scipy.ndimage import map_coordinates

    moving = np.round(_texture((700, 700), seed=4, rgb=True)).astype(np.uint8)
    transform = _rigid(25.0, (3.5, -2.25), (350, 350))
    lazy = warp_lazy([moving], transform, (512, 512), chunk=512, fill=0)
    tracemalloc.start()
    try:
        tile = lazy.compute(scheduler="synchronous")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 48 * 512 * 512, f"{peak / 512**2:.0f} bytes per pixel"
    ys, xs = np.meshgrid(np.arange(512), np.arange(512), indexing="ij")
    mapped = transform.map_points(np.c_[ys.ravel(), xs.ravel()].astype(float)).T
    want = np.stack([map_coordinates(moving[..., c].astype(float), mapped, order=1) for c in range(3)], -1)
    inside = (mapped.min(0) >= 0) & (mapped.max(0) <= 699)
    np.testing.assert_allclose(tile.reshape(-1, 3)[inside], np.round(want[inside]), atol=1)
