"""Small image pairs and job tables for the batch tests (48 x 48 crops of scikit-image's camera)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage import data
from skimage.transform import resize


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with fixed.tif, moving.tif (shifted by (2, 1) pixels), other.tif, mask.tif (the inside
    of the fixed image) and a corrupt bad.tif."""
    folder = tmp_path_factory.mktemp("images")
    fixed = resize(data.camera().astype(np.float32), (48, 48), anti_aliasing=True)
    tifffile.imwrite(folder / "fixed.tif", fixed)
    tifffile.imwrite(folder / "moving.tif", np.roll(fixed, (2, 1), axis=(0, 1)))
    other = resize(data.coins().astype(np.float32), (48, 48), anti_aliasing=True)
    tifffile.imwrite(folder / "other.tif", other)
    mask = np.zeros((48, 48), np.uint8)
    mask[6:-6, 6:-6] = 1
    tifffile.imwrite(folder / "mask.tif", mask)
    (folder / "bad.tif").write_bytes(b"II*\x00 this is not a complete TIFF file")
    return folder


def write_table(path, rows: list[dict]) -> None:
    """Write ``rows`` as a CSV job table (cells with commas or quotes quoted)."""
    import csv

    names = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
