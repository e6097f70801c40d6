"""TIFF / OME-TIFF / ImageJ reading and writing, and lazy pyramids."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.io import read_tiff, write_pyramidal_tiff, write_tiff

CASES = [
    ((12, 17), (0.5, 2.0), np.int16),
    ((12, 17), (0.3, 0.7), np.float32),
    ((5, 12, 17), (3.0, 0.5, 0.25), np.uint16),
    ((5, 12, 17), (2.5, 0.123456789, 0.3), np.uint8),
    ((5, 12, 17), (1.2, 0.9, 0.9), np.float64),
    ((5, 12, 17), (4.0, 1.0, 1.0), np.int32),
    ((5, 12, 17), (4.0, 0.5, 0.5), np.int64),
    ((12, 17), (0.5, 0.5), np.uint64),
    ((3, 5, 12, 17), (7.0, 3.0, 0.5, 0.25), np.float32),
]


def _random(shape, dtype, seed=0):
    return np.random.default_rng(seed).uniform(0, 200, shape).astype(dtype)


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".ome.tif"])
@pytest.mark.parametrize(("shape", "spacing", "dtype"), CASES)
def test_round_trip_keeps_values_dtype_and_spacing(tmp_path, suffix, shape, spacing, dtype):
    data = _random(shape, dtype)
    original = data.copy()
    path = tmp_path / f"img{suffix}"

    returned = write_tiff(path, data, spacing)
    back, meta = read_tiff(path)

    assert returned == str(path)
    assert isinstance(back, np.ndarray)
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    assert meta["scale"] == tuple(float(s) for s in spacing)
    assert meta["rgb"] is False
    assert meta["multiscale"] is False
    assert meta["name"] == "img"
    np.testing.assert_array_equal(data, original)
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize(
    ("suffix", "dtype", "imagej"),
    [
        (".tif", np.uint16, True),
        (".tif", np.float32, True),
        (".tif", np.int32, False),
        (".ome.tif", np.uint8, False),
    ],
)
def test_writer_picks_imagej_or_ome(tmp_path, suffix, dtype, imagej):
    path = tmp_path / f"a{suffix}"
    write_tiff(path, np.zeros((3, 4, 5), dtype), (2.0, 0.5, 0.5))
    with tifffile.TiffFile(path) as tf:
        assert tf.is_imagej == imagej
        assert tf.is_ome == (not imagej)


@pytest.mark.parametrize("suffix", [".tif", ".ome.tif"])
def test_rgb_round_trip_keeps_samples_last(tmp_path, suffix):
    rgb = _random((9, 11, 3), np.uint8)
    write_tiff(tmp_path / f"c{suffix}", rgb, (0.3, 0.7), rgb=True)
    back, meta = read_tiff(tmp_path / f"c{suffix}")
    assert back.shape == (9, 11, 3)
    np.testing.assert_array_equal(back, rgb)
    assert meta["rgb"] is True
    assert meta["scale"] == (0.3, 0.7)


def test_reads_imagej_spacing_written_by_tifffile(tmp_path):
    data = _random((4, 6, 8), np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        data,
        imagej=True,
        resolution=(1 / 0.2, 1 / 0.4),
        metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"},
    )
    back, meta = read_tiff(tmp_path / "ij.tif")
    np.testing.assert_array_equal(back, data)
    assert meta["scale"] == (1.5, 0.4, 0.2)
    assert meta["metadata"]["unit"] == "um"


def test_plain_tiff_without_metadata_has_unit_spacing(tmp_path):
    data = _random((3, 6, 8), np.uint8)
    tifffile.imwrite(tmp_path / "plain.tif", data, metadata=None, photometric="minisblack")
    back, meta = read_tiff(tmp_path / "plain.tif")
    np.testing.assert_array_equal(back, data)
    assert meta["scale"] == (1.0, 1.0, 1.0)


def test_ome_channel_axis_is_reported_and_left_out_of_scale(tmp_path):
    data = _random((2, 4, 6, 8), np.uint16)  # C, Z, Y, X
    tifffile.imwrite(
        tmp_path / "ch.ome.tif",
        data,
        metadata={"axes": "CZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 2.0},
    )
    back, meta = read_tiff(tmp_path / "ch.ome.tif")
    np.testing.assert_array_equal(back, data)
    assert meta["channel_axis"] == 0
    assert meta["scale"] == (2.0, 0.3, 0.2)


def test_lazy_flag_opens_flat_file_as_dask(tmp_path):
    data = _random((4, 32, 48), np.float32)
    write_tiff(tmp_path / "f.tif", data, (2.0, 1.0, 1.0))
    back, meta = read_tiff(tmp_path / "f.tif", lazy=True)
    assert isinstance(back, da.Array)
    np.testing.assert_array_equal(back[1, 3:9].compute(), data[1, 3:9])
    assert meta["scale"] == (2.0, 1.0, 1.0)


def _block_mean(a):
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean(axis=(1, 3))


@pytest.fixture
def no_full_reads(monkeypatch):
    """Fail the test if any code path decodes a whole TIFF series or file into memory."""

    def forbidden(*args, **kwargs):
        raise AssertionError("whole image read; a pyramid must open lazily")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", forbidden)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", forbidden)


def test_pyramid_opens_lazily_as_multiscale(tmp_path, no_full_reads):
    data = _random((512, 768), np.uint16)
    path = tmp_path / "slide.ome.tif"
    write_pyramidal_tiff(path, data, levels=3, tile=(128, 128), spacing=(0.5, 0.25))

    levels, meta = read_tiff(path)

    assert meta["multiscale"] is True
    assert meta["scale"] == (0.5, 0.25)
    assert isinstance(levels, list)
    assert all(isinstance(level, da.Array) for level in levels)
    assert [level.shape for level in levels] == [(512, 768), (256, 384), (128, 192)]
    assert all(level.dtype == np.uint16 for level in levels)
    np.testing.assert_array_equal(levels[0][100:140, 200:230].compute(), data[100:140, 200:230])
    expected = np.round(_block_mean(data.astype(np.float64))).astype(np.uint16)
    np.testing.assert_array_equal(levels[1][:20, :30].compute(), expected[:20, :30])
    assert os.listdir(tmp_path) == [path.name]


def test_rgb_3d_pyramid_keeps_samples_last(tmp_path, no_full_reads):
    data = _random((2, 128, 96, 3), np.uint8)
    path = tmp_path / "rgb.ome.tif"
    write_pyramidal_tiff(path, data, levels=2, tile=(32, 32), spacing=(4.0, 0.5, 0.5), rgb=True)

    levels, meta = read_tiff(path)

    assert meta["rgb"] is True
    assert meta["scale"] == (4.0, 0.5, 0.5)
    assert [level.shape for level in levels] == [(2, 128, 96, 3), (2, 64, 48, 3)]
    np.testing.assert_array_equal(levels[0][1, :10, :10].compute(), data[1, :10, :10])


def test_nearest_pyramid_keeps_label_values(tmp_path):
    labels = np.random.default_rng(1).integers(0, 5, (64, 64)).astype(np.int32)
    write_pyramidal_tiff(tmp_path / "l.tif", labels, levels=2, tile=(16, 16), downsample="nearest")
    levels, _ = read_tiff(tmp_path / "l.tif")
    np.testing.assert_array_equal(levels[1].compute(), labels[::2, ::2])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"levels": 0}, InputError),
        ({"levels": 2, "tile": (100, 100)}, InputError),
        ({"levels": 2, "downsample": "cubic"}, InputError),
        ({"levels": 2, "spacing": (1.0,)}, InputError),
    ],
)
def test_pyramid_writer_rejects_bad_options(tmp_path, kwargs, error):
    with pytest.raises(error):
        write_pyramidal_tiff(tmp_path / "p.ome.tif", np.zeros((64, 64), np.uint8), **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "data", "kwargs", "error"),
    [
        ("a.tif", np.zeros(5), {}, InputError),
        ("a.tif", np.zeros((4, 5, 2)), {"rgb": True}, InputError),
        ("a.tif", np.zeros((4, 5)), {"spacing": (1.0, 0.0)}, InputError),
        ("a.svs", np.zeros((4, 5)), {}, UnsupportedFileError),
        ("a.png", np.zeros((4, 5)), {}, UnsupportedFileError),
    ],
)
def test_tiff_writer_rejects_bad_input(tmp_path, name, data, kwargs, error):
    with pytest.raises(error):
        write_tiff(tmp_path / name, data, **kwargs)
    assert os.listdir(tmp_path) == []
