"""Warping agrees with scipy.ndimage / skimage; labels and points are consistent with images."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data
import skimage.transform

from napari_nephi.core import AffineTransform, DisplacementTransform, IdentityTransform
from napari_nephi.core.errors import DimensionMismatchError, InputError
from napari_nephi.core.warp import warp_image


def random_affine(ndim, rng, strength=0.1, shift=3.0):
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] += rng.uniform(-strength, strength, (ndim, ndim))
    m[:ndim, ndim] = rng.uniform(-shift, shift, ndim)
    return m


def smooth_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 2).astype(np.float32) * 100


@pytest.mark.parametrize("shape", [(40, 52), (20, 24, 28)])
def test_affine_warp_matches_scipy(shape):
    rng = np.random.default_rng(1)
    img = smooth_image(shape)
    m = random_affine(len(shape), rng)
    ours = AffineTransform(m).warp(img)
    ref = ndi.affine_transform(img.astype(np.float64), m, order=1, mode="grid-constant", cval=0)
    np.testing.assert_allclose(ours, ref, atol=1e-3 * np.abs(img).max())


def test_affine_warp_matches_skimage_camera():
    img = skimage.data.camera().astype(np.float32)[::4, ::4] / 255
    m = random_affine(2, np.random.default_rng(2))
    ours = AffineTransform(m).warp(img)
    # skimage wants (x, y) order and the inverse map from output to input coordinates
    p = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    ref = skimage.transform.warp(img, p @ m @ p, order=1, mode="constant", cval=0)
    inner = (slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_output_shape_and_channels_last(ndim):
    img = smooth_image((16,) * ndim)
    rgb = np.stack([img, 2 * img, 3 * img], -1)
    m = random_affine(ndim, np.random.default_rng(3))
    t = AffineTransform(m)
    out = t.warp(rgb, output_shape=(12,) * ndim)
    assert out.shape == (12,) * ndim + (3,)
    np.testing.assert_allclose(out[..., 2], 3 * t.warp(img, output_shape=(12,) * ndim), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint64])
def test_labels_keep_dtype_and_values(ndim, dtype):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, (10,) * ndim).astype(dtype)
    small = labels.astype(np.int32)
    big = np.iinfo(dtype).max
    labels[labels == 4] = big  # a value float32 (or scipy's float64) could not hold exactly
    t = AffineTransform(random_affine(ndim, rng, 0.05, 1.5))
    out = t.warp_labels(labels)
    assert out.dtype == labels.dtype
    assert set(np.unique(out)) <= set(np.unique(labels)) | {0}
    # compare with scipy nearest, away from the border where rounding conventions may differ
    ref = ndi.affine_transform(small, t.matrix, order=0, mode="constant", cval=0)
    ref = np.where(ref == 4, big, ref).astype(dtype)
    grid = np.indices(labels.shape).reshape(ndim, -1).T
    mapped = t.map_points(grid)
    inner = np.all((mapped > 0.5) & (mapped < np.array(labels.shape) - 1.5), axis=1)
    inner = inner.reshape(labels.shape)
    assert inner.sum() > 0.3 * labels.size
    np.testing.assert_array_equal(out[inner], ref[inner])


def test_labels_reject_non_integer_values():
    with pytest.raises(InputError, match="integer"):
        IdentityTransform(2).warp_labels(np.full((4, 4), 0.5))


@pytest.mark.parametrize("ndim", [2, 3])
def test_points_map_consistently_with_image(ndim):
    """A bright voxel in the moving image at phi(x0) appears at x0 in the warped image."""
    rng = np.random.default_rng(5)
    shape = (24,) * ndim
    field = ndi.gaussian_filter(rng.normal(0, 1, (ndim, *shape)), (0,) + (4,) * ndim) * 8
    t = DisplacementTransform(field.astype(np.float32))
    x0 = np.array([[12.0] * ndim])
    p = t.map_points(x0)[0]
    moving = np.zeros(shape, np.float32)
    idx = tuple(np.round(p).astype(int))
    moving[idx] = 1.0
    moving = ndi.gaussian_filter(moving, 1.0)
    warped = t.warp(moving)
    peak = np.unravel_index(np.argmax(warped), shape)
    assert np.abs(np.array(peak) - x0[0]).max() <= 1.0


def test_chunked_equals_unchunked():
    img = smooth_image((30, 31, 17))
    t = AffineTransform(random_affine(3, np.random.default_rng(6)))
    whole = warp_image(img, t, 3, chunk_voxels=1 << 30)
    chunked = warp_image(img, t, 3, chunk_voxels=100)
    np.testing.assert_array_equal(whole, chunked)


def test_input_not_modified():
    img = smooth_image((16, 16))
    before = img.copy()
    AffineTransform(random_affine(2, np.random.default_rng(7))).warp(img)
    np.testing.assert_array_equal(img, before)


def test_dimension_mismatch():
    with pytest.raises(DimensionMismatchError, match="2D transform"):
        AffineTransform(np.eye(3)).warp(np.zeros((2, 3, 4, 5, 6)))
    with pytest.raises(DimensionMismatchError):
        AffineTransform(np.eye(4)).map_points(np.zeros((3, 2)))
