"""Stage 5 refinement: tiles, one-tile optimisation against a known shift, blending, the refine-only stage."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data

import napari_nephi
from napari_nephi.core.progress import Progress
from napari_nephi.engines.histology.refine import (
    LocalNCC,
    RefineSettings,
    bspline_basis,
    lbfgs,
    optimise_tile,
    refine_field,
    tile_boxes,
)
from napari_nephi.engines.histology.stain import stain_channel
from napari_nephi.synthetic.histology import slide_pair


@pytest.fixture(scope="module")
def channel() -> np.ndarray:
    torch.set_num_threads(1)
    return stain_channel(data.immunohistochemistry()[::2, ::2], "hematoxylin")[0]


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"), [((700, 500), 320, 64), ((100, 90), 320, 64), ((742, 555), 512, 128)]
)
def test_tile_boxes_cover_with_overlap(shape, tile, overlap):
    """Tiles of at most ``tile`` px cover the grid; neighbours share at least ``overlap`` px; the
    fewest tiles that can do so (no tile mostly inside another)."""
    boxes = tile_boxes(shape, tile, overlap)
    cover = np.zeros(shape, int)
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]
        assert y1 - y0 <= tile and x1 - x0 <= tile
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    for axis, n in enumerate(shape):
        spans = sorted({(b[2 * axis], b[2 * axis + 1]) for b in boxes})
        fewest = 1 if n <= tile else int(np.ceil((n - overlap) / (tile - overlap)))
        assert len(spans) == fewest
        for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
            assert stop - start >= overlap


def test_local_ncc_against_direct_computation(channel):
    """Windowed NCC equals a direct per-window computation at interior pixels."""
    a = torch.as_tensor(channel[:40, :40])[None, None]
    b = torch.as_tensor(np.sqrt(channel[:40, :40]) + 0.1 * channel[5:45, 5:45])[None, None]
    weight = torch.zeros_like(a)
    weight[0, 0, 20, 17] = 1.0
    got = float(LocalNCC(a, weight, window=9)(b))
    wa, wb = a[0, 0, 16:25, 13:22].double(), b[0, 0, 16:25, 13:22].double()
    ca, cb = wa - wa.mean(), wb - wb.mean()
    expected = float((ca * cb).mean() / torch.sqrt((ca**2).mean() * (cb**2).mean() + 1e-5))
    assert got == pytest.approx(expected, abs=2e-3)


def test_optimise_tile_recovers_a_shift(channel):
    """A tile shifted by (2.5, -1.5) px: the correction found undoes it within 0.3 px."""
    margin, shift = 24, np.array([2.5, -1.5])
    fixed = channel[40:200, 40:200]
    big = channel[40 - margin : 200 + margin, 40 - margin : 200 + margin]
    moving = ndimage.shift(big, -shift, order=3, mode="nearest")  # moving(x) = big(x + shift)
    field, before, after, steps = optimise_tile(
        fixed, moving, np.ones(fixed.shape, np.float32), RefineSettings(iterations=60), margin
    )
    assert 0 < steps <= 60
    assert after > before
    inner = field[:, 30:-30, 30:-30].reshape(2, -1)
    np.testing.assert_allclose(np.median(inner, axis=1), -shift, atol=0.3)  # moving(x - shift) = fixed(x)


@pytest.mark.parametrize("as_region", [False, True])
def test_refine_field_skips_tiles_without_tissue_and_blends(channel, as_region):
    """Tissue only on the left: right tiles add a zero correction; the field has no seam. The moving
    slide read either pre-warped (here: the identity map) or as the whole slide with the box's
    coordinates in it."""
    shape = channel.shape
    shift = np.array([1.5, 1.0])
    moving = ndimage.shift(channel, -shift, order=3, mode="nearest")
    tissue = np.zeros(shape, np.float32)
    tissue[:, : shape[1] // 2] = 1
    settings = RefineSettings(tile=128, overlap=48, iterations=40)
    pad = settings.margin

    def read(img):
        def reader(box):
            y0, y1, x0, x1 = box
            padded = np.pad(img, pad, mode="edge")
            return padded[y0 + pad : y1 + pad, x0 + pad : x1 + pad]

        return reader

    def read_region(box):
        y0, y1, x0, x1 = box
        return moving, np.mgrid[y0:y1, x0:x1].astype(np.float32)

    events = []
    field, summary = refine_field(
        shape,
        read(channel),
        read_region if as_region else read(moving),
        lambda b: tissue[b[0] : b[1], b[2] : b[3]],
        settings,
        Progress(events.append),
    )
    assert 0 < summary["tiles_refined"] < summary["tiles"]
    assert len(events) == summary["tiles"] and {e.stage for e in events} == {"refine"}
    np.testing.assert_allclose(np.median(field[:, 40:-40, 20:60].reshape(2, -1), axis=1), -shift, atol=0.4)
    assert np.abs(field[:, :, -20:]).max() < 0.2  # no tissue there
    assert np.abs(np.diff(field, axis=2)).max() < 0.25  # smooth across tile borders


def test_refine_only_stage_recovers_a_smooth_warp():
    """stages=["refine"]: no rigid search, a 3 px smooth warp plus a shift recovered by refinement alone."""
    rgb = data.immunohistochemistry()[::2, ::2]
    pair = slide_pair(rgb, seed=11, warp=3.0)
    reg = napari_nephi.register(pair.fixed, pair.moving, method="histology", stages=["refine"])
    ys, xs = np.mgrid[16:240:8, 16:240:8]
    pts = np.stack([ys.ravel(), xs.ravel()], 1).astype(float)
    before = np.linalg.norm(pts - pair.transform.map_points(pts), axis=1)
    after = np.linalg.norm(reg.transform.map_points(pts) - pair.transform.map_points(pts), axis=1)
    assert "rigid_angle" not in reg.metrics
    assert np.median(after) < 0.5 * np.median(before)
    assert np.median(after) / np.hypot(256, 256) < 0.003


def test_bspline_basis_matches_scipy():
    """The cubic B-spline weights equal scipy's design matrix on the same uniform knots."""
    from scipy.interpolate import BSpline

    n, spacing = 50, 7.0
    basis = bspline_basis(n, spacing)
    m = basis.shape[1]
    knots = (np.arange(m + 4) - 3.0) * spacing  # control j centred on pixel (j - 1) * spacing
    x = np.arange(n, dtype=float)
    expected = BSpline.design_matrix(x, knots, 3).toarray()
    np.testing.assert_allclose(basis, expected, atol=1e-6)
    np.testing.assert_allclose(basis.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_refinement_recovers_a_small_smooth_warp(seed):
    """A smooth random warp of at most 4 px of a real IHC crop (another seed, another field) is recovered by
    one tile's refinement to a median error below 0.06 px (from over 0.8 px)."""
    margin = 24
    big, u, u_inv = _warped_crop(seed, margin)
    grid = np.mgrid[: big.shape[0], : big.shape[1]].astype(np.float64)
    moving = ndimage.map_coordinates(big, grid + u_inv, order=3, mode="nearest")  # moving(x + u(x)) = big(x)
    fixed = big[margin:-margin, margin:-margin]
    truth = u[:, margin:-margin, margin:-margin]
    field, before, after, _ = optimise_tile(
        fixed, moving.astype(np.float32), np.ones(fixed.shape, np.float32), RefineSettings(), margin
    )
    inner = (slice(None), slice(12, -12), slice(12, -12))
    err_before = np.median(np.linalg.norm(truth[inner], axis=0))
    err_after = np.median(np.linalg.norm((field - truth)[inner], axis=0))
    assert after > before
    assert err_before > 0.8
    assert err_after < 0.06


def _warped_crop(seed: int, margin: int = 24, size: int = 208):
    """A real IHC crop ``big``, a smooth warp ``u`` (at most 4 px) and its inverse ``u_inv``."""
    from napari_nephi.synthetic.deformation import random_smooth_displacement

    rgb = data.immunohistochemistry()[100 : 100 + size + 2 * margin, 150 : 150 + size + 2 * margin]
    big = stain_channel(rgb, "hematoxylin")[0].astype(np.float64)
    u, u_inv = random_smooth_displacement(
        big.shape, 4.0, 64.0, seed=seed, zero_boundary=False, return_inverse=True
    )
    return big, u, u_inv


@functools.cache
def _crop_fit(seed: int, prewarped: bool, iterations: int = 60):
    """One tile refined on the crop of ``seed``: through the current map (coordinates into the
    unwarped crop) or on the crop pre-warped bilinearly; the field, NCC before/after, evaluations and
    the true correction."""
    margin = 24
    big, u, u_inv = _warped_crop(seed, margin)
    coords = np.mgrid[: big.shape[0], : big.shape[1]].astype(np.float64) + u_inv  # current map
    truth = u[:, margin:-margin, margin:-margin]  # margin + x + r(x) + u_inv(...) = margin + x
    moving, where = (
        (ndimage.map_coordinates(big, coords, order=1, mode="nearest"), None) if prewarped else (big, coords)
    )
    fixed = big[margin:-margin, margin:-margin]
    settings = RefineSettings(iterations=iterations)
    field, before, after, steps = optimise_tile(
        fixed, moving.astype(np.float32), np.ones(fixed.shape, np.float32), settings, margin, coords=where
    )
    return field, before, after, steps, truth


def _median_error(field: np.ndarray, truth: np.ndarray) -> float:
    inner = (slice(None), slice(12, -12), slice(12, -12))
    return float(np.median(np.linalg.norm((field - truth)[inner], axis=0)))


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_once_through_the_composed_map_beats_resampling(seed):
    """The current map given as coordinates into the unwarped crop (one bicubic interpolation in all):
    median error below 0.02 px, and below that of the same tile pre-warped bilinearly (two
    interpolations, the path without coordinates)."""
    errors = []
    for prewarped in (False, True):
        field, before, after, _, truth = _crop_fit(seed, prewarped)
        assert after > before
        errors.append(_median_error(field, truth))
    assert errors[0] < 0.02
    assert errors[0] < errors[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_more_iterations_do_not_drift(seed):
    """The fine pass converges: twice the evaluation budget finds the same field within 0.005 px
    (median), below 0.02 px from the truth (a second Adam pass jittered: 0.027 -> 0.044 px on seed 1)."""
    fields = []
    for iterations in (60, 120):
        field, _, _, steps, truth = _crop_fit(seed, False, iterations)
        assert steps <= iterations
        assert _median_error(field, truth) < 0.02
        fields.append(field)
    assert np.median(np.linalg.norm(fields[1] - fields[0], axis=0)) < 0.005


def test_lbfgs_finds_the_minimum_of_a_quadratic():
    """A badly scaled convex quadratic: the minimiser from a linear solve, within the step tolerance;
    the evaluation budget is kept."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(40, 40))
    a = torch.as_tensor(q @ q.T + np.diag(np.geomspace(0.1, 100.0, 40)))
    b = torch.as_tensor(rng.normal(size=40))
    calls = []

    def evaluate(x):
        calls.append(1)
        return 0.5 * x @ a @ x - b @ x, a @ x - b

    x, n = lbfgs(evaluate, torch.zeros(40, dtype=torch.float64), 500, 1e-9)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a.numpy(), b.numpy()), atol=1e-5)
    assert n == len(calls) < 500
    _, n = lbfgs(evaluate, torch.zeros(40, dtype=torch.float64), 7, 1e-9)
    assert n == 7


def test_lbfgs_stops_at_a_minimum():
    """Started at the minimiser of a smooth non-quadratic function, it stops at once (no decrease
    found) and stays there."""

    def evaluate(x):
        value = ((x - 1.0) ** 4).sum() + ((x - 1.0) ** 2).sum()
        return value, 4 * (x - 1.0) ** 3 + 2 * (x - 1.0)

    x, n = lbfgs(evaluate, torch.ones(5, dtype=torch.float64), 100, 1e-6)
    assert n <= 2
    np.testing.assert_allclose(x.numpy(), 1.0)
