"""Cubic B-spline smoothing of the field (SINR): the spline against scipy, its derivatives, the field.

The reference is scipy's own cubic B-spline (``ndimage.map_coordinates`` with ``prefilter=False``
reads its input as B-spline coefficients; ``interpolate.NdBSpline`` gives derivatives), an
implementation independent of ours.
"""

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from scipy.interpolate import NdBSpline

import napari_nephi
from napari_nephi.core import regularizers as R
from napari_nephi.core.errors import InputError
from napari_nephi.engines.nephi.bspline import (
    MARGIN,
    bspline_interpolate,
    control_points,
    control_shape,
    intervals_for_spacing,
)
from napari_nephi.engines.nephi.field import FieldConfig, NeuralDeformationField, zero_codes
from napari_nephi.engines.nephi.model import NePhiModel

INTERVALS = {2: (3, 4), 3: (3, 2, 4)}


def _control(d, channels=2, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = control_shape(INTERVALS[d])
    lead = (channels,) if batch is None else (batch, channels)
    return torch.randn(*lead, *shape, generator=g, dtype=torch.float64)


def _points(n, d, seed, low=-1.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, d, generator=g, dtype=torch.float64)


def _index_units(points, d):
    """Our normalised points in control-index units (control point j at index j)."""
    k = np.asarray(INTERVALS[d], np.float64)
    return (points.detach().numpy() + 1) * k / 2 + MARGIN


def _scipy_spline(coef, d):
    knots = tuple(np.arange(-2.0, n + 2.0) for n in coef.shape)  # basis j centred on index j
    return NdBSpline(knots, coef, 3, extrapolate=False)


@pytest.mark.parametrize("d", [2, 3])
def test_values_match_scipy_cubic_bspline(d):
    control = _control(d)
    h = 2.0 / np.asarray(INTERVALS[d])
    # the domain and the margin beyond it, where the spline is exact
    pts = _points(200, d, seed=1, low=-1.0 - 0.99 * h.min(), high=1.0 + 0.99 * h.min())
    ours = bspline_interpolate(control, pts).numpy()  # (N, C)
    u = _index_units(pts, d).T
    ref = np.stack([ndi.map_coordinates(c.numpy(), u, order=3, prefilter=False) for c in control], -1)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
    ref2 = np.stack([_scipy_spline(c.numpy(), d)(u.T) for c in control], -1)
    np.testing.assert_allclose(ours, ref2, rtol=1e-10, atol=1e-10)
    # batched form; a control grid of batch 1 broadcasts over points of batch 2
    batched = bspline_interpolate(control[None], torch.stack([pts, pts.flip(0)]))
    torch.testing.assert_close(batched[0], torch.as_tensor(ours))
    torch.testing.assert_close(batched[1], torch.as_tensor(ours).flip(0))


@pytest.mark.parametrize("d", [2, 3])
def test_first_and_second_derivatives_match_scipy(d):
    control = _control(d, channels=1, seed=3)
    pts = _points(12, d, seed=4, low=-0.97, high=0.97).requires_grad_(True)
    y = bspline_interpolate(control, pts)[:, 0]
    (grad,) = torch.autograd.grad(y.sum(), pts, create_graph=True)
    hess = torch.stack(
        [torch.autograd.grad(grad[:, j].sum(), pts, retain_graph=True)[0] for j in range(d)], 1
    )
    spline = _scipy_spline(control[0].numpy(), d)
    u = _index_units(pts, d)
    scale = np.asarray(INTERVALS[d], np.float64) / 2  # d(index) / d(normalised)
    for j in range(d):
        nu = np.zeros(d, int)
        nu[j] = 1
        np.testing.assert_allclose(
            grad[:, j].detach().numpy(), spline(u, nu=nu) * scale[j], rtol=1e-9, atol=1e-9
        )
        for k in range(d):
            nu = np.zeros(d, int)
            nu[j] += 1
            nu[k] += 1
            ref = spline(u, nu=nu) * scale[j] * scale[k]
            np.testing.assert_allclose(hess[:, j, k].numpy(), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d", [2, 3])
def test_gradcheck_and_gradgradcheck(d):
    g = torch.Generator().manual_seed(5)
    # the smallest control grids (one knot interval, 6 control points per axis) keep the 3D check quick
    shape = control_shape((2, 1) if d == 2 else (1, 1, 1))
    control = torch.randn(1, 2 if d == 2 else 1, *shape, generator=g, dtype=torch.float64).requires_grad_(
        True
    )
    pts = _points(5 if d == 2 else 3, d, seed=6, low=-1.1, high=1.1)[None].requires_grad_(True)
    assert torch.autograd.gradcheck(bspline_interpolate, (control, pts), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(bspline_interpolate, (control, pts), eps=1e-6, atol=1e-6)


def test_the_spline_is_c2_across_knots_and_linear_interpolation_is_not():
    d = 2
    control = _control(d, channels=1, seed=7)
    # a knot of axis 1 in normalised coordinates: -1 + 2 * h1
    knot = -1 + 2 * (2.0 / INTERVALS[d][1])
    eps = 1e-7

    def derivatives(p):
        p = torch.tensor([p], dtype=torch.float64, requires_grad=True)
        y = bspline_interpolate(control, p)[:, 0]
        (g,) = torch.autograd.grad(y.sum(), p, create_graph=True)
        (h,) = torch.autograd.grad(g[:, 1].sum(), p, create_graph=True)
        (t,) = torch.autograd.grad(h[:, 1].sum(), p)
        return y.item(), g[0, 1].item(), h[0, 1].item(), t[0, 1].item()

    left, right = derivatives([0.3, knot - eps]), derivatives([0.3, knot + eps])
    for order in range(3):  # value, first and second derivative: continuous
        assert abs(left[order] - right[order]) < 1e-4 * (1 + abs(left[order]))
    assert abs(left[3] - right[3]) > 1e-3  # the third derivative jumps: a cubic spline, not smoother
    # the N-linear interpolation used for the codes has a kink at its grid nodes (a check that can fail)
    from napari_nephi.engines.nephi.interp import interpolate

    grid = control[:, 2:-2, 2:-2]
    node = -1 + 2 * 2 / (grid.shape[-1] - 1)

    def slope(x):
        p = torch.tensor([[0.3, x]], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(interpolate(grid, p).sum(), p)
        return g[0, 1].item()

    assert abs(slope(node - 1e-3) - slope(node + 1e-3)) > 1e-3


def test_points_beyond_the_margin_are_clamped():
    control = _control(2, channels=1)
    far = torch.tensor([[5.0, -7.0]], dtype=torch.float64)
    edge = torch.tensor([[1 + 2 / INTERVALS[2][0], -1 - 2 / INTERVALS[2][1]]], dtype=torch.float64)
    torch.testing.assert_close(bspline_interpolate(control, far), bspline_interpolate(control, edge))


def test_geometry_helpers():
    assert control_shape((4, 5)) == (9, 10)
    pts = control_points((4,), dtype=torch.float64)
    assert pts.shape == (9, 1)
    assert pts[MARGIN, 0].item() == pytest.approx(-1) and pts[-1 - MARGIN, 0].item() == pytest.approx(1)
    assert intervals_for_spacing((96, 33), 4) == (24, 8)
    with pytest.raises(InputError):
        intervals_for_spacing((10, 10), 0)
    with pytest.raises(InputError):
        bspline_interpolate(torch.zeros(1, 2, 3, 9), torch.zeros(1, 4, 2))  # too few control points


# -- the B-spline field ---------------------------------------------------------------------


def _field(d=2, intervals=(4, 5), seed=0):
    cfg = FieldConfig(ndim=d, hidden=16, layers=2, n_frequencies=8, bspline_intervals=intervals, seed=seed)
    field = NeuralDeformationField(cfg).double()
    codes = zero_codes(cfg, (3,) * d)
    codes = type(codes)(codes.global_code.double(), codes.local_code.double())
    return field, codes


def _perturb(field, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_field_is_the_spline_of_the_network_on_the_control_grid():
    field, codes = _field()
    x = _points(30, 2, seed=2)[None]
    assert field.displacement(x, codes).abs().max() == 0  # fresh field: identity
    _perturb(field)
    disp = field.displacement(x, codes, "forward")
    ctrl = control_points((4, 5), dtype=torch.float64).reshape(1, -1, 2)
    net_ctrl = field.forward_net(ctrl, field.latent(ctrl, codes))  # (1, M, 2)
    grid = net_ctrl.transpose(1, 2).reshape(1, 2, *control_shape((4, 5)))
    torch.testing.assert_close(disp, bspline_interpolate(grid, x))
    assert (field.displacement(x, codes, "backward") - disp).abs().max() > 1e-6  # its own network


def test_field_supports_double_backward_regularisers_and_caches_safely():
    field, codes = _field()
    _perturb(field)
    for t in codes.tensors():
        t.requires_grad_(True)
    opt = torch.optim.Adam([*field.parameters(), *codes.tensors()], lr=1e-2)
    fwd = lambda p: field.map(p, codes, "forward")  # noqa: E731
    bwd = lambda p: field.map(p, codes, "backward")  # noqa: E731
    x = _points(16, 2, seed=3)[None]
    values = []
    for _ in range(3):  # the cache must not reuse a graph freed by the previous step
        opt.zero_grad()
        loss = R.gradicon(fwd, bwd, x) + R.bending_energy(fwd, x) + fwd(x).pow(2).mean()
        loss.backward()
        grads = [p.grad for p in field.forward_net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().max() > 0 for g in grads)
        opt.step()
        values.append(fwd(x).detach().clone())
    assert (values[1] - values[0]).abs().max() > 1e-6  # parameters changed -> the cache was refreshed
    # a filled cache does not stop copies (NePhiModel.copy uses deepcopy)
    field.displacement(x, codes)
    clone = copy.deepcopy(field)
    torch.testing.assert_close(clone.displacement(x, codes).detach(), field.displacement(x, codes).detach())


def test_field_config_round_trip_and_old_checkpoints(tmp_path):
    cfg = FieldConfig(ndim=3, bspline_intervals=[4, 5, 6])
    assert cfg.bspline_intervals == (4, 5, 6)
    data = cfg.to_dict()
    assert data["bspline_intervals"] == [4, 5, 6]
    assert FieldConfig.from_dict(data) == cfg
    assert FieldConfig(ndim=2, bspline_intervals=7).bspline_intervals == (7, 7)
    old = {k: v for k, v in FieldConfig(ndim=2).to_dict().items() if k != "bspline_intervals"}
    assert FieldConfig.from_dict(old).bspline_intervals is None  # checkpoints from before the option
    for bad in [(4, 0), (4, 5, 6), (2.5, 3)]:
        with pytest.raises(InputError):
            FieldConfig(ndim=2, bspline_intervals=bad)
    # a model with a B-spline field saves, loads and maps the same; an old-style file loads with it off
    model = NePhiModel(FieldConfig(ndim=2, hidden=16, layers=2, n_frequencies=8, bspline_intervals=(4, 4)))
    _perturb(model.field)
    model.save(tmp_path / "m.pt")
    back = NePhiModel.load(tmp_path / "m.pt")
    assert back.cfg.bspline_intervals == (4, 4)
    x = _points(20, 2, seed=9).float()[None]
    codes = zero_codes(model.cfg, (3, 3))
    with torch.no_grad():
        torch.testing.assert_close(back.field.displacement(x, codes), model.field.displacement(x, codes))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    del ckpt["config"]["field"]["bspline_intervals"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert NePhiModel.load(tmp_path / "old.pt").cfg.bspline_intervals is None


# -- through register() ---------------------------------------------------------------------


def test_bspline_field_recovers_a_known_deformation(small_pair, camera_pair):
    fixed, moving = small_pair
    truth = camera_pair[2][:, ::2, ::2] / 2  # the 96 px displacement on the 48 px grid
    reg = napari_nephi.register(
        fixed,
        moving,
        method="nephi",
        device="cpu",
        bspline_spacing=4,
        iterations=80,
        sample_points=1024,
        reg_points=48,
        hidden=32,
        levels=1,  # the field alone: 48 px is too small for a coarse stage to help
    )
    inner = (slice(None), slice(4, -4), slice(4, -4))
    before = np.linalg.norm(truth[inner], axis=0).mean()
    after = np.linalg.norm(reg.transform.displacement()[inner] - truth[inner], axis=0).mean()
    print(f"B-spline 2D endpoint error {before:.3f} -> {after:.3f} px, {reg.metrics['seconds']:.1f} s")
    # measured: 0.43 of the initial error (with the default 3 levels it was 0.48 with the dense
    # velocity stage, 0.56 with the B-spline one, whose 12 px knots are coarser than this 6 px
    # deformation; 48 px limits all of them)
    assert after < 0.55 * before
    assert reg.metrics["folds"] == 0
    assert reg.metrics["inverse_consistency_mean"] < 0.1
    assert reg.settings["bspline_spacing"] == 4
    assert reg.settings["field"]["bspline_intervals"] == [12, 12]


def test_bspline_field_in_3d_and_in_predict_mode(small_pair):
    rng = np.random.default_rng(0)
    vol = ndi.gaussian_filter(rng.standard_normal((16, 16, 16)), 2).astype(np.float32)
    losses = []
    reg = napari_nephi.register(
        vol,
        np.roll(vol, 1, axis=2),
        method="nephi",
        device="cpu",
        bspline_spacing=5,
        levels=1,
        iterations=10,
        sample_points=1024,
        reg_points=16,
        hidden=16,
        progress=lambda e: losses.append(e.loss),
    )
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert reg.settings["field"]["bspline_intervals"] == [3, 3, 3]
    # predict with a model whose field is B-spline smoothed (random weights: it only has to run)
    fixed, moving = small_pair
    model = NePhiModel(FieldConfig(ndim=2, hidden=16, layers=2, n_frequencies=8, bspline_intervals=(6, 6)))
    _perturb(model.field, seed=3)
    reg = napari_nephi.register(fixed, moving, method="nephi", mode="predict", weights=model, device="cpu")
    disp = reg.transform.displacement()
    assert np.isfinite(disp).all() and np.abs(disp).max() > 1e-4
    assert reg.settings["field"]["bspline_intervals"] == [6, 6]
