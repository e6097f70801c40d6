"""npe2 reader and writer contributions."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import tifffile

from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.io import (
    get_reader,
    read_image,
    tile_bands,
    write_image,
    write_labels,
    write_pyramidal_tiff,
)


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz", "A.NII.GZ", "a.tif", "a.tiff", "a.ome.tiff", "a.svs"])
def test_get_reader_accepts_supported_suffixes(name):
    assert callable(get_reader(name))
    assert callable(get_reader([name, "b.tif"]))


@pytest.mark.parametrize("path", ["a.png", "a.csv", "a.zarr", "a", ["a.tif", "b.png"], []])
def test_get_reader_returns_none_for_unsupported(path):
    assert get_reader(path) is None


def test_get_reader_folder_needs_tiffs(tmp_path):
    assert get_reader(str(tmp_path)) is None
    tifffile.imwrite(tmp_path / "s1.tif", np.zeros((4, 5), np.uint8))
    assert callable(get_reader(str(tmp_path)))


def test_reader_reads_every_path_of_a_list(tmp_path):
    paths = []
    for i, name in enumerate(["a.nii.gz", "b.tif"]):
        paths.append(write_image(str(tmp_path / name), np.full((3, 4), i, np.float32), {})[0])
    layers = get_reader(paths)(paths)
    assert [layer[1]["name"] for layer in layers] == ["a", "b"]
    assert [float(layer[0][0, 0]) for layer in layers] == [0.0, 1.0]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".tif", ".ome.tif"])
@pytest.mark.parametrize("shape", [(9, 11), (4, 9, 11)])
def test_write_image_uses_scale_as_spacing(tmp_path, suffix, shape):
    data = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    scale = (0.7, 1.9, 0.4)[-len(shape) :]
    meta = {"scale": np.array(scale), "name": "img", "metadata": {}}
    data0, meta0 = data.copy(), copy.deepcopy(meta)

    written = write_image(str(tmp_path / f"out{suffix}"), data, meta)

    assert written == [str(tmp_path / f"out{suffix}")]
    assert os.listdir(tmp_path) == [f"out{suffix}"]
    [(back, back_meta, _)] = read_image(written[0])
    np.testing.assert_array_equal(back, data)
    assert back_meta["scale"] == scale
    np.testing.assert_array_equal(data, data0)
    np.testing.assert_array_equal(meta["scale"], meta0["scale"])
    assert meta.keys() == meta0.keys()


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif", ".ome.tif"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_write_labels_keeps_integer_dtype(tmp_path, suffix, dtype):
    labels = np.random.default_rng(2).integers(0, 7, (3, 8, 9)).astype(dtype)
    [path] = write_labels(str(tmp_path / f"lab{suffix}"), labels, {"scale": (2.0, 1.0, 1.0)})
    [(back, meta, _)] = read_image(path)
    assert back.dtype == labels.dtype
    np.testing.assert_array_equal(back, labels)
    assert meta["scale"] == (2.0, 1.0, 1.0)


def test_write_labels_rejects_float(tmp_path):
    with pytest.raises(InputError, match="integers"):
        write_labels(str(tmp_path / "l.tif"), np.zeros((4, 4), np.float32), {})
    assert os.listdir(tmp_path) == []


def test_write_image_of_rgb_layer(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, (6, 7, 3)).astype(np.uint8)
    [path] = write_image(str(tmp_path / "c.tif"), rgb, {"rgb": True, "scale": (0.5, 0.5)})
    [(back, meta, _)] = read_image(path)
    np.testing.assert_array_equal(back, rgb)
    assert meta["rgb"] is True


def test_write_image_of_multiscale_layer_writes_pyramid(tmp_path):
    write_pyramidal_tiff(tmp_path / "src.tif", np.ones((64, 64), np.uint8), levels=3, tile=(16, 16))
    [(levels, meta, _)] = read_image(tmp_path / "src.tif")
    [path] = write_image(str(tmp_path / "copy.ome.tif"), levels, meta)
    [(back, back_meta, _)] = read_image(path)
    assert back_meta["multiscale"] is True
    assert [level.shape for level in back] == [(64, 64), (32, 32), (16, 16)]


class _Level:
    """A slide level read only by region (as dask or a slide reader would), never whole."""

    def __init__(self, array: np.ndarray, reads: list):
        self.array, self.reads = array, reads
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, index):
        part = self.array[index]
        self.reads.append(part.shape[0] * part.shape[1])
        return part

    def __array__(self, *args, **kwargs):
        raise AssertionError("a whole level was loaded")


def test_multiscale_slide_layer_is_written_band_by_band_with_its_own_levels(tmp_path, monkeypatch):
    monkeypatch.setattr(tile_bands, "MAX_BAND_BYTES", 512 * 700 * 3)  # a band: one row of 512 px tiles
    rng = np.random.default_rng(5)
    level0 = rng.integers(0, 256, (1100, 700, 3), dtype=np.uint8)
    level1 = rng.integers(0, 256, (550, 350, 3), dtype=np.uint8)  # not a 2x2 mean: must be kept
    reads: list[int] = []
    levels = [_Level(level0, reads), _Level(level1, reads)]

    [path] = write_image(str(tmp_path / "warped.ome.tif"), levels, {"rgb": True, "scale": (0.5, 0.25)})

    with tifffile.TiffFile(path) as tif:
        back = [level.asarray() for level in tif.series[0].levels]
        pixels = tif.ome_metadata
    np.testing.assert_array_equal(back[0], level0)
    np.testing.assert_array_equal(back[1], level1)
    assert 'PhysicalSizeX="0.25"' in pixels and 'PhysicalSizeY="0.5"' in pixels
    assert max(reads) <= 512 * 700 < level0.shape[0] * level0.shape[1]


def test_nifti_affine_from_layer_metadata_is_kept(tmp_path):
    affine = np.array([[-1.0, 0, 0, 5], [0, 1.0, 0, 6], [0, 0, 1.0, 7], [0, 0, 0, 1]])
    meta = {"scale": (1.0, 1.0, 1.0), "metadata": {"nifti_affine": affine}}
    [path] = write_image(str(tmp_path / "a.nii.gz"), np.zeros((2, 3, 4), np.int16), meta)
    [(_, back_meta, _)] = read_image(path)
    np.testing.assert_allclose(back_meta["metadata"]["nifti_affine"], affine)


@pytest.mark.parametrize("name", ["a.png", "a.zarr", "a"])
def test_writers_reject_unknown_suffix(tmp_path, name):
    with pytest.raises(UnsupportedFileError, match="not supported"):
        write_image(str(tmp_path / name), np.zeros((3, 3), np.float32), {})
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    """Atomic writes go through a private temporary file; the result is readable like any file."""
    import stat

    from napari_nephi.core.registration import atomic_write_bytes

    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    write_image(str(tmp_path / "b.tif"), np.zeros((4, 4), np.float32), {})
    for name in ("a.json", "b.tif"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected
    from napari_nephi.core.transform import AffineTransform

    AffineTransform(np.eye(3)).save(tmp_path / "t")
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o777 & ~mask
