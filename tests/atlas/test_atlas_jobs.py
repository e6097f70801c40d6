"""The widget's atlas source read from a folder of plate pictures (PNG) or TIFF files."""

import cv2
import numpy as np
import pytest
import tifffile

from napari_nephi.core.errors import InputError
from napari_nephi.widgets._atlas_jobs import read_source


def _plates(rng):
    return [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((40, 50), (44, 48), (38, 52))]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_folder_source_reads_plates_of_different_sizes_in_name_order(tmp_path, suffix):
    rng = np.random.default_rng(0)
    plates = _plates(rng)
    labels = [(p > 128).astype(np.uint8) * 3 for p in plates]
    for folder, images in (("ref", plates), ("lab", labels)):
        (tmp_path / folder).mkdir()
        for k, image in zip((2, 10, 1), images):  # natural order: p1, p2, p10
            path = tmp_path / folder / f"p{k}{suffix}"
            cv2.imwrite(str(path), image) if suffix == ".png" else tifffile.imwrite(path, image)
    spec = {"kind": "file or folder", "path": str(tmp_path / "ref"), "annotation_path": str(tmp_path / "lab")}
    reference, annotation = read_source(spec)
    assert [r.shape for r in reference] == [(38, 52), (40, 50), (44, 48)]
    np.testing.assert_array_equal(reference[0], plates[2])
    np.testing.assert_array_equal(reference[2], plates[1])
    np.testing.assert_array_equal(annotation[1], labels[0])


def test_folder_source_without_path_is_refused():
    with pytest.raises(InputError, match="Give the path of the atlas"):
        read_source({"kind": "file or folder", "path": ""})
