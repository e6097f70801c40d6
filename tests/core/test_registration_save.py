"""Registration.save into a folder saved by a version that wrote no output marker."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi import load_transform
from napari_nephi.core.errors import UnsupportedFileError
from napari_nephi.core.files import OUTPUT_MARKER
from napari_nephi.core.registration import SAVED_NAMES, Registration, saved_without_marker
from napari_nephi.core.transform import AffineTransform


def _registration(shift: float) -> Registration:
    matrix = np.array([[1.0, 0, shift], [0, 1, 0], [0, 0, 1]])
    return Registration(warped=np.full((8, 9), shift, np.float32), transform=AffineTransform(matrix))


def _earlier_save(folder, shift: float = 1.0):
    """A folder as Registration.save wrote it before the output marker (with a killed save's temp file)."""
    _registration(shift).save(folder)
    (folder / OUTPUT_MARKER).unlink()
    (folder / ".warped.tif.tmp").write_bytes(b"half-written")
    return folder


def test_a_folder_saved_by_an_earlier_version_is_replaced(tmp_path):
    out = _earlier_save(tmp_path / "out")
    assert saved_without_marker(out)
    _registration(2.0).save(out)
    assert {p.name for p in out.iterdir()} == {*SAVED_NAMES, OUTPUT_MARKER}
    assert load_transform(out / "transform").matrix[0, 2] == 2.0


@pytest.mark.parametrize(
    "spoil",
    [
        lambda out: (out / "notes.txt").write_text("the user's"),
        lambda out: (out / "transform" / "transform.json").write_text('{"kind": "affine"}'),
        lambda out: (out / "transform" / "transform.json").unlink(),
        lambda out: (out / "transform" / "transform.json").write_bytes(b"\xff{"),
    ],
    ids=["other file", "not our transform", "no transform", "unreadable transform"],
)
def test_anything_else_in_the_folder_is_refused_and_kept(tmp_path, spoil):
    out = _earlier_save(tmp_path / "out")
    spoil(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert not saved_without_marker(out)
    with pytest.raises(UnsupportedFileError, match=r"holds files napari-nephi did not write; choose a new"):
        _registration(2.0).save(out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_folder_of_only_outputs_names_without_a_transform_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_text("{}")  # could be the user's own file
    with pytest.raises(UnsupportedFileError, match="did not write"):
        _registration(1.0).save(out)
    assert (out / "settings.json").read_text() == "{}"


def test_array_metrics_are_written_as_files_not_as_text(tmp_path):
    """Carried atlas labels in ``metrics`` land in their own TIFF with their values, named in metrics.json."""
    import json

    import tifffile

    reg = _registration(1.0)
    labels = np.arange(72, dtype=np.uint16).reshape(8, 9) * 900
    reg.metrics = {"labels": labels, "ncc_after": 0.9, "regions": {"1": "cortex"}}
    reg.save(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["ncc_after"] == 0.9 and saved["regions"] == {"1": "cortex"}
    assert saved["labels"] == {"file": "metric_labels.tif", "shape": [8, 9], "dtype": "uint16"}
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "metric_labels.tif"), labels)
    assert reg.metrics["labels"] is labels  # the result itself is unchanged
