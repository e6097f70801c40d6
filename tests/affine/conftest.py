"""Real images for the affine engine tests (shipped by scikit-image and nibabel, never downloaded)."""

from pathlib import Path

import nibabel
import numpy as np
import pytest
import skimage.data


@pytest.fixture(scope="session")
def camera128() -> np.ndarray:
    img = skimage.data.camera().astype(np.float32)
    return img.reshape(128, 4, 128, 4).mean(axis=(1, 3))


@pytest.fixture(scope="session")
def anatomical() -> tuple[np.ndarray, tuple[float, ...]]:
    """nibabel's 33 x 41 x 25 MRI (2 mm voxels), padded by 12 voxels of background so that a
    rotated copy keeps the whole head in view (the head touches the borders of the file)."""
    img = nibabel.load(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii")
    vol = np.asarray(img.dataobj, np.float32)
    vol = np.pad(vol, 12, constant_values=float(np.percentile(vol, 1)))
    return vol, tuple(float(z) for z in img.header.get_zooms())
