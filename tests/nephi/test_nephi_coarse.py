"""The coarse stage: a B-spline stationary velocity field optimised level by level."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_nephi.core.inputs import normalize_intensity
from napari_nephi.core.jacobian import jacobian_determinant
from napari_nephi.core.transform import DisplacementTransform
from napari_nephi.engines.nephi.bspline import (
    bspline_interpolate,
    bspline_on_grid,
    control_shape,
    grid_weights,
)
from napari_nephi.engines.nephi.coarse import (
    comparison_shape,
    knot_spacings,
    level_iterations,
    normalized_grid,
    optimize_velocity,
    pyramid_shapes,
)
from napari_nephi.synthetic import random_smooth_displacement


@pytest.mark.parametrize(("shape", "intervals"), [((17, 30), (3, 5)), ((9, 12, 7), (2, 3, 1))])
def test_spline_on_a_grid_matches_pointwise_evaluation(shape, intervals):
    control = torch.randn(2, 3, *control_shape(intervals), dtype=torch.float64)
    weights = [grid_weights(n, k, dtype=torch.float64) for n, k in zip(shape, intervals)]
    on_grid = bspline_on_grid(control, weights)
    pts = normalized_grid(shape, dtype=torch.float64).reshape(1, -1, len(shape)).expand(2, -1, -1)
    pointwise = bspline_interpolate(control, pts).transpose(1, 2).reshape(2, 3, *shape)
    torch.testing.assert_close(on_grid, pointwise, rtol=0, atol=1e-12)


def test_knots_halve_with_the_grid_and_small_images_keep_a_few():
    assert knot_spacings((512, 512), [(128, 128), (256, 256)]) == [32, 16]
    small = knot_spacings((25, 41, 33), pyramid_shapes((25, 41, 33), [4, 2]))
    assert small[-1] == pytest.approx(6.0)  # a quarter of the 25-voxel axis
    assert small[0] == pytest.approx(2 * small[-1], rel=0.15)


def test_comparison_grid_is_the_image_up_to_the_cap():
    assert comparison_shape((512, 512)) == (512, 512)
    assert comparison_shape((2048, 2048)) == (1024, 1024)
    assert comparison_shape((300, 301), max_voxels=300 * 301 - 1) == (150, 151)


@pytest.mark.parametrize(("ndim", "reg_weight"), [(2, 0.1), (2, 0.0), (3, 0.1)])
def test_coarse_stage_recovers_a_smooth_deformation_without_folds(ndim, reg_weight):
    from skimage import data
    from skimage.transform import resize

    if ndim == 2:
        img = resize(data.astronaut()[..., 1].astype(np.float32) / 255, (128, 128), anti_aliasing=True)
        umax, sigma, factors = 4.0, 32.0, [4, 2]  # smooth on the scale of the 16 px knots
    else:
        rng = np.random.default_rng(0)
        from scipy import ndimage

        img = ndimage.gaussian_filter(rng.standard_normal((32, 32, 32)), 2)
        umax, sigma, factors = 2.0, 8.0, [2]
    img = img.astype(np.float32)
    u, u_inv = random_smooth_displacement(img.shape, umax, sigma, seed=3, return_inverse=True)
    moving = DisplacementTransform(u_inv).warp(img)
    f = torch.as_tensor(normalize_intensity(img))[None, None]
    m = torch.as_tensor(normalize_intensity(moving))[None, None]
    losses = []
    # 0.1: the engine's default coarse_reg_weight; 0: no bending penalty, and no finer-knot level,
    # whose knots would fit noise on a field this smooth (2D: 0.142 px with it, 0.049 without)
    shapes = pyramid_shapes(img.shape, factors)
    maps = optimize_velocity(f, m, shapes, 100, reg_weight, "ncc", losses.append)
    assert len(losses) == sum(level_iterations(100, len(shapes), reg_weight > 0))
    mode = "bilinear" if ndim == 2 else "trilinear"
    scale = torch.tensor([(n - 1) / 2 for n in img.shape]).reshape(-1, *[1] * ndim)
    est = (F.interpolate(maps.forward_grid, size=img.shape, mode=mode, align_corners=True)[0] * scale).numpy()
    inner = (slice(None),) + (slice(4, -4),) * ndim
    before = np.linalg.norm(u[inner], axis=0).mean()
    after = np.linalg.norm(est[inner] - u[inner], axis=0).mean()
    print(f"{ndim}D coarse stage, reg {reg_weight}: endpoint error {before:.3f} -> {after:.3f} voxels")
    # measured: 0.054 of the initial error in 2D (0.068 px; reg 0: 0.042, 0.053 px), 0.17 in 3D
    # (0.850 -> 0.145 voxels, a 32^3 noise volume)
    assert after < (0.1 if ndim == 2 else 0.2) * before
    assert losses[-1] < losses[0]
    assert jacobian_determinant(est).min() > 0
    # the backward map is the forward one's inverse: phi_inv(phi(x)) = x
    x = normalized_grid(img.shape).reshape(1, -1, ndim)[:, ::7]
    back = maps.backward(maps.forward(x))
    err = ((back - x) * scale.reshape(1, 1, ndim)).norm(dim=-1)
    assert float(err.mean()) < 0.05


def test_finer_knot_level_recovers_a_field_varying_over_a_few_pixels():
    """A field with a correlation length of 4 px (128 px gravel, up to 1.5 px): the 16 px knots of the
    last grid cannot hold it, the finer-knot level (8 px) can (measured 0.278 -> 0.097 px)."""
    from skimage import data
    from skimage.transform import resize

    img = resize(data.gravel().astype(np.float32) / 255, (128, 128), anti_aliasing=True).astype(np.float32)
    u, u_inv = random_smooth_displacement(img.shape, 1.5, 4.0, seed=5, return_inverse=True)
    moving = DisplacementTransform(u_inv).warp(img)
    f = torch.as_tensor(normalize_intensity(img))[None, None]
    m = torch.as_tensor(normalize_intensity(moving))[None, None]
    scale = torch.tensor([(n - 1) / 2 for n in img.shape]).reshape(-1, 1, 1)
    inner = (slice(None), slice(8, -8), slice(8, -8))
    errors = {}
    for finer in (False, True):
        steps = []
        shapes = pyramid_shapes(img.shape, [4, 2])
        maps = optimize_velocity(f, m, shapes, 100, 0.1, "ncc", steps.append, finer_level=finer)
        assert len(steps) == sum(level_iterations(100, 2, finer))  # the engine's progress total
        est = F.interpolate(maps.forward_grid, size=img.shape, mode="bilinear", align_corners=True)[0] * scale
        errors[finer] = float(np.linalg.norm(est.numpy()[inner] - u[inner], axis=0).mean())
    before = float(np.linalg.norm(u[inner], axis=0).mean())
    assert errors[True] < 0.5 * errors[False] and errors[True] < 0.3 * before, (before, errors)
