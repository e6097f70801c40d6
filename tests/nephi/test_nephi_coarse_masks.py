"""Masks in NePhi's B-spline coarse stage (:func:`.coarse.optimize_velocity`).

The pair: scikit-image's camera at 128 px, the fixed image pulled back by a smooth known warp
(up to 4 px); in the moving image the right half is replaced by coins, texture unrelated to the
fixed image there. A mask over the left half (fixed mask: 8 px short of the middle, so that every
point it covers maps into the camera's half; moving mask: the half itself) must keep the
unrelated texture out of the similarity: the endpoint error inside the fixed mask's interior
(8 px border) falls well below the unmasked run's. ``mode="optimize"`` runs with
``iterations=0`` (rigid stage + coarse stage, as the fast preset on 2D images of 256 px and
more); ``predict+refine`` with the fast preset (prediction + coarse stage, no neural steps).
Without masks the coarse stage is the unweighted one; an all-ones mask gives the same field up to
rounding.
"""

import numpy as np
import pytest
import torch

import napari_nephi
from napari_nephi.core.similarity import lncc, ncc
from napari_nephi.engines.nephi.coarse import _weighted_similarity, optimize_velocity, pyramid_shapes

from .conftest import pull_back, smooth_displacement

N = 128
INNER = (slice(None), slice(8, N - 8), slice(8, N // 2 - 8))


@pytest.fixture(scope="module")
def half_replaced_pair():
    from skimage import data, transform

    def resized(image):
        return transform.resize(image.astype(np.float32) / 255, (N, N), anti_aliasing=True).astype(np.float32)

    cam, coins = resized(data.camera()), resized(data.coins())
    u = smooth_displacement((N, N), sigma=16, amplitude=4.0, seed=0)
    moving = cam.copy()
    moving[:, N // 2 :] = coins[:, N // 2 :]
    fixed_mask = np.zeros((N, N), bool)
    fixed_mask[:, : N // 2 - 8] = True
    moving_mask = np.zeros((N, N), bool)
    moving_mask[:, : N // 2] = True
    return {
        "fixed": pull_back(cam, u),
        "moving": moving,
        "u": u,
        "camera": cam,
        "masks": (fixed_mask, moving_mask),
    }


def _inner_error(disp, u) -> float:
    return float(np.linalg.norm(disp[INNER] - u[INNER], axis=0).mean())


# optimize: 50 coarse steps a level instead of the preset's 100 (session 43, half the CPU). Endpoint errors
# without / with the fixed / with the moving mask: 2.715 / 0.107 / 0.198 px (at 100: 2.880 / 0.097 / 0.261)
@pytest.mark.parametrize(
    "mode, options", [("predict+refine", {}), ("optimize", {"iterations": 0, "coarse_iterations": 50})]
)
def test_masks_keep_unrelated_texture_out_of_the_coarse_stage(half_replaced_pair, mode, options):
    fixed, moving, u = (half_replaced_pair[k] for k in ("fixed", "moving", "u"))
    fixed_mask, moving_mask = half_replaced_pair["masks"]
    initial = _inner_error(np.zeros_like(u), u)

    def run(**masks):
        reg = napari_nephi.register(
            fixed, moving, method="nephi", mode=mode, device="cpu", seed=0, **options, **masks
        )
        return reg.transform.displacement()

    plain = run()
    with_fixed = run(fixed_mask=fixed_mask)
    with_moving = run(moving_mask=moving_mask)
    errors = [_inner_error(d, u) for d in (plain, with_fixed, with_moving)]
    print(
        f"{mode}: inner endpoint error {initial:.3f} -> none/fixed/moving mask "
        + "/".join(f"{e:.3f}" for e in errors)
    )
    assert np.abs(with_fixed - plain).max() > 1.0  # the mask changes the map
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.5 * initial
    assert errors[2] < 0.5 * errors[0] and errors[2] < 0.5 * initial


@pytest.mark.parametrize("name", ["ncc", "mse", "lncc"])
def test_weighted_similarity_with_unit_weights_is_the_unweighted_one(name):
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 1, 24, 20, generator=g), torch.rand(1, 1, 24, 20, generator=g)
    expected = {"ncc": 1 - ncc(a, b), "mse": ((a - b) ** 2).mean(), "lncc": 1 - lncc(a, b, window=5)}[name]
    assert _weighted_similarity(name, a, b, None) == expected  # the unweighted path is the library's measure
    torch.testing.assert_close(
        _weighted_similarity(name, a, b, torch.ones_like(a)), expected, rtol=1e-5, atol=1e-6
    )
    # zero weight on half the voxels: the measure of the other half alone
    w = torch.zeros_like(a)
    w[..., :10] = 1
    if name != "lncc":  # local windows straddle the weight's edge
        half = _weighted_similarity(name, a[..., :10].contiguous(), b[..., :10].contiguous(), None)
        torch.testing.assert_close(_weighted_similarity(name, a, b, w), half, rtol=1e-5, atol=1e-6)


def test_all_ones_masks_give_the_unmasked_field(half_replaced_pair):
    # the warped camera onto the camera itself (no replaced texture)
    f = torch.as_tensor(half_replaced_pair["fixed"])[None, None]
    m = torch.as_tensor(half_replaced_pair["camera"])[None, None]
    shapes = pyramid_shapes((N, N), [4, 2])
    plain = optimize_velocity(f, m, shapes, 20, 0.1, "ncc", lambda loss: None)
    ones = torch.ones_like(f)
    masked = optimize_velocity(
        f, m, shapes, 20, 0.1, "ncc", lambda loss: None, fixed_mask=ones, moving_mask=ones
    )
    scale = (N - 1) / 2  # normalised units -> px
    assert float(plain.forward_grid.abs().max()) * scale > 2.0  # it moved
    torch.testing.assert_close(masked.forward_grid * scale, plain.forward_grid * scale, rtol=0, atol=1e-3)
    torch.testing.assert_close(masked.backward_grid * scale, plain.backward_grid * scale, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["ncc", "mse", "lncc"])
def test_weighted_similarity_does_not_depend_on_the_weights_scale(name):
    """Pooled fractional weights can sum to less than 1 on a coarse grid: the measure must not
    change with their scale (ncc's weighted means once divided by sum(w) clamped at 1)."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 16, 16, generator=g)
    w = torch.rand(1, 1, 16, 16, generator=g)
    for b in (a + 5, 2 * a - 1, torch.rand(1, 1, 16, 16, generator=g)):
        torch.testing.assert_close(
            _weighted_similarity(name, a, b, 1e-3 * w),
            _weighted_similarity(name, a, b, w),
            rtol=1e-4,
            atol=1e-5,
        )
    assert _weighted_similarity("ncc", a, a + 5, 1e-3 * w) == pytest.approx(0.0, abs=1e-5)
