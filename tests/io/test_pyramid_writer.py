"""Tiled pyramidal OME-TIFF written tile by tile from lazy levels: readable, exact, bounded, atomic."""

from __future__ import annotations

import os
import threading

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
from skimage.transform import downscale_local_mean

from napari_nephi.core.errors import Cancelled, InputError, UnsupportedFileError
from napari_nephi.core.lazy_warp import warp_pyramid
from napari_nephi.core.progress import Progress
from napari_nephi.core.transform import AffineTransform
from napari_nephi.io import tile_bands
from napari_nephi.io.pyramid_writer import write_ome_pyramid
from napari_nephi.io.slides import as_slide, open_slide


class GuardedArray:
    """An RGB image read only in blocks no larger than ``limit`` x ``limit``; counts every read."""

    def __init__(self, image, limit, fail_at=None):
        self.image, self.limit, self.fail_at = image, limit, fail_at
        self.shape, self.dtype, self.ndim = image.shape, image.dtype, image.ndim
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, index):
        ys, xs = index[:2]
        (y0, y1, _), (x0, x1, _) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        if y1 - y0 > self.limit or x1 - x0 > self.limit:
            raise AssertionError(f"a block of {y1 - y0} x {x1 - x0} was requested")
        if self.fail_at is not None and (y0, x0) == self.fail_at:
            raise RuntimeError("disk error while computing this tile")
        if y1 > y0 and x1 > x0:  # dask may probe with an empty slice
            self.reads.append((y0, x0))
        return self.image[index]


def _rgb(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _pixel_sizes(tf):
    pixels = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]["Pixels"]
    return pixels["PhysicalSizeY"], pixels["PhysicalSizeX"], pixels["PhysicalSizeXUnit"]


def test_lazy_levels_are_written_tile_by_tile_and_read_back(tmp_path):
    image = _rgb((1100, 900))
    guarded = GuardedArray(image, limit=256)
    level0 = da.from_array(guarded, chunks=(256, 256, 3), asarray=False)
    levels = as_slide(level0).levels
    path = tmp_path / "out.ome.tif"
    events = []

    returned = write_ome_pyramid(path, levels, spacing_um=(0.5, 0.25), tile=256, progress=events.append)

    assert returned == str(path)
    # every 256 block of level 0 was read exactly once per level that needs it, never whole
    assert len(guarded.reads) == len(set(guarded.reads)) * len(levels)
    assert len(set(guarded.reads)) == 5 * 4
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        assert tf.is_ome
        assert [lvl.shape for lvl in series.levels] == [(1100, 900, 3), (550, 450, 3), (275, 225, 3)]
        assert all(lvl.keyframe.tilewidth == 256 and lvl.keyframe.tilelength == 256 for lvl in series.levels)
        assert _pixel_sizes(tf) == (0.5, 0.25, "µm")
        np.testing.assert_array_equal(series.levels[0].asarray(), image)
        half = np.round(downscale_local_mean(image.astype(float), (2, 2, 1))).astype(np.uint8)
        np.testing.assert_array_equal(series.levels[1].asarray(), half)
    assert events[-1].step == events[-1].total and events[-1].stage == "write OME-TIFF"
    reopened = open_slide(path)
    assert reopened.spacing == (0.5, 0.25) and reopened.rgb


def test_grey_numpy_levels_and_a_single_array(tmp_path):
    grey = np.random.default_rng(1).random((700, 600)).astype(np.float32)
    given = [grey, grey[::2, ::2].copy()]

    write_ome_pyramid(tmp_path / "grey.ome.tif", given, tile=128, compression=None)
    write_ome_pyramid(tmp_path / "single.ome.tif", grey, spacing_um=0.4, tile=128)

    with tifffile.TiffFile(tmp_path / "grey.ome.tif") as tf:
        levels = tf.series[0].levels
        assert [lvl.shape for lvl in levels] == [(700, 600), (350, 300)]
        np.testing.assert_array_equal(levels[1].asarray(), given[1])
    with tifffile.TiffFile(tmp_path / "single.ome.tif") as tf:
        levels = tf.series[0].levels
        assert [lvl.shape for lvl in levels] == [(700, 600), (350, 300)]
        np.testing.assert_allclose(levels[1].asarray(), downscale_local_mean(grey, (2, 2)), rtol=1e-6)
        assert _pixel_sizes(tf)[:2] == (0.4, 0.4)


def test_a_failure_mid_way_leaves_no_file_and_keeps_the_old_one(tmp_path):
    image = _rgb((600, 600), seed=2)
    path = tmp_path / "out.ome.tif"
    path.write_bytes(b"earlier result")
    level0 = da.from_array(GuardedArray(image, 128, fail_at=(384, 256)), chunks=(128, 128, 3), asarray=False)

    with pytest.raises(RuntimeError, match="disk error"):
        write_ome_pyramid(path, [level0], tile=128)

    assert os.listdir(tmp_path) == ["out.ome.tif"]
    assert path.read_bytes() == b"earlier result"


def test_cancel_stops_the_writer_and_leaves_nothing(tmp_path):
    stop = threading.Event()
    seen = []

    level = da.from_array(_rgb((512, 256)), chunks=(128, 256, 3))  # four bands of rows

    def callback(event):
        seen.append(event.step)
        stop.set()

    with pytest.raises(Cancelled):
        write_ome_pyramid(tmp_path / "c.ome.tif", [level], tile=128, progress=Progress(callback, stop))

    assert seen == [1]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tile": 100}, InputError, "tile must be a multiple of 16"),
        ({"tile": 8}, InputError, "tile must be at least 16"),
        ({"compression": "gzip9"}, InputError, "compression must be one of"),
        ({"spacing_um": (0.5, -1)}, InputError, "spacing"),
    ],
)
def test_bad_options_are_refused(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        write_ome_pyramid(tmp_path / "x.ome.tif", [np.zeros((32, 32), np.uint8)], **kwargs)
    assert os.listdir(tmp_path) == []


def test_bad_levels_and_names_are_refused(tmp_path):
    with pytest.raises(UnsupportedFileError, match="must end in .ome.tif"):
        write_ome_pyramid(tmp_path / "x.png", [np.zeros((32, 32), np.uint8)])
    with pytest.raises(InputError, match="cannot hold int64"):
        write_ome_pyramid(tmp_path / "x.ome.tif", [np.zeros((32, 32), np.int64)])
    with pytest.raises(InputError, match="largest first"):
        write_ome_pyramid(
            tmp_path / "x.ome.tif", [np.zeros((16, 16), np.uint8), np.zeros((32, 32), np.uint8)]
        )
    with pytest.raises(InputError, match="same samples per pixel"):
        write_ome_pyramid(
            tmp_path / "x.ome.tif", [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16), np.uint8)]
        )


def test_a_lazily_warped_pyramid_is_written_and_read_back(tmp_path):
    moving = as_slide(_rgb((700, 650), seed=6), 0.5)
    shift = AffineTransform([[1, 0, 10], [0, 1, -20], [0, 0, 1]])
    levels = warp_pyramid(moving, shift, (640, 600), 2, chunk=256)
    path = write_ome_pyramid(tmp_path / "warped.ome.tif", levels, spacing_um=moving.spacing, tile=128)

    back = open_slide(path)
    assert back.spacing == (0.5, 0.5)
    level0 = back.levels[0].compute()
    np.testing.assert_array_equal(level0[:, 20:], moving.levels[0][10:650, :580].compute())
    assert np.all(level0[:, :19] == 255)
    np.testing.assert_array_equal(back.levels[1].compute(), levels[1].compute())


class RecordingArray:
    """A numpy image read through ``[y0:y1, x0:x1]`` (like an OpenSlide level); records each box read."""

    def __init__(self, image):
        self.image, self.shape, self.dtype, self.ndim = image, image.shape, image.dtype, image.ndim
        self.areas: list[int] = []

    def __getitem__(self, index):
        part = self.image[index]
        self.areas.append(part.shape[0] * part.shape[1])
        return part


def test_a_wide_level_is_read_in_groups_of_bounded_size(tmp_path, monkeypatch):
    monkeypatch.setattr(tile_bands, "MAX_BAND_BYTES", 8 * 32 * 32)  # eight 32 px grey tiles
    image = np.random.default_rng(7).integers(0, 256, (100, 4000), dtype=np.uint8)
    level = RecordingArray(image)

    write_ome_pyramid(tmp_path / "wide.ome.tif", [level], tile=32, compression=None)

    assert max(level.areas) <= 8 * 32 * 32  # the whole band (a tile row: 128000 px) is never read
    assert sum(level.areas) == image.size  # every pixel read once
    with tifffile.TiffFile(tmp_path / "wide.ome.tif") as tf:
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), image)


def _pattern(y0, y1, x0, x1):
    yy, xx = np.arange(y0, y1, dtype=np.int32)[:, None], np.arange(x0, x1, dtype=np.int32)
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = (yy * 7 + xx) % 251, (xx * 3) % 256 + 0 * yy, (yy + 2 * xx) % 253
    return out


def test_tall_bands_of_a_wide_lazy_level_are_spilled_not_held(tmp_path, monkeypatch):
    import tracemalloc

    rows, cols = 256, 16384  # one band of 256 x 16384 x 3 = 12 MiB, in 1024 px dask chunks
    level = da.map_blocks(
        lambda block_info=None: _pattern(*sum(block_info[None]["array-location"][:2], ())),
        chunks=((256,), (1024,) * 16, (3,)),
        dtype=np.uint8,
    )
    monkeypatch.setattr(tile_bands, "MAX_BAND_BYTES", 1 << 20)
    plan = tile_bands.plan_bands(level, 128)
    assert [(b.y0, b.y1, b.spill) for b in plan] == [(0, 256, True)]
    assert plan[0].groups == tuple((x, x + 1024) for x in range(0, cols, 1024))
    path = tmp_path / "wide.ome.tif"

    tracemalloc.start()
    try:
        with dask.config.set(scheduler="threads", num_workers=2):
            write_ome_pyramid(path, [level], tile=128, compression=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # the band alone is 12 MiB; computed whole (budget raised), this write peaks at 24 MiB
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB held"
    assert os.listdir(tmp_path) == ["wide.ome.tif"]  # the spill file is gone
    with tifffile.TiffFile(path) as tf:
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), _pattern(0, rows, 0, cols))


def test_narrow_bands_are_computed_whole(tmp_path):
    level = da.zeros((600, 700, 3), np.uint8, chunks=(256, 256, 3))
    plan = tile_bands.plan_bands(level, 128)
    assert [(b.y0, b.y1) for b in plan] == [(0, 256), (256, 512), (512, 600)]
    assert all(b.groups == ((0, 700),) and not b.spill for b in plan)
