"""Images with a known smooth deformation for the NePhi tests (generated, nothing downloaded).

``fixed(x) = image(x + u(x))`` and ``moving = image``, so the pull-back map that registration
should find is exactly ``phi(x) = x + u(x)``: ``moving(phi(x)) = fixed(x)``.
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_nephi.core.jacobian import jacobian_determinant


def smooth_displacement(shape, sigma, amplitude, seed):
    """Gaussian-smoothed noise scaled to ``amplitude`` voxels at most, ``(D, *shape)``."""
    rng = np.random.default_rng(seed)
    u = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in shape])
    return (u * (amplitude / np.abs(u).max())).astype(np.float32)


def pull_back(image, u):
    coords = np.indices(image.shape).astype(np.float64) + u
    return ndi.map_coordinates(image, coords, order=3, mode="nearest").astype(np.float32)


@pytest.fixture(scope="session")
def camera_pair():
    """scikit-image's camera at 96 x 96 px warped by a smooth diffeomorphism (up to 5 px)."""
    from skimage import data, transform

    cam = transform.resize(data.camera().astype(np.float32) / 255, (96, 96), anti_aliasing=True)
    cam = cam.astype(np.float32)
    u = smooth_displacement(cam.shape, sigma=12, amplitude=5.0, seed=0)
    assert jacobian_determinant(u).min() > 0.5  # the ground truth itself does not fold
    return pull_back(cam, u), cam, u


@pytest.fixture(scope="session")
def small_pair(camera_pair):
    """A 48 x 48 version for quick option tests."""
    fixed, moving, _ = camera_pair
    return fixed[::2, ::2].copy(), moving[::2, ::2].copy()


@pytest.fixture(scope="session")
def shapes_volume_pair():
    """32^3 blurred ball, box and ellipsoid with a faint smooth texture, warped by up to 2.5 voxels.

    The texture (smoothed noise, 0.3 of the ball's contrast) makes the deformation observable
    inside the shapes too, as tissue texture does in real volumes.
    """
    n = 32
    z, y, x = np.indices((n, n, n)).astype(np.float32)
    c = (n - 1) / 2
    img = 1.0 * (((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2) < (0.35 * n) ** 2)
    box = (
        (np.abs(z - 0.35 * n) < 0.12 * n) & (np.abs(y - 0.6 * n) < 0.15 * n) & (np.abs(x - 0.4 * n) < 0.2 * n)
    )
    ell = ((z - 0.65 * n) ** 2 / 0.04 + (y - 0.35 * n) ** 2 / 0.02 + (x - 0.65 * n) ** 2 / 0.03) < n**2
    noise = ndi.gaussian_filter(np.random.default_rng(5).standard_normal(img.shape), 1.5)
    img = img + 0.8 * box + 0.6 * ell + 0.3 * noise / noise.std()
    img = ndi.gaussian_filter(img, 1.0).astype(np.float32)
    u = smooth_displacement(img.shape, sigma=n / 6, amplitude=2.5, seed=1)
    assert jacobian_determinant(u).min() > 0.5
    return pull_back(img, u), img, u
