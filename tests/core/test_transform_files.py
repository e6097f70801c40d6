"""Corrupt, mismatched or unwritable transform folders: UnsupportedFileError naming the file, nothing lost."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from napari_nephi import load_transform
from napari_nephi.core import transform_io
from napari_nephi.core.errors import OutOfMemoryError, UnsupportedFileError
from napari_nephi.core.transform import (
    AffineTransform,
    ComposedTransform,
    DisplacementTransform,
    PerSectionTransform,
)
from napari_nephi.core.transform_io import field_to_itk_nifti


def _field(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (len(shape), *shape)).astype(np.float32)


@pytest.fixture
def displacement_folder(tmp_path):
    t = DisplacementTransform(_field((6, 7)), inverse_field=_field((6, 7), 1), spacing=(0.5, 0.25))
    t.save(tmp_path / "t")
    return tmp_path / "t"


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "transform.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            meta.pop(key)
        else:
            meta[key] = value
    (folder / "transform.json").write_text(json.dumps(meta))


# -- transform.json and settings.json ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "JSONDecodeError"),
        (b"\xff\xfe\x00garbage\x80", "UnicodeDecodeError"),
        (b"[1, 2, 3]", "holds a list, not a JSON object"),
        (b"", "JSONDecodeError"),
        (b"[" * 100_000, "RecursionError"),
    ],
)
@pytest.mark.parametrize("name", ["transform.json", "settings.json"])
def test_corrupt_json_names_the_file(displacement_folder, name, content, message):
    (displacement_folder / name).write_bytes(content)
    with pytest.raises(
        UnsupportedFileError, match=rf"t/{name} is .*corrupt.*{message}.*Save the transform again"
    ):
        load_transform(displacement_folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": KeyError}, "missing field 'kind'"),
        ({"ndim": KeyError}, "missing field 'ndim'"),
        ({"ndim": 5}, "ndim must be 2 or 3, got 5"),
        ({"ndim": "two"}, "ndim must be 2 or 3, got 'two'"),
        ({"kind": "spline"}, "unknown transform kind 'spline'"),
        ({"spacing": "abc"}, "spacing must be numbers"),
        ({"spacing": [0.5, -1]}, "spacing must be finite and positive"),
        ({"shape": [6, "x"]}, r"shape \(6, 'x'\) must hold whole numbers of voxels, got 'x'"),
        ({"shape": [6.5, 7]}, r"must hold whole numbers of voxels, got 6.5"),
        ({"shape": "ab"}, r"shape must be a sequence of 2 whole numbers"),
        ({"shape": [6, 7, 8]}, r"shape \(6, 7, 8\) has 3 axes but the transform is 2D"),
        ({"version": 0}, "version must be a positive whole number, got 0"),
        ({"version": "1"}, "version must be a positive whole number, got '1'"),
        ({"shape": [6, 0]}, "has an empty axis"),
        ({"world_affine": [[1, 2]]}, "world_affine must be a finite 4x4"),
        ({"moving_world_affine": [[0] * 4] * 4}, "moving_world_affine is singular"),
    ],
)
def test_bad_fields_of_transform_json_name_the_file(displacement_folder, changes, message):
    _edit_meta(displacement_folder, **changes)
    with pytest.raises(UnsupportedFileError, match=rf"t/transform.json is corrupt: .*{message}"):
        load_transform(displacement_folder)


@pytest.mark.parametrize(
    ("make", "changes", "message"),
    [
        (
            lambda: AffineTransform(np.eye(3)),
            {"matrix": [[1, 0], [0, 1]]},
            r"A 2x2 matrix is not a 2D affine",
        ),
        (lambda: AffineTransform(np.eye(3)), {"matrix": [[1, 0, "NaN"]] * 3}, "holds NaN or infinite values"),
        (lambda: AffineTransform(np.eye(3)), {"matrix": KeyError}, "missing field 'matrix'"),
        (lambda: PerSectionTransform(np.stack([np.eye(3)] * 4)), {"matrices": [[1]]}, "must have shape"),
        (
            lambda: PerSectionTransform(np.stack([np.eye(3)] * 4)),
            {"ndim": 2},
            "a per-section transform is 3D",
        ),
        (
            lambda: ComposedTransform([AffineTransform(np.eye(3)), AffineTransform(np.eye(3))]),
            {"count": -1},
            "count must be a positive whole number, got -1",
        ),
    ],
)
def test_bad_parameters_name_the_file(tmp_path, make, changes, message):
    make().save(tmp_path / "t")
    _edit_meta(tmp_path / "t", **changes)
    with pytest.raises(UnsupportedFileError, match=rf"t/transform.json is corrupt: .*{message}"):
        load_transform(tmp_path / "t")


@pytest.mark.parametrize(
    ("make", "changes", "message"),
    [
        (lambda: AffineTransform(np.eye(3)), {"matrix": [[1, 2, 0], [2, 4, 0], [0, 0, 1]]}, "affine matrix"),
        (
            lambda: AffineTransform(np.eye(4)),
            {"matrix": np.diag([1.0, 0, 1, 1]).tolist()},
            "the affine matrix is singular",
        ),
        (
            lambda: PerSectionTransform(np.stack([np.eye(3)] * 3)),
            {"matrices": [np.eye(3).tolist(), np.zeros((3, 3)).tolist(), np.eye(3).tolist()]},
            r"per-section matrix is singular \(section 1\)",
        ),
    ],
)
def test_singular_matrix_is_refused_naming_the_file(tmp_path, make, changes, message):
    make().save(tmp_path / "t")
    _edit_meta(tmp_path / "t", **changes)
    with pytest.raises(UnsupportedFileError, match=rf"t/transform.json is corrupt: .*{message}.* no inverse"):
        load_transform(tmp_path / "t")


def test_newer_format_version_is_refused_and_every_written_version_loads(tmp_path):
    t = AffineTransform(np.diag([2.0, 0.5, 1.0]), shape=(4, 5))
    t.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "transform.json").read_text())
    assert meta["version"] == transform_io.VERSION == 1  # the only version ever written
    _edit_meta(tmp_path / "t", version=KeyError)  # read as version 1
    np.testing.assert_array_equal(load_transform(tmp_path / "t").matrix, t.matrix)
    _edit_meta(tmp_path / "t", version=1)
    np.testing.assert_array_equal(load_transform(tmp_path / "t").matrix, t.matrix)
    _edit_meta(tmp_path / "t", version=99)
    with pytest.raises(
        UnsupportedFileError,
        match=r"t/transform.json is in transform format version 99, newer .* \(up to 1\); update",
    ):
        load_transform(tmp_path / "t")


def test_missing_part_of_a_composed_transform_names_it(tmp_path):
    ComposedTransform([AffineTransform(np.eye(3)), AffineTransform(np.eye(3))]).save(tmp_path / "t")
    _edit_meta(tmp_path / "t", count=3)
    with pytest.raises(UnsupportedFileError, match=r"t/2 is not a saved transform"):
        load_transform(tmp_path / "t")


def test_not_written_by_us(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "transform.json").write_text('{"kind": "affine"}')
    with pytest.raises(UnsupportedFileError, match=r"was not written by napari-nephi"):
        load_transform(tmp_path / "t")


# -- displacement files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["displacement.nii.gz", "inverse_displacement.nii.gz"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "unreadable or corrupt"),
        (lambda b: b"not a nifti at all", "unreadable or corrupt"),
        (lambda b: b"", "unreadable or corrupt"),
    ],
)
def test_damaged_displacement_names_the_file(displacement_folder, name, damage, message):
    path = displacement_folder / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UnsupportedFileError, match=rf"t/{name} is {message}.*Save the transform again"):
        load_transform(displacement_folder)


def test_missing_displacement_names_the_file(displacement_folder):
    (displacement_folder / "displacement.nii.gz").unlink()
    with pytest.raises(UnsupportedFileError, match=r"t/displacement.nii.gz is unreadable"):
        load_transform(displacement_folder)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (_field((6, 8)), r"lies on a grid \(6, 8\) but transform.json says \(6, 7\)"),
        (_field((6, 7, 5)), r"holds a 3D field but transform.json says ndim=2"),
    ],
)
def test_displacement_grid_must_match_transform_json(displacement_folder, field, message):
    nib.save(field_to_itk_nifti(field), displacement_folder / "displacement.nii.gz")
    with pytest.raises(UnsupportedFileError, match=rf"t/displacement.nii.gz {message}"):
        load_transform(displacement_folder)


def test_inverse_displacement_grid_must_match_the_moving_grid(displacement_folder):
    nib.save(field_to_itk_nifti(_field((5, 5))), displacement_folder / "inverse_displacement.nii.gz")
    with pytest.raises(UnsupportedFileError, match=r"inverse_displacement.nii.gz lies on a grid \(5, 5\)"):
        load_transform(displacement_folder)


def test_displacement_of_integers_or_nan_is_refused(displacement_folder):
    img = field_to_itk_nifti(_field((6, 7)))
    as_int = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine, img.header)
    as_int.set_data_dtype(np.int16)
    nib.save(as_int, displacement_folder / "displacement.nii.gz")
    with pytest.raises(UnsupportedFileError, match=r"floating-point vectors, not int16"):
        load_transform(displacement_folder)
    field = _field((6, 7))
    field[0, 0, 0] = np.nan
    nib.save(field_to_itk_nifti(field), displacement_folder / "displacement.nii.gz")
    with pytest.raises(UnsupportedFileError, match=r"displacement.nii.gz holds NaN or infinite"):
        load_transform(displacement_folder)


def test_intact_folder_still_loads(displacement_folder):
    t = load_transform(displacement_folder)
    np.testing.assert_allclose(t.field, _field((6, 7)), atol=1e-5)
    np.testing.assert_allclose(t.inverse_field, _field((6, 7), 1), atol=1e-5)
    assert t.spacing == (0.5, 0.25)


# -- writing into places that cannot be written ------------------------------------------------------------
def test_save_under_a_file_names_it(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(
        UnsupportedFileError, match=r"Cannot write the transform to .*notes.txt/a/t: .*notes.txt is a file"
    ):
        AffineTransform(np.eye(3)).save(tmp_path / "notes.txt" / "a" / "t")
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_save_into_a_read_only_place_names_it(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(transform_io.tempfile, "mkdtemp", denied)
    with pytest.raises(UnsupportedFileError, match=r"Cannot write the transform to .*/t: Permission denied"):
        AffineTransform(np.eye(3)).save(tmp_path / "t")
    assert os.listdir(tmp_path) == []


def test_save_into_a_chmod_read_only_folder(read_only_folder):
    with pytest.raises(
        UnsupportedFileError, match=r"Cannot write the transform to .*ro/t: Permission denied"
    ):
        AffineTransform(np.eye(3)).save(read_only_folder / "t")
    assert os.listdir(read_only_folder) == []


def test_failed_replace_keeps_the_earlier_transform(tmp_path, monkeypatch):
    first = np.eye(3)
    first[0, 2] = 5.0
    AffineTransform(first).save(tmp_path / "t")
    real_replace = os.replace
    calls = []

    def second_replace_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(transform_io.os, "replace", second_replace_fails)
    with pytest.raises(UnsupportedFileError, match=r"Cannot write the transform to .*/t: Permission denied"):
        AffineTransform(np.eye(3)).save(tmp_path / "t")
    monkeypatch.undo()
    np.testing.assert_array_equal(load_transform(tmp_path / "t").matrix, first)
    assert sorted(os.listdir(tmp_path)) == ["t"]


def test_save_out_of_memory_is_out_of_memory_error_and_leaves_nothing(tmp_path, monkeypatch):
    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 40 GiB")

    monkeypatch.setattr(transform_io, "field_to_itk_nifti", too_big)
    with pytest.raises(OutOfMemoryError, match=r"Writing the transform to .*/t ran out of memory"):
        DisplacementTransform(_field((6, 7))).save(tmp_path / "t")
    assert os.listdir(tmp_path) == []
