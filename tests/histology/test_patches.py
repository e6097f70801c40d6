"""Multi-magnification patch sets and blending of patch fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import downscale_local_mean

from napari_nephi.core.errors import InputError
from napari_nephi.engines.histology.networks import affine_displacement
from napari_nephi.engines.histology.patches import blend_fields, multimag_patches, patch_origins

P = 64


def smooth_field(shape):
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    return np.stack([3 * np.sin(y / 40.0) * np.cos(x / 55.0), 2 * np.cos(y / 35.0 + x / 70.0)]).astype(
        np.float32
    )


def cut(field, origins):
    return np.stack([field[:, y : y + P, x : x + P] for y, x in origins])


def test_origins_cover_the_image_on_a_regular_grid():
    shape = (150, 230)
    origins = patch_origins(shape, P, P // 2)
    covered = np.zeros(shape, bool)
    for y, x in origins:
        assert 0 <= y <= shape[0] - P and 0 <= x <= shape[1] - P
        covered[y : y + P, x : x + P] = True
    assert covered.all()
    assert sorted(set(origins[:, 0])) == [0, 32, 64, 86]
    assert sorted(set(origins[:, 1])) == [0, 32, 64, 96, 128, 160, 166]
    assert patch_origins((40, 50), P, P // 2).tolist() == [[0, 0]]


def test_patch_sets_match_slicing_and_2x_averaging():
    rng = np.random.default_rng(3)
    fixed = rng.random((150, 170)).astype(np.float32)
    moving = rng.random((150, 170)).astype(np.float32)
    origins = np.array([[0, 0], [40, 90], [150 - P, 170 - P], [-10, 120]])
    high, low = multimag_patches(fixed, moving, origins, P, 2)
    assert high.shape == low.shape == (4, 2, P, P)
    pad = 2 * P
    for c, image in enumerate((fixed, moving)):
        padded = np.pad(image, pad)  # zeros outside, as the patches
        for i, (y, x) in enumerate(origins):
            ys, xs = y + pad, x + pad
            np.testing.assert_array_equal(high[i, c].numpy(), padded[ys : ys + P, xs : xs + P])
            region = padded[ys - P // 2 : ys + P + P // 2, xs - P // 2 : xs + P + P // 2]
            np.testing.assert_allclose(low[i, c].numpy(), downscale_local_mean(region, (2, 2)), atol=1e-6)
    high1, low1 = multimag_patches(fixed, moving, origins, P, 1)
    assert low1 is None
    torch.testing.assert_close(high1, high)


def test_blending_cut_patches_reproduces_a_smooth_field():
    shape = (170, 200)
    field = smooth_field(shape)
    origins = patch_origins(shape, P, P // 2)
    blended = blend_fields(cut(field, origins), origins, shape, P)
    assert blended.shape == (2, *shape) and blended.dtype == np.float32
    np.testing.assert_allclose(blended, field, atol=1e-5)


def test_blended_field_has_no_seams_where_patches_end():
    shape = (160, 224)
    origins = patch_origins(shape, P, P // 2)
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-2, 2, size=(len(origins), 2, 1, 1)).astype(np.float32)
    fields = cut(smooth_field(shape), origins) + offsets  # neighbouring patches disagree by up to 4 px
    blended = blend_fields(fields, origins, shape, P)
    spread = float(offsets.max() - offsets.min())
    bound = 4 * np.pi / P * spread + 0.2  # blending over the overlap, plus the smooth field's own slope
    borders_x = sorted({x + P for x in origins[:, 1] if x + P < shape[1]} | {x for x in origins[:, 1] if x})
    jumps = np.abs(np.diff(blended, axis=2))
    across = max(float(jumps[:, :, b - 1].max()) for b in borders_x)
    assert across <= bound
    assert float(jumps.max()) <= bound and float(np.abs(np.diff(blended, axis=1)).max()) <= bound
    tiled = np.zeros_like(blended)  # the same patches pasted without blending do have seams
    for f, (y, x) in zip(fields, origins, strict=True):
        tiled[:, y : y + P, x : x + P] = f
    assert float(np.abs(np.diff(tiled, axis=2)).max()) > bound


def test_known_affine_per_patch_gives_the_global_pixel_field():
    shape = (150, 190)
    a = np.array([[1.02, -0.05], [0.04, 0.97]])
    t = np.array([3.0, -2.5])
    centre = (np.array(shape) - 1) / 2
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    rel = np.stack([yy, xx]).reshape(2, -1) - centre[:, None]
    truth = ((a - np.eye(2)) @ rel + t[:, None]).reshape(2, *shape)
    origins = patch_origins(shape, P, P // 2)
    mats = []
    for o in origins:  # the same map, written about each patch centre
        shift = (a - np.eye(2)) @ (o + (P - 1) / 2 - centre) + t
        mats.append(np.concatenate([a, shift[:, None]], 1))
    fields = affine_displacement(torch.tensor(np.array(mats), dtype=torch.float64), P)
    np.testing.assert_allclose(blend_fields(fields, origins, shape, P), truth, atol=1e-4)


def test_bad_patch_inputs():
    with pytest.raises(InputError, match="stride"):
        patch_origins((100, 100), P, 0)
    with pytest.raises(InputError, match="2D image shape"):
        patch_origins((100, 100, 3), P, P // 2)
    with pytest.raises(InputError, match="one grid"):
        multimag_patches(np.zeros((80, 80)), np.zeros((80, 90)), [[0, 0]], P)
    with pytest.raises(InputError, match="single-channel"):
        multimag_patches(np.zeros((80, 80, 3)), np.zeros((80, 80, 3)), [[0, 0]], P)
    with pytest.raises(InputError, match="magnifications"):
        multimag_patches(np.zeros((80, 80)), np.zeros((80, 80)), [[0, 0]], P, 3)
    with pytest.raises(InputError, match="blend_fields needs"):
        blend_fields(np.zeros((2, 2, P, P)), [[0, 0]], (80, 80), P)
