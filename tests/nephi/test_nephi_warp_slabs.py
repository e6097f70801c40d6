"""NePhi's result warps the moving image in smaller slabs than ``Transform.warp`` (session 43, the 2048^2
memory peak): the same values, bit for bit."""

import numpy as np
import pytest
from scipy import ndimage as ndi

import napari_nephi as nn
from napari_nephi.core.transform import DisplacementTransform
from napari_nephi.engines.nephi import dense


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 18])
def test_warped_image_equals_transform_warp_in_any_slabs(chunk):
    rng = np.random.default_rng(3)
    field = ndi.gaussian_filter(rng.normal(0, 2, (2, 37, 41)), (0, 3, 3)).astype(np.float32)
    image = rng.random((37, 41)).astype(np.float32)
    t = DisplacementTransform(field)
    assert np.array_equal(dense.warped_image(t, image, (37, 41), "cpu", chunk), t.warp(image))


def test_the_engines_warped_image_is_its_transforms_warp(monkeypatch):
    """The registration's ``warped`` is ``transform.warp(moving)`` bit for bit, with slabs of a few rows."""
    monkeypatch.setattr(dense, "WARP_CHUNK", 100)  # read at the call: 2-3 rows a slab here
    texture = ndi.gaussian_filter(np.random.default_rng(1).random((48, 40)), 2.0).astype(np.float32)
    moving = np.roll(texture, (1, -2), axis=(0, 1))
    reg = nn.register(
        texture, moving, method="nephi", device="cpu", levels=3, coarse_iterations=4, iterations=2
    )
    assert np.array_equal(reg.warped, reg.transform.warp(moving))
