"""A folder of 2D section TIFFs as one lazy stack."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.io import read_section_folder


def _write_sections(folder, names, shape=(16, 20), dtype=np.uint8, **kwargs):
    folder.mkdir(exist_ok=True)
    for value, name in enumerate(names):
        tifffile.imwrite(folder / name, np.full(shape, value, dtype), **kwargs)


@pytest.mark.parametrize(
    ("names", "expected_order"),
    [
        (["s1.tif", "s2.tif", "s10.tif"], ["s1.tif", "s2.tif", "s10.tif"]),
        (["s10.tif", "s2.tif", "s1.tif"], ["s1.tif", "s2.tif", "s10.tif"]),
        (["sec_010.TIF", "sec_9.tiff", "sec_100.tif"], ["sec_9.tiff", "sec_010.TIF", "sec_100.tif"]),
    ],
)
def test_sections_stack_in_natural_order(tmp_path, names, expected_order):
    _write_sections(tmp_path / "em", names)
    (tmp_path / "em" / "notes.txt").write_text("not a section")
    tifffile.imwrite(tmp_path / "em" / ".hidden.tif", np.zeros((3, 3), np.uint8))

    stack, meta = read_section_folder(tmp_path / "em")

    assert isinstance(stack, da.Array)
    assert stack.shape == (3, 16, 20)
    assert stack.dtype == np.uint8
    # each section is filled with its position in ``names``; the stack follows natural order
    values = [int(stack[i, 0, 0].compute()) for i in range(3)]
    assert values == [names.index(n) for n in expected_order]
    assert [p.rsplit("/", 1)[-1] for p in meta["metadata"]["section_files"]] == expected_order
    assert meta["name"] == "em"


def test_in_plane_spacing_comes_from_first_section(tmp_path):
    _write_sections(tmp_path / "s", ["a1.tif", "a2.tif"], imagej=True, resolution=(1 / 0.25, 1 / 0.5))
    stack, meta = read_section_folder(tmp_path / "s")
    assert meta["scale"] == (1.0, 0.5, 0.25)
    np.testing.assert_array_equal(stack.compute()[1], np.ones((16, 20), np.uint8))


def test_rgb_sections_keep_samples_last(tmp_path):
    _write_sections(tmp_path / "rgb", ["1.tif", "2.tif"], shape=(8, 9, 3), photometric="rgb")
    stack, meta = read_section_folder(tmp_path / "rgb")
    assert stack.shape == (2, 8, 9, 3)
    assert meta["rgb"] is True


def test_sections_of_different_shape_are_rejected(tmp_path):
    _write_sections(tmp_path / "bad", ["s1.tif", "s2.tif"])
    tifffile.imwrite(tmp_path / "bad" / "s3.tif", np.zeros((17, 20), np.uint8))
    with pytest.raises(InputError, match=r"s3\.tif"):
        read_section_folder(tmp_path / "bad")


def test_stacked_volume_in_folder_is_rejected(tmp_path):
    _write_sections(tmp_path / "vol", ["v.tif"], shape=(3, 8, 8), photometric="minisblack")
    with pytest.raises(InputError, match="2D"):
        read_section_folder(tmp_path / "vol")


@pytest.mark.parametrize("content", [[], ["a.png", "b.csv"]])
def test_folder_without_tiff_is_rejected(tmp_path, content):
    folder = tmp_path / "empty"
    folder.mkdir()
    for name in content:
        (folder / name).write_bytes(b"x")
    with pytest.raises(UnsupportedFileError, match="no TIFF"):
        read_section_folder(folder)


def test_garbage_section_names_the_file(tmp_path):
    _write_sections(tmp_path / "g", ["s1.tif"])
    (tmp_path / "g" / "s2.tif").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UnsupportedFileError, match=r"s2\.tif"):
        read_section_folder(tmp_path / "g")
