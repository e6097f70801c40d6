"""Readers and writers on bad files and bad places: UnsupportedFileError naming the file, nothing lost."""

from __future__ import annotations

import os
import struct
import sys

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_nephi.core.errors import InputError, OutOfMemoryError, UnsupportedFileError
from napari_nephi.io import (
    _util,
    read_image,
    read_section_folder,
    write_image,
    write_nifti,
    write_pyramidal_tiff,
    write_tiff,
)

IMAGE = (np.arange(32 * 32) % 251).reshape(32, 32).astype(np.uint8)


def _drop_tiff_tag(path, code: int) -> None:
    """Corrupt tag ``code`` of the first page (a value count pointing past the file end).

    tifffile then skips the tag and takes the image width (256) or length (257) as 0.
    """
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages.first.tags[code].offset
    data = bytearray(path.read_bytes())
    data[offset + 4 : offset + 8] = struct.pack("<I", 2049)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("code", "shape"), [(257, r"\(0, 32\)"), (256, r"\(32, 0\)")])
def test_tiff_with_a_zero_length_axis_is_refused(tmp_path, code, shape):
    """A corrupt header that makes tifffile read an empty (0, 32) image is not an image."""
    path = tmp_path / "corrupt.tif"
    write_tiff(path, IMAGE)
    _drop_tiff_tag(path, code)
    with tifffile.TiffFile(path) as tf:
        assert 0 in tf.series[0].shape  # what the library gives
    with pytest.raises(UnsupportedFileError, match=rf"corrupt.tif holds no usable image: .*shape {shape}"):
        read_image(path)


def test_nifti_with_a_zero_length_axis_is_refused(tmp_path):
    path = tmp_path / "corrupt.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    data[42:44] = struct.pack("<h", 0)  # dim[1] = 0
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFileError, match=r"corrupt.nii holds no usable image: .*\(0, 4, 4\)"):
        read_image(path)


def test_section_folder_with_an_empty_section_names_it(tmp_path):
    write_tiff(tmp_path / "s1.tif", IMAGE)
    write_tiff(tmp_path / "s2.tif", IMAGE)
    _drop_tiff_tag(tmp_path / "s2.tif", 257)
    with pytest.raises(UnsupportedFileError, match=r"s2.tif holds no usable image"):
        read_section_folder(tmp_path)


def test_corrupt_tile_of_a_lazy_pyramid_names_the_file_when_read(tmp_path):
    path = tmp_path / "slide.ome.tif"
    write_pyramidal_tiff(path, np.tile(IMAGE, (8, 8)), 2, tile=(64, 64), spacing=(1.0, 1.0))
    with tifffile.TiffFile(path) as tf:
        first_tile = tf.pages.first.dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[first_tile : first_tile + 16] = b"\xff" * 16  # break the zlib stream of tile 0
    path.write_bytes(bytes(data))
    levels = read_image(path)[0][0]  # opens: headers are fine
    np.testing.assert_array_equal(levels[0][200:, 200:].compute(), np.tile(IMAGE, (8, 8))[200:, 200:])
    with pytest.raises(UnsupportedFileError, match=r"Cannot read .*slide.ome.tif as TIFF: .*corrupt"):
        levels[0][:64, :64].compute()


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "locked.tif"
    write_tiff(path, IMAGE)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tifffile, "TiffFile", denied)
    with pytest.raises(UnsupportedFileError, match=r"Cannot read .*locked.tif: permission denied"):
        read_image(path)


def test_reader_memory_error_becomes_out_of_memory(tmp_path, monkeypatch):
    path = tmp_path / "huge.nii.gz"
    write_nifti(path, IMAGE)

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 900 GiB")

    monkeypatch.setattr(nib, "load", too_big)
    with pytest.raises(
        OutOfMemoryError, match=r"Cannot read .*huge.nii.gz: it needs more memory than is free"
    ):
        read_image(path)


# -- writing into places that cannot be written --------------------------------------------------
WRITERS = {
    "tiff": lambda p: write_tiff(p / "out.tif", IMAGE),
    "ome-tiff": lambda p: write_tiff(p / "out.ome.tif", IMAGE),
    "pyramid": lambda p: write_pyramidal_tiff(p / "out.tif", IMAGE, 2, tile=(16, 16)),
    "nifti": lambda p: write_nifti(p / "out.nii.gz", IMAGE),
    "napari writer": lambda p: write_image(str(p / "out.nii"), IMAGE, {}),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writing_under_a_file_names_it(tmp_path, writer):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    with pytest.raises(UnsupportedFileError, match=r"Cannot write .*notes.txt/out.* is a file, not a folder"):
        WRITERS[writer](blocker)
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writing_into_a_read_only_folder_names_it(tmp_path, monkeypatch, writer):
    """A read-only place (simulated: root ignores permission bits) gives a clear error, no leftovers."""

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_util.tempfile, "mkstemp", denied)
    with pytest.raises(UnsupportedFileError, match=r"Cannot write .*out.*: Permission denied. .*writable"):
        WRITERS[writer](tmp_path)
    assert os.listdir(tmp_path) == []


def test_writing_into_a_chmod_read_only_folder(read_only_folder):
    with pytest.raises(UnsupportedFileError, match=r"Cannot write .*ro/out.tif: Permission denied"):
        write_tiff(read_only_folder / "out.tif", IMAGE)
    assert os.listdir(read_only_folder) == []


def test_failed_final_rename_keeps_the_earlier_file(tmp_path, monkeypatch):
    path = tmp_path / "out.tif"
    write_tiff(path, IMAGE)
    before = path.read_bytes()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_util, "publish", denied)
    with pytest.raises(UnsupportedFileError, match=r"Cannot write .*out.tif: Permission denied"):
        write_tiff(path, IMAGE[::-1])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.tif"]


def test_writing_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "out.tif").mkdir()
    with pytest.raises(UnsupportedFileError, match=r"Cannot write .*out.tif: it is a folder"):
        write_tiff(tmp_path / "out.tif", IMAGE)


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((0, 32), np.uint8), r"the image is empty \(shape \(0, 32\)\); there is nothing to save"),
        (np.array([["a"] * 32] * 32), r"the image has dtype <U1, not numbers; cast it first"),
    ],
)
def test_writers_refuse_empty_or_non_numeric_images(tmp_path, monkeypatch, writer, data, message):
    monkeypatch.setattr(sys.modules[__name__], "IMAGE", data)
    with pytest.raises(InputError, match=rf"Cannot write .*out.*: {message}"):
        WRITERS[writer](tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["locked.tif", "locked.nii.gz"])
def test_chmod_unreadable_file_says_permission_denied(tmp_path, name):
    path = tmp_path / name
    (write_tiff if name.endswith(".tif") else write_nifti)(path, IMAGE)
    path.chmod(0o000)
    try:
        try:
            path.read_bytes()
        except PermissionError:
            pass
        else:
            pytest.skip("permission bits are ignored here (root with CAP_DAC_OVERRIDE)")
        with pytest.raises(UnsupportedFileError, match=rf"Cannot read .*{name}: permission denied"):
            read_image(path)
    finally:
        path.chmod(0o644)
