"""core.files.check_output_file: the one check of a file to write, shared by the CLI and the engines."""

import pytest

from napari_nephi.core.errors import UnsupportedFileError
from napari_nephi.core.files import check_output_file


def test_check_output_file_accepts_new_and_existing_files(tmp_path):
    new = tmp_path / "out.pt"
    assert check_output_file(str(new)) == new
    new.write_bytes(b"x")
    assert check_output_file(new, "model file") == new


def test_check_output_file_refuses_folders_and_missing_parents(tmp_path):
    with pytest.raises(UnsupportedFileError, match="is a folder; give the name of the model file to write"):
        check_output_file(tmp_path, "model file")
    with pytest.raises(UnsupportedFileError, match="is a folder; give the name of the file to write"):
        check_output_file(tmp_path)
    with pytest.raises(UnsupportedFileError, match=r"folder .*missing does not exist; create it first"):
        check_output_file(tmp_path / "missing" / "out.tif")
