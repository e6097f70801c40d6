"""Inputs are never modified: read-only, strided, dask and memory-mapped arrays stay byte-identical."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

import napari_nephi as nn
from napari_nephi.core.inputs import prepare_image, prepare_mask
from napari_nephi.core.transform import AffineTransform, DisplacementTransform


def _blobs(shape=(48, 48), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 3).astype(np.float32)


def _as_kind(array: np.ndarray, kind: str, tmp_path, name: str):
    """``array`` as the kind of input a user may pass."""
    if kind == "read-only":
        out = array.copy()
        out.flags.writeable = False
        return out
    if kind == "strided":  # a non-contiguous view into a larger array
        big = np.zeros((array.shape[0] * 2, array.shape[1] * 3), array.dtype)
        big[::2, ::3] = array
        view = big[::2, ::3]
        assert not view.flags.c_contiguous
        return view
    if kind == "dask":
        return da.from_array(array.copy(), chunks=tuple(max(1, n // 2) for n in array.shape))
    if kind == "memmap":
        mm = np.lib.format.open_memmap(
            tmp_path / f"{name}.npy", mode="w+", dtype=array.dtype, shape=array.shape
        )
        mm[:] = array
        mm.flush()
        return np.load(tmp_path / f"{name}.npy", mmap_mode="r+")  # writable map: a write would show
    raise AssertionError(kind)


def _snapshot(x) -> bytes:
    return np.asarray(x.compute() if isinstance(x, da.Array) else x).tobytes()


KINDS = ["read-only", "strided", "dask", "memmap"]


@pytest.mark.parametrize("kind", KINDS)
def test_register_leaves_inputs_byte_identical(tmp_path, kind):
    fixed_np = _blobs()
    moving_np = np.roll(fixed_np, (2, -1), axis=(0, 1))
    mask_np = np.zeros(fixed_np.shape, np.uint8)
    mask_np[8:40, 8:40] = 1
    fixed = _as_kind(fixed_np, kind, tmp_path, "fixed")
    moving = _as_kind(moving_np, kind, tmp_path, "moving")
    mask = _as_kind(mask_np, kind, tmp_path, "mask")
    before = [_snapshot(a) for a in (fixed, moving, mask)]
    reg = nn.register(fixed, moving, method="affine", fixed_mask=mask, moving_mask=mask)
    assert [_snapshot(a) for a in (fixed, moving, mask)] == before
    assert reg.warped.shape == fixed_np.shape
    centre = reg.transform.map_points(np.array([[24.0, 24.0]]))[0]
    np.testing.assert_allclose(centre - 24.0, (2.0, -1.0), atol=0.3)  # the roll, found from these inputs
    assert reg.warped is not fixed and not np.shares_memory(reg.warped, fixed_np)
    if kind == "memmap":  # the files on disk too
        for name, array in (("fixed", fixed_np), ("moving", moving_np), ("mask", mask_np)):
            np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), array)


@pytest.mark.parametrize("kind", KINDS)
def test_warps_leave_inputs_byte_identical(tmp_path, kind):
    image_np = _blobs((24, 20))
    labels_np = (image_np > image_np.mean()).astype(np.int32)
    field_np = np.random.default_rng(1).uniform(-1, 1, (2, 24, 20)).astype(np.float32)
    points_np = np.array([[3.0, 4.0], [10.5, 7.25]])
    image = _as_kind(image_np, kind, tmp_path, "image")
    labels = _as_kind(labels_np, kind, tmp_path, "labels")
    field = _as_kind(field_np.reshape(2, -1), kind, tmp_path, "field")
    field = field.reshape(2, 24, 20) if not isinstance(field, da.Array) else field.reshape((2, 24, 20))
    points = _as_kind(points_np, kind, tmp_path, "points")
    before = [_snapshot(a) for a in (image, labels, field, points)]
    for t in (DisplacementTransform(field), AffineTransform([[1, 0, 1.5], [0, 1, -2], [0, 0, 1]])):
        warped = t.warp(image, output_shape=(24, 20))
        t.warp_labels(labels, output_shape=(24, 20))
        t.map_points(points)
        t.displacement((24, 20))
        assert warped.shape == (24, 20)
    assert [_snapshot(a) for a in (image, labels, field, points)] == before


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_returns_new_arrays(tmp_path, kind):
    image_np = _blobs((16, 16))
    image = _as_kind(image_np, kind, tmp_path, "image")
    mask = _as_kind(np.ones((16, 16), bool), kind, tmp_path, "mask")
    out = prepare_image(image, "fixed")
    out_mask = prepare_mask(mask, (16, 16))
    out += 1.0  # the engine may work in place on its own copy ...
    out_mask[:] = False
    np.testing.assert_array_equal(np.asarray(image), image_np)  # ... never on the user's array
    assert np.asarray(mask).all()
