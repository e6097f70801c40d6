"""read_image: dispatch by suffix, napari layer data, and clear errors for bad files."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_nephi.core.errors import UnsupportedFileError
from napari_nephi.io import read_image, write_nifti, write_pyramidal_tiff, write_tiff

VOLUME = np.random.default_rng(0).uniform(0, 1000, (6, 10, 12)).astype(np.float32)
SPACING = (2.0, 0.5, 0.75)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".tif", ".tiff", ".ome.tif", ".ome.tiff"])
def test_dispatch_by_suffix(tmp_path, suffix):
    path = tmp_path / f"vol{suffix}"
    writer = write_nifti if suffix.startswith(".nii") else write_tiff
    writer(path, VOLUME, SPACING)

    layers = read_image(str(path))

    assert len(layers) == 1
    data, meta, layer_type = layers[0]
    assert layer_type == "image"
    np.testing.assert_array_equal(data, VOLUME)
    assert meta["scale"] == SPACING
    assert meta["name"] == "vol"


def test_svs_suffix_opens_pyramid(tmp_path):
    path = tmp_path / "slide.tif"
    write_pyramidal_tiff(path, np.zeros((128, 96, 3), np.uint8), levels=2, tile=(32, 32), rgb=True)
    path = path.rename(tmp_path / "slide.svs")
    [(data, meta, _)] = read_image(path)
    assert meta["multiscale"] is True
    assert [level.shape for level in data] == [(128, 96, 3), (64, 48, 3)]


def test_folder_reads_as_section_stack(tmp_path):
    for i in range(3):
        tifffile.imwrite(tmp_path / f"s{i}.tif", np.full((5, 6), i, np.uint16))
    [(data, meta, layer_type)] = read_image(tmp_path)
    assert isinstance(data, da.Array)
    assert data.shape == (3, 5, 6)
    assert layer_type == "image"


def test_layer_data_builds_napari_layers(tmp_path):
    layers = pytest.importorskip("napari.layers")
    write_tiff(tmp_path / "v.tif", VOLUME, SPACING)
    write_pyramidal_tiff(tmp_path / "p.tif", np.zeros((64, 64), np.uint8), levels=2, tile=(16, 16))
    for path in ("v.tif", "p.tif"):
        [(data, meta, _)] = read_image(tmp_path / path)
        layer = layers.Image(data, **meta)
        assert tuple(layer.scale) == tuple(meta["scale"])
    assert layer.multiscale is True


def _cut_in_half(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _make_bad_file(folder, kind):
    if kind == "truncated.nii.gz":
        write_nifti(folder / kind, VOLUME)
        _cut_in_half(folder / kind)
    elif kind == "truncated.nii":
        write_nifti(folder / kind, VOLUME)
        _cut_in_half(folder / kind)
    elif kind == "truncated.tif":
        write_tiff(folder / kind, VOLUME.astype(np.uint16))
        _cut_in_half(folder / kind)
    elif kind == "empty.tif":
        (folder / kind).write_bytes(b"")
    else:  # garbage bytes under a supported name
        (folder / kind).write_bytes(np.random.default_rng(1).bytes(4096))
    return folder / kind


@pytest.mark.parametrize(
    "kind",
    [
        "truncated.nii.gz",
        "truncated.nii",
        "truncated.tif",
        "empty.tif",
        "garbage.tif",
        "garbage.ome.tiff",
        "garbage.nii.gz",
        "garbage.nii",
        "garbage.svs",
    ],
)
def test_corrupt_file_raises_unsupported_file_error(tmp_path, kind):
    path = _make_bad_file(tmp_path, kind)
    with pytest.raises(UnsupportedFileError) as info:
        read_image(path)
    assert kind in str(info.value)
    assert "re-export" in str(info.value)  # says what to do
    # the original library error is chained, unless the reader's own size check caught it first
    assert info.value.__cause__ is not None or "the header describes" in str(info.value)


@pytest.mark.parametrize("name", ["missing.nii.gz", "missing.tif", "missing_folder"])
def test_missing_path_raises_unsupported_file_error(tmp_path, name):
    with pytest.raises(UnsupportedFileError, match="does not exist") as info:
        read_image(tmp_path / name)
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["photo.png", "table.csv", "noext"])
def test_unknown_format_raises_unsupported_file_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"data")
    with pytest.raises(UnsupportedFileError, match="not a supported format") as info:
        read_image(tmp_path / name)
    assert name in str(info.value)
    assert os.path.exists(tmp_path / name)


def test_aperio_svs_pixel_size_is_read(tmp_path):
    """An Aperio SVS (description 'Aperio ...|MPP = ...') opens with its pixel size as the layer scale."""
    path = tmp_path / "slide.svs"
    description = "Aperio Image Library v11.2.1\n64x48 (32x32) JPEG/RGB Q=30|AppMag = 20|MPP = 0.499"
    image = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(32, 32), photometric="rgb", description=description)
    [(data, meta, _)] = read_image(path)
    np.testing.assert_array_equal(np.asarray(data[0] if meta.get("multiscale") else data), image)
    assert meta["scale"] == pytest.approx((0.499, 0.499))
