"""NIfTI reading and writing: axis order, spacing, dtype, affine, atomic writes."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.io import read_nifti, write_nifti

CASES = [
    ((12, 17), (0.5, 2.0), np.int16),
    ((12, 17), (0.3, 0.7), np.float32),
    ((5, 12, 17), (3.0, 0.5, 0.25), np.float64),
    ((5, 12, 17), (2.5, 1.0, 0.3), np.uint8),
    ((5, 12, 17), (1.2, 0.9, 0.9), np.int64),
    ((3, 5, 12, 17), (7.0, 3.0, 0.5, 0.25), np.uint16),
]


def _random(shape, dtype, seed=0):
    values = np.random.default_rng(seed).uniform(0, 200, shape)
    return values.astype(dtype)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(("shape", "spacing", "dtype"), CASES)
def test_round_trip_keeps_values_dtype_and_spacing(tmp_path, suffix, shape, spacing, dtype):
    data = _random(shape, dtype)
    original = data.copy()
    path = tmp_path / f"img{suffix}"

    returned = write_nifti(path, data, spacing)
    back, meta = read_nifti(path)

    assert returned == str(path)
    assert back.shape == data.shape
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    assert meta["scale"] == tuple(float(s) for s in spacing)
    assert meta["name"] == "img"
    np.testing.assert_array_equal(data, original)  # input untouched
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left


def test_nibabel_array_reads_back_transposed_with_reversed_zooms(tmp_path):
    ijk = _random((6, 7, 8), np.float32)  # NIfTI order (i, j, k)
    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (10, -20, 30)
    nib.save(nib.Nifti1Image(ijk, affine), tmp_path / "direct.nii.gz")

    data, meta = read_nifti(tmp_path / "direct.nii.gz")

    assert data.shape == (8, 7, 6)
    np.testing.assert_array_equal(data, ijk.transpose(2, 1, 0))
    assert data[3, 2, 1] == ijk[1, 2, 3]
    assert meta["scale"] == (2.0, 1.0, 0.5)
    np.testing.assert_allclose(meta["metadata"]["nifti_affine"], affine)


def test_single_slice_nifti_is_2d(tmp_path):
    ij1 = _random((6, 9, 1), np.int16)
    nib.save(nib.Nifti1Image(ij1, np.diag([0.25, 4.0, 1.0, 1.0])), tmp_path / "slice.nii")

    data, meta = read_nifti(tmp_path / "slice.nii")

    assert data.shape == (9, 6)
    np.testing.assert_array_equal(data, ij1[:, :, 0].T)
    assert meta["scale"] == (4.0, 0.25)


def test_bundled_big_endian_mri_reads_native():
    ijk = np.asanyarray(nib.load(os.path.join(data_path, "anatomical.nii")).dataobj)
    data, meta = read_nifti(os.path.join(data_path, "anatomical.nii"))
    assert data.shape == ijk.shape[::-1]
    assert data.dtype.isnative
    np.testing.assert_array_equal(data, ijk.transpose(2, 1, 0))
    assert meta["scale"] == (2.0, 2.0, 2.0)


def test_write_keeps_direction_and_origin_of_given_affine(tmp_path):
    affine = np.array([[0, 0, -2.0, 10], [0, 3.0, 0, 5], [1.0, 0, 0, -4], [0, 0, 0, 1]])
    data = _random((4, 5, 6), np.float32)

    write_nifti(tmp_path / "a.nii.gz", data, (0.5, 1.5, 2.5), affine=affine)
    written = nib.load(tmp_path / "a.nii.gz").affine
    _, meta = read_nifti(tmp_path / "a.nii.gz")

    # column i gets spacing x = 2.5, j gets y = 1.5, k gets z = 0.5; signs and origin kept
    expected = np.array([[0, 0, -0.5, 10], [0, 1.5, 0, 5], [2.5, 0, 0, -4], [0, 0, 0, 1]])
    np.testing.assert_allclose(written, expected)
    assert meta["scale"] == (0.5, 1.5, 2.5)


def test_bool_is_written_as_uint8(tmp_path):
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    write_nifti(tmp_path / "m.nii.gz", mask)
    back, _ = read_nifti(tmp_path / "m.nii.gz")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize(
    ("name", "data", "spacing", "error"),
    [
        ("v.nii.gz", np.zeros(5), None, InputError),
        ("v.nii.gz", np.zeros((2, 2, 2, 2, 2)), None, InputError),
        ("v.nii.gz", np.zeros((3, 4)), (1.0, 2.0, 3.0), InputError),
        ("v.nii.gz", np.zeros((3, 4)), (1.0, -2.0), InputError),
        ("v.tif", np.zeros((3, 4)), None, UnsupportedFileError),
        ("missing_folder/v.nii", np.zeros((3, 4)), None, UnsupportedFileError),
    ],
)
def test_write_rejects_bad_input(tmp_path, name, data, spacing, error):
    with pytest.raises(error):
        write_nifti(tmp_path / name, data, spacing)
    assert not (tmp_path / name).exists()


def test_failed_write_leaves_target_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.nii.gz"
    write_nifti(path, np.ones((3, 4), np.float32))
    before = path.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        write_nifti(path, np.zeros((3, 4), np.float32))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
