"""Jacobian determinant against analytic maps; fold statistics."""

import numpy as np
import pytest

import napari_nephi.core.jacobian as jacobian
from napari_nephi.core import AffineTransform, DisplacementTransform, fold_statistics, jacobian_determinant
from napari_nephi.core.errors import DimensionMismatchError, InputError


def rotation(ndim, angle):
    r = np.eye(ndim)
    c, s = np.cos(angle), np.sin(angle)
    r[:2, :2] = [[c, -s], [s, c]]
    return r


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("scale", [0.5, 1.3])
def test_scaling_determinant(ndim, scale):
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] *= scale
    u = AffineTransform(m).displacement((10,) * ndim)
    np.testing.assert_allclose(jacobian_determinant(u), scale**ndim, rtol=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_rotation_determinant_is_one(ndim):
    m = np.eye(ndim + 1)
    m[:ndim, :ndim] = rotation(ndim, 0.4)
    u = AffineTransform(m).displacement((12,) * ndim)
    np.testing.assert_allclose(jacobian_determinant(u), 1.0, atol=1e-4)


def test_anisotropic_scaling_and_spacing():
    m = np.diag([2.0, 0.5, 3.0, 1.0])
    u = AffineTransform(m).displacement((6, 7, 8))
    det = jacobian_determinant(u, spacing=(4.0, 1.0, 0.25))  # voxel units: spacing does not matter
    np.testing.assert_allclose(det, 3.0, rtol=1e-4)
    # the same map with displacements in physical units
    sp = np.array([4.0, 1.0, 0.25]).reshape(3, 1, 1, 1)
    det_phys = jacobian_determinant(u * sp, spacing=(4.0, 1.0, 0.25), units="physical")
    np.testing.assert_allclose(det_phys, 3.0, rtol=1e-4)


def test_folded_map_is_counted():
    """phi(y, x) = (y, x + a sin(2 pi x / L)) folds where 1 + a 2pi/L cos(.) <= 0."""
    n = 64
    y, x = np.indices((n, n)).astype(np.float64)
    a = 20.0
    u = np.stack([np.zeros_like(x), a * np.sin(2 * np.pi * x / n)])
    det = jacobian_determinant(u)
    analytic = 1 + a * 2 * np.pi / n * np.cos(2 * np.pi * x / n)
    inner = (slice(None), slice(1, -1))
    np.testing.assert_allclose(det[inner], analytic[inner], atol=0.05)
    stats = fold_statistics(det)
    assert stats["folds"] == int(np.count_nonzero(det <= 0))
    expected_percent = 100 * np.mean(analytic[inner] <= 0)
    assert abs(stats["fold_percent"] - expected_percent) < 4
    assert stats["jacobian_min"] < 0


def test_fold_statistics_inside_mask():
    det = np.ones((10, 10))
    det[0, :5] = -1
    mask = np.zeros((10, 10), bool)
    mask[5:] = True
    assert fold_statistics(det, mask)["folds"] == 0
    assert fold_statistics(det)["folds"] == 5
    assert fold_statistics(det)["fold_percent"] == 5.0
    with pytest.raises(DimensionMismatchError):
        fold_statistics(det, mask[:5])


def test_smooth_displacement_is_fold_free():
    field = np.zeros((2, 20, 20), np.float32)
    field[0] = 0.5 * np.sin(np.linspace(0, np.pi, 20))[None, :]
    assert fold_statistics(jacobian_determinant(DisplacementTransform(field).displacement()))["folds"] == 0


def test_bad_fields():
    with pytest.raises(DimensionMismatchError):
        jacobian_determinant(np.zeros((3, 4, 4)))
    with pytest.raises(InputError):
        jacobian_determinant(np.zeros((2, 1, 4)))


@pytest.mark.parametrize("shape", [(37, 23), (9, 11, 7)])
def test_slabs_match_the_whole_array_computation(monkeypatch, shape):
    """Slab-wise evaluation (bounded memory) gives the whole-array central differences exactly."""
    u = np.random.default_rng(3).normal(scale=0.4, size=(len(shape), *shape)).astype(np.float32)
    whole = jacobian_determinant(u)
    u64 = u.astype(np.float64)
    grads = [np.gradient(u64[i]) for i in range(len(shape))]
    jac = np.stack([np.stack(g) for g in grads]) + np.eye(len(shape)).reshape(
        (len(shape), len(shape)) + (1,) * len(shape)
    )
    expected = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5)
    for slab in (1, 2 * int(np.prod(shape[1:])) + 1):  # one row per slab; uneven slabs
        monkeypatch.setattr(jacobian, "SLAB_VOXELS", slab)
        np.testing.assert_array_equal(jacobian_determinant(u), whole)
