"""The pure-torch N-linear interpolation: values like grid_sample, exact first and second derivatives."""

import pytest
import torch
import torch.nn.functional as F

from napari_nephi.engines.nephi.interp import interpolate


def _points(n, d, seed, low=-0.95, high=0.95):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(1, n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("d", [2, 3])
def test_values_match_grid_sample(d):
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 3, *([5, 6, 7][:d]), generator=g, dtype=torch.float64)
    pts = torch.rand(2, 50, d, generator=g, dtype=torch.float64) * 2.4 - 1.2  # some outside: border
    ours = interpolate(grid, pts)  # (B, N, C)
    gs_grid = pts.flip(-1).reshape(2, 50, *([1] * (d - 1)), d)
    ref = F.grid_sample(grid, gs_grid, mode="bilinear", padding_mode="border", align_corners=True)
    ref = ref.reshape(2, 3, 50).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # unbatched form
    torch.testing.assert_close(interpolate(grid[0], pts[0]), ours[0])


@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck_and_gradgradcheck(d):
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(1, 2, *([4, 5, 3][:d]), generator=g, dtype=torch.float64, requires_grad=True)
    pts = _points(6, d, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(interpolate, (grid, pts), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(interpolate, (grid, pts), eps=1e-6, atol=1e-6)


def test_second_derivative_in_points_is_the_bilinear_cross_term():
    # f(y, x) on a 2x2 grid is bilinear: f = a + b t + c s + e t s, so d2f/dy dx = e * (dt/dy)(ds/dx).
    grid = torch.tensor([[[[0.0, 1.0], [2.0, 7.0]]]], dtype=torch.float64)
    e = 7.0 - 1.0 - 2.0 + 0.0
    p = torch.tensor([[[0.1, -0.3]]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(interpolate(grid, p).sum(), p, create_graph=True)
    (h,) = torch.autograd.grad(g[..., 0].sum(), p)
    assert h[0, 0, 1].item() == pytest.approx(e * 0.5 * 0.5)
    assert h[0, 0, 0].item() == pytest.approx(0.0)
