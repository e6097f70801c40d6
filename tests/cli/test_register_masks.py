"""``napari-nephi register --fixed-mask / --moving-mask``: the masks reach the engine."""

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_nephi.cli import main


def _blob(shape, centre, sigma=3.0):
    img = np.zeros(shape, np.float32)
    img[centre] = 1
    return ndi.gaussian_filter(img, sigma) * 50


@pytest.fixture
def two_blobs(tmp_path):
    """Two blobs; in the moving image the left one moved 3 px down, the right one 3 px up."""
    shape = (64, 64)
    fixed = _blob(shape, (32, 16)) + _blob(shape, (32, 48))
    moving = _blob(shape, (35, 16)) + _blob(shape, (29, 48))
    left = np.zeros(shape, np.uint8)
    left[16:52, 2:30] = 1
    paths = {}
    for name, arr in (("f", fixed), ("m", moving), ("left", left), ("right", left[:, ::-1].copy())):
        paths[name] = tmp_path / f"{name}.tif"
        tifffile.imwrite(paths[name], arr)
    return paths


@pytest.mark.parametrize("side, shift", [("left", 3.0), ("right", -3.0)])
def test_fixed_mask_chooses_what_is_registered(tmp_path, two_blobs, side, shift):
    out = tmp_path / f"out_{side}"
    argv = ["register", str(two_blobs["f"]), str(two_blobs["m"]), "-o", str(out), "-q",
            "--method", "affine", "--kind", "translation", "--fixed-mask", str(two_blobs[side])]  # fmt: skip
    assert main(argv) == 0
    from napari_nephi import load_transform

    matrix = load_transform(out / "transform").matrix
    assert matrix[0, 2] == pytest.approx(shift, abs=0.3)
    assert json.loads((out / "settings.json").read_text())["fixed_mask"] == str(two_blobs[side])


def test_a_mask_of_the_wrong_shape_is_refused(tmp_path, two_blobs, error_line):
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.ones((8, 8), np.uint8))
    argv = ["register", str(two_blobs["f"]), str(two_blobs["m"]), "-o", str(tmp_path / "o"), "-q",
            "--method", "affine", "--moving-mask", str(small)]  # fmt: skip
    assert main(argv) != 0
    assert "shape (8, 8)" in error_line()
