"""Whole slides: opening pyramids lazily, building missing levels, choosing levels, reading regions."""

from __future__ import annotations

import sys
import types

import dask.array as da
import numpy as np
import pytest
import tifffile
from skimage.transform import downscale_local_mean

from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.core.lazy_warp import level_factors
from napari_nephi.io import can_read, read_image, write_pyramidal_tiff
from napari_nephi.io.slides import Slide, as_slide, level_for_spacing, open_slide, read_region


def _rgb(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_as_slide_adds_lazy_2x2_mean_levels():
    image = _rgb((1200, 1040))
    original = image.copy()

    slide = as_slide(image, 0.5, name="s")

    assert [lvl.shape for lvl in slide.levels] == [(1200, 1040, 3), (600, 520, 3), (300, 260, 3)]
    assert all(isinstance(lvl, da.Array) for lvl in slide.levels)
    assert slide.rgb and slide.spacing == (0.5, 0.5) and slide.name == "s"
    expected = np.round(downscale_local_mean(image.astype(float), (2, 2, 1)))
    np.testing.assert_array_equal(slide.levels[1].compute(), expected.astype(np.uint8))
    assert slide.level_spacing(2) == (2.0, 2.0)
    np.testing.assert_array_equal(image, original)


def test_odd_sizes_repeat_the_edge_like_the_tiff_writer():
    image = np.arange(1031 * 517, dtype=np.float32).reshape(1031, 517)
    slide = as_slide(image)

    level1 = slide.levels[1].compute()

    assert level1.shape == (516, 259)
    padded = np.pad(image, ((0, 1), (0, 1)), mode="edge")
    np.testing.assert_allclose(level1, downscale_local_mean(padded, (2, 2)))


def test_level_pixel_sizes_follow_the_factors_the_lazy_warp_reads():
    image = np.zeros((1031, 517), np.float32)
    slide = as_slide([image, image[::2, ::2], np.zeros((300, 150), np.float32)], 0.5)

    # 1031 -> 516 and 517 -> 259 are roundings of a halving: exactly 2 (the plain ratio is 1.998)
    assert slide.level_spacing(1) == (1.0, 1.0)
    # a level that is no rounding of a whole factor keeps the plain ratio
    assert slide.level_spacing(2) == pytest.approx((0.5 * 1031 / 300, 0.5 * 517 / 150))
    assert [slide.level_spacing(k) for k in range(3)] == [
        (0.5 * fy, 0.5 * fx) for fy, fx in level_factors(slide.levels)
    ]
    assert level_for_spacing(slide, 0.9995) == (0, 0.5)
    assert level_for_spacing(slide, 1.0) == (1, 1.0)


def test_as_slide_keeps_given_levels_and_drops_alpha():
    rgba = np.dstack([_rgb((700, 600)), np.full((700, 600), 255, np.uint8)])
    given = [rgba, rgba[::2, ::2]]

    slide = as_slide(given, (0.25, 0.3))

    assert len(slide.levels) == 2 and slide.rgb
    np.testing.assert_array_equal(slide.levels[1].compute(), rgba[::2, ::2, :3])
    assert slide.spacing == (0.25, 0.3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((3, 40, 40)), "must be 2D"),
        (np.zeros((40, 40, 7)), "must be 2D"),
        ([np.zeros((10, 10)), np.zeros((20, 20))], "largest first"),
        ([], "at least one level"),
        (np.zeros((10, 10), dtype=object), "not numbers"),
    ],
)
def test_as_slide_refuses_what_is_not_a_slide(data, message):
    with pytest.raises(InputError, match=message):
        as_slide(data)


def test_open_slide_reads_a_pyramidal_ome_tiff_lazily(tmp_path):
    image = _rgb((1100, 900), seed=1)
    path = tmp_path / "he.ome.tif"
    write_pyramidal_tiff(path, image, 3, spacing=(0.5, 0.5), rgb=True)

    slide = open_slide(path)

    assert isinstance(slide, Slide) and slide.name == "he" and slide.rgb
    assert slide.spacing == (0.5, 0.5)
    assert [lvl.shape for lvl in slide.levels] == [(1100, 900, 3), (550, 450, 3), (275, 225, 3)]
    assert all(isinstance(lvl, da.Array) for lvl in slide.levels)
    np.testing.assert_array_equal(slide.levels[0][100:140, 200:260].compute(), image[100:140, 200:260])
    assert level_for_spacing(slide, 1.2) == (1, 1.0)
    assert level_for_spacing(slide, 0.1) == (0, 0.5)
    assert level_for_spacing(slide, 50.0) == (2, 2.0)


def test_open_slide_without_pixel_size_reports_none(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))

    slide = open_slide(path)

    assert slide.spacing is None and not slide.rgb
    with pytest.raises(InputError, match="pixel size of slide 'plain' is unknown"):
        level_for_spacing(slide, 1.0)


def test_open_slide_refuses_a_stack(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 40, 40), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(InputError, match="one 2D plane"):
        open_slide(path)


def test_openslide_format_without_the_extra_names_it(tmp_path, monkeypatch):
    path = tmp_path / "slide.ndpi"
    path.write_bytes(b"II*\x00 not a real slide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(UnsupportedFileError, match=r'pip install "napari-nephi\[openslide\]"'):
        open_slide(path)
    assert can_read(path)  # napari's reader takes it, and says what to install
    with pytest.raises(UnsupportedFileError, match=r"napari-nephi\[openslide\]"):
        read_image(path)


def test_unknown_format_is_refused(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(UnsupportedFileError, match="not a slide format"):
        open_slide(path)


class _FakeOpenSlide:
    """Stands in for openslide.OpenSlide over an RGBA array with a 4x level."""

    def __init__(self, path):
        rgba = np.zeros((800, 1200, 4), np.uint8)
        rgba[..., :3] = _rgb((800, 1200), seed=4)
        rgba[:, :600, 3] = 255  # the right half is transparent (no scan there)
        self.full = rgba
        self.level_count = 2
        self.level_dimensions = [(1200, 800), (300, 200)]
        self.level_downsamples = [1.0, 4.0]
        self.properties = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26"}

    def read_region(self, location, level, size):
        x, y = location
        w, h = size
        step = int(self.level_downsamples[level])
        return self.full[y : y + h * step : step, x : x + w * step : step]


def test_openslide_levels_read_regions_and_whiten_transparent_pixels(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(
        OpenSlide=_FakeOpenSlide,
        PROPERTY_NAME_MPP_X="openslide.mpp-x",
        PROPERTY_NAME_MPP_Y="openslide.mpp-y",
    )
    monkeypatch.setitem(sys.modules, "openslide", fake)
    path = tmp_path / "case.mrxs"
    path.write_bytes(b"fake")

    slide = open_slide(path)

    assert slide.spacing == (0.26, 0.25) and slide.rgb and slide.name == "case"
    assert [lvl.shape for lvl in slide.levels] == [(800, 1200, 3), (200, 300, 3)]
    full = _FakeOpenSlide(path).full
    np.testing.assert_array_equal(
        slide.levels[0][10:30, 500:580].compute()[:, :100], full[10:30, 500:580, :3]
    )
    assert np.all(slide.levels[0][10:30, 600:700].compute() == 255)
    np.testing.assert_array_equal(slide.levels[1][50:60, 20:40].compute(), full[200:240:4, 80:160:4, :3])
    [(data, meta, kind)] = read_image(path)
    assert kind == "image" and meta["multiscale"] and meta["rgb"] and meta["scale"] == (0.26, 0.25)
    assert [lvl.shape for lvl in data] == [(800, 1200, 3), (200, 300, 3)]


def test_read_region_picks_a_level_that_fits():
    image = _rgb((1200, 1040), seed=5)
    slide = as_slide(image)

    whole = read_region(slide, 0, max_pixels=2_000_000)
    coarse = read_region(slide, 0, max_pixels=600 * 520)
    tiny = read_region(slide, 1, max_pixels=100 * 100)

    assert isinstance(whole, np.ndarray) and whole.shape == image.shape
    assert coarse.shape == (600, 520, 3)
    np.testing.assert_array_equal(coarse, slide.levels[1].compute())
    assert tiny.shape[0] * tiny.shape[1] <= 100 * 100 and tiny.shape == (75, 65, 3)
    with pytest.raises(InputError, match="level must be a whole number in 0..2"):
        read_region(slide, 3)
    with pytest.raises(InputError, match="max_pixels must be a positive"):
        read_region(slide, 0, max_pixels=0)


def test_a_flat_striped_tiff_gets_coarse_levels_in_large_chunks(tmp_path):
    image = np.random.default_rng(6).integers(0, 256, (1100, 700), dtype=np.uint8)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, rowsperstrip=1)

    slide = open_slide(path)

    assert [lvl.shape for lvl in slide.levels] == [(1100, 700), (550, 350), (275, 175)]
    assert min(slide.levels[1].chunks[0][:-1] or (128,)) >= 128  # not one chunk per strip
    half = np.round(downscale_local_mean(image.astype(float), (2, 2))).astype(np.uint8)
    np.testing.assert_array_equal(slide.levels[1].compute(), half)


@pytest.mark.parametrize(
    ("resolution", "unit", "spacing"),
    [
        ((300, 300), "inch", (25400 / 300, 25400 / 300)),
        ((2, 4), "micron", (0.25, 0.5)),
        ((1, 1), "pixel", None),
    ],
)
def test_imagej_pixel_size_units(tmp_path, resolution, unit, spacing):
    """Inches are converted to um; ImageJ's uncalibrated "pixel" unit is an unknown pixel size, not 1 um."""
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path, np.zeros((64, 64), np.uint8), imagej=True, resolution=resolution, metadata={"unit": unit}
    )
    got = open_slide(path).spacing
    assert got is None if spacing is None else got == pytest.approx(spacing, rel=1e-6)
