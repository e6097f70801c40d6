"""Regularisers on point sets: known values for identity, affine and quadratic maps, 2D and 3D."""

import math

import pytest
import torch

from napari_nephi.core import regularizers as R


def _pts(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, n, d, generator=g, dtype=torch.float64) * 2 - 1


def _affine(a, t=None):
    a = torch.as_tensor(a, dtype=torch.float64)
    t = torch.zeros(a.shape[0], dtype=torch.float64) if t is None else torch.as_tensor(t, dtype=torch.float64)
    return lambda x: x @ a.T + t


def _rotation(d, angle=0.4):
    c, s = math.cos(angle), math.sin(angle)
    if d == 2:
        return [[c, -s], [s, c]]
    return [[c, -s, 0], [s, c, 0], [0, 0, 1]]


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("method", ["autograd", "fd"])
def test_jacobian_of_affine_map(d, method):
    a = torch.eye(d, dtype=torch.float64) + 0.1 * torch.arange(d * d, dtype=torch.float64).reshape(d, d)
    j = R.jacobian(_affine(a, torch.ones(d)), _pts(5, d), method=method)
    assert j.shape == (1, 5, d, d)
    torch.testing.assert_close(j, a.expand(1, 5, d, d), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_identity_has_zero_penalties(d):
    ident = _affine(torch.eye(d))
    x = _pts(7, d)
    for value in (
        R.gradicon(ident, ident, x),
        R.diffusion(ident, x),
        R.bending_energy(ident, x),
        R.jacobian_determinant_loss(ident, x, mode="log"),
        R.jacobian_determinant_loss(ident, x, mode="abs"),
        R.cycle_consistency(ident, ident, x),
    ):
        assert float(value.detach()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("method", ["autograd", "fd"])
def test_gradicon_zero_for_inverse_pair_and_positive_otherwise(d, method):
    a = torch.as_tensor(_rotation(d), dtype=torch.float64) * 1.3
    t = torch.full((d,), 0.2, dtype=torch.float64)
    fwd = _affine(a, t)
    inv = _affine(torch.linalg.inv(a), -torch.linalg.inv(a) @ t)
    x = _pts(9, d)
    assert float(R.gradicon(fwd, inv, x, method=method)) == pytest.approx(0.0, abs=1e-8)
    assert float(R.cycle_consistency(fwd, inv, x)) == pytest.approx(0.0, abs=1e-12)
    # undoing the rotation but not the scale leaves 1.3 I: ||J - I||_F^2 = d * 0.3^2 both ways
    wrong = _affine(torch.as_tensor(_rotation(d), dtype=torch.float64).T)
    assert float(R.gradicon(fwd, wrong, x, method=method)) == pytest.approx(d * 0.3**2, rel=1e-6)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("method", ["autograd", "fd"])
def test_bending_energy_of_quadratic_map(d, method):
    c = 0.3

    def quad(x):  # component 1 gets c * x0^2 + c * x0 * x_last: second derivatives 2c and c
        extra = torch.zeros_like(x)
        extra[..., 1] = c * x[..., 0] ** 2 + c * x[..., 0] * x[..., -1]
        return x + extra

    # H_1 has d2/dx0^2 = 2c and d2/dx0 dx_last = d2/dx_last dx0 = c: 4c^2 + 2c^2
    expected = 6 * c**2
    value = R.bending_energy(quad, _pts(6, d), method=method)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(R.diffusion(quad, _pts(6, d), method=method)) > 0


@pytest.mark.parametrize("d", [2, 3])
def test_jacobian_penalty_punishes_folds(d):
    x = _pts(8, d)
    flip = torch.eye(d, dtype=torch.float64)
    flip[0, 0] = -1
    grow = 2.0 * torch.eye(d, dtype=torch.float64)
    shrink = 0.5 * torch.eye(d, dtype=torch.float64)
    folded = float(R.jacobian_determinant_loss(_affine(flip), x))
    grown = float(R.jacobian_determinant_loss(_affine(grow), x, mode="log"))
    shrunk = float(R.jacobian_determinant_loss(_affine(shrink), x, mode="log"))
    assert grown == pytest.approx(shrunk) == pytest.approx((d * math.log(2)) ** 2)  # symmetric
    assert folded > 10 * grown
    assert float(R.jacobian_determinant_loss(_affine(grow), x, mode="abs")) == pytest.approx(2**d - 1)


def test_gradient_flows_to_parameters_through_the_jacobian():
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def fn(x):
        return x + w * torch.sin(x)

    R.gradicon(fn, fn, _pts(5, 2)).backward()
    assert w.grad is not None and float(w.grad.abs()) > 0


def test_dense_grid_regularizers():
    yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    linear = torch.stack([0.1 * yy, 0.2 * xx])[None]  # gradient 0.1 and 0.2 along its own axis
    assert float(R.diffusion_grid(linear)) == pytest.approx(0.1**2 + 0.2**2, rel=1e-5)
    assert float(R.bending_grid(linear)) == pytest.approx(0.0, abs=1e-10)
    quad = torch.stack([0.5 * yy**2, torch.zeros_like(xx)])[None]
    assert float(R.bending_grid(quad)) > 0.9
