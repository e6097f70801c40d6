"""The planar plate vote (engines/atlas/vote.py): known planes recovered from per-cell distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_nephi.core.errors import InputError
from napari_nephi.engines.atlas.preprocess import prepare_input_geometry
from napari_nephi.engines.atlas.vote import (
    cell_cover,
    cell_loss,
    cell_positions,
    cell_targets,
    gradient_grid,
    max_gradient,
    plane_scores,
    plane_vote,
    section_vote,
    soft_targets,
    truth_channels,
)

N_PLATES, CELLS, SIZE = 80, 8, 64


def _plane_cells(z0, gradient, weights, sigma=1.2, noise=0.0, seed=0):
    """Per-cell log-probabilities of Gaussians centred on the plane ``z0 + g . (p - centroid)``."""
    pos = cell_positions(CELLS, SIZE)
    centroid = (weights[:, None] * pos).sum(0) / weights.sum()
    z = z0 + (pos - centroid) @ np.asarray(gradient)
    z = z + np.random.default_rng(seed).normal(0, noise, z.shape) if noise else z
    plates = np.arange(N_PLATES)
    logp = -((plates[None] - z[:, None]) ** 2) / (2 * sigma**2)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return logp.astype(np.float32), pos, z


def _least_squares_plane(pos, z, weights):
    """Weighted least-squares plane through the cells' z: (z at the centroid, (gy, gx))."""
    keep = weights > 0
    centroid = (weights[keep, None] * pos[keep]).sum(0) / weights[keep].sum()
    a = np.column_stack([np.ones(keep.sum()), pos[keep] - centroid])
    sw = np.sqrt(weights[keep])
    coef = np.linalg.lstsq(a * sw[:, None], z[keep] * sw, rcond=None)[0]
    return coef[0], coef[1:]


@pytest.mark.parametrize(("z0", "gradient"), [(40.0, (0.0, 0.0)), (23.0, (0.25, -0.15)), (61.0, (-0.3, 0.3))])
def test_plane_vote_recovers_plane_against_least_squares(z0, gradient):
    weights = np.ones(CELLS * CELLS, np.float32)
    logp, pos, z = _plane_cells(z0, gradient, weights, noise=0.6, seed=int(z0))
    # the cells' own best plates, fitted by least squares: an independent estimate of the plane
    lsq_z0, lsq_g = _least_squares_plane(pos, logp.argmax(axis=1).astype(float), weights)
    result = plane_vote(logp, weights, pos, max_gradient=0.5, step=0.125)
    best = int(np.argmax(result.scores))
    assert best == round(z0)
    assert abs(best - lsq_z0) <= 1.0
    assert np.allclose(result.gradients[best], gradient, atol=0.04)
    assert np.allclose(result.gradients[best], lsq_g, atol=0.05)


def test_partial_cells_vote_for_their_own_centroid():
    """Half the grid without tissue: the plate at the centroid of the cells that are left wins."""
    weights = np.ones(CELLS * CELLS, np.float32)
    weights[: CELLS * CELLS // 2] = 0  # the top half is cut away
    gradient = (0.3, 0.0)
    logp, pos, z = _plane_cells(30.0, gradient, weights)
    result = plane_vote(logp, weights, pos, 0.5, 0.125)
    assert result.cells == CELLS * CELLS // 2
    assert int(np.argmax(result.scores)) == 30
    # the same plane seen with every cell has its centre 0.3 * 16 px = 4.8 plates lower
    centroid_all = pos.mean(0)
    centroid_half = pos[weights > 0].mean(0)
    assert np.isclose((centroid_all - centroid_half) @ np.asarray(gradient), -4.8, atol=1e-4)


def test_order_of_plates_falls_off_with_distance():
    weights = np.ones(CELLS * CELLS, np.float32)
    logp, pos, _ = _plane_cells(50.0, (0.1, 0.2), weights)
    scores = plane_vote(logp, weights, pos, 0.5, 0.125).scores
    order = np.argsort(-scores, kind="stable")
    assert order[0] == 50
    assert set(order[1:3]) == {49, 51}
    assert set(order[3:5]) == {48, 52}
    assert np.all(np.diff(scores[50:]) < 0) and np.all(np.diff(scores[:51]) > 0)


def test_coarse_to_fine_matches_a_fine_grid():
    weights = np.random.default_rng(3).uniform(0.2, 1.0, CELLS * CELLS).astype(np.float32)
    logp, pos, _ = _plane_cells(37.0, (-0.21, 0.13), weights, noise=0.4)
    fine = plane_scores(logp, weights, pos, gradient_grid(0.5, 0.03125))
    fast = plane_vote(logp, weights, pos, 0.5, 0.125)
    assert int(np.argmax(fast.scores)) == int(np.argmax(fine.scores)) == 37
    assert abs(fast.scores.max() - fine.scores.max()) < 0.05


def test_plane_scores_equals_direct_sum():
    """One gradient: the score of every plate is the weighted mean of the interpolated log-probabilities."""
    rng = np.random.default_rng(1)
    logp = np.log(rng.dirichlet(np.ones(12), 9)).astype(np.float32)
    pos = rng.uniform(0, 20, (9, 2)).astype(np.float32)
    w = rng.uniform(0.1, 1, 9).astype(np.float32)
    g = np.array([[0.2, -0.1]], np.float32)
    result = plane_scores(logp, w, pos, g, resolution=2)
    wn = w / w.sum()
    offsets = pos - (wn[:, None] * pos).sum(0)
    expected = []
    for z0 in range(12):
        total = 0.0
        for c in range(9):
            z = np.rint(2 * (z0 * 0 + offsets[c] @ g[0])) / 2 + z0
            if z < 0 or z > 11:
                value = logp.min()
            else:
                lo = int(np.floor(z))
                hi = min(lo + 1, 11)
                value = logp[c, lo] * (1 - (z - lo)) + logp[c, hi] * (z - lo)
            total += wn[c] * value
        expected.append(total)
    assert np.allclose(result.scores, expected, atol=1e-5)


def test_section_vote_and_bounds():
    cover = np.ones((CELLS, CELLS), np.float32)
    cover[:, :2] = 0.05  # thin cells below MIN_COVER do not vote: the centre is that of the others
    logp, _, _ = _plane_cells(12.0, (0.0, 0.2), (cover >= 0.15).ravel().astype(np.float32))
    result = section_vote(logp, cover, SIZE, max_gradient(1.5, 15.0))
    assert result.cells == CELLS * (CELLS - 2)
    assert int(np.argmax(result.scores)) == 12
    assert np.isclose(max_gradient(2.0, 45.0), 2.0)
    flat = section_vote(logp, cover, SIZE, 0.0)  # no tilt allowed: one plane, g = 0
    assert np.all(flat.gradients == 0)


def test_vote_errors():
    logp = np.zeros((4, 10), np.float32)
    with pytest.raises(InputError, match="No cell of the section holds tissue"):
        plane_scores(logp, np.zeros(4), np.zeros((4, 2)), np.zeros((1, 2)))
    with pytest.raises(InputError, match="log_probs"):
        plane_scores(logp, np.ones(3), np.zeros((4, 2)), np.zeros((1, 2)))
    with pytest.raises(InputError, match="at least one gradient"):
        plane_scores(logp, np.ones(4), np.zeros((4, 2)), np.zeros((0, 2)))


def test_cell_targets_against_numpy():
    rng = np.random.default_rng(0)
    m = (rng.random((2, 16, 16)) > 0.3).astype(np.float32)
    m[1, :8] = 0  # an empty half: its cells get weight 0
    z = rng.uniform(0, 30, (2, 16, 16)).astype(np.float32)
    channels = torch.from_numpy(np.stack([m, z * m, z * z * m], axis=1))
    zc, var, w = cell_targets(channels, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                mm = m[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                zz = z[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                assert np.isclose(float(w[b, i, j]), mm.mean())
                if mm.sum() > 0:
                    assert np.isclose(float(zc[b, i, j]), (zz * mm).sum() / mm.sum(), atol=1e-3)
                    ref_var = (mm * (zz - (zz * mm).sum() / mm.sum()) ** 2).sum() / mm.sum()
                    assert np.isclose(float(var[b, i, j]), ref_var, rtol=1e-3, atol=1e-2)
                else:
                    assert float(zc[b, i, j]) == 0 and float(var[b, i, j]) == 0


def test_soft_targets_and_cell_loss():
    z = torch.tensor([[[10.3, 8.0]]])
    var = torch.tensor([[[0.0, 3.0]]])
    q = soft_targets(z, var, 20, 1.0)
    assert torch.allclose(q.sum(1), torch.ones(1, 1, 2))
    mean = (q * torch.arange(20.0).view(1, -1, 1, 1)).sum(1)
    assert torch.allclose(mean, z, atol=1e-3)
    spread = (q * (torch.arange(20.0).view(1, -1, 1, 1) - z.unsqueeze(1)) ** 2).sum(1)
    assert torch.allclose(spread, torch.tensor([[[1.0, 4.0]]]), atol=0.05)  # sigma^2 + var
    weight = torch.tensor([[[1.0, 0.5]]])
    right = torch.log(q)
    wrong = torch.log(soft_targets(z + 5, var, 20, 1.0))
    assert float(cell_loss(right, z, var, weight)) < float(cell_loss(wrong, z, var, weight))
    # hand computation: the weighted mean over cells of -sum q log softmax(logits)
    logits = torch.randn(1, 20, 1, 2)
    ce = -(q * torch.log_softmax(logits, 1)).sum(1)
    expected = (ce[0, 0, 0] * 1.0 + ce[0, 0, 1] * 0.5) / 1.5
    assert torch.isclose(cell_loss(logits, z, var, weight), expected)
    # cells below MIN_COVER do not count; none at all: a zero loss still attached to the graph
    nothing = cell_loss(logits.requires_grad_(), z, var, torch.zeros_like(weight))
    assert float(nothing) == 0 and nothing.requires_grad
    with pytest.raises(InputError, match="do not match"):
        cell_loss(torch.zeros(1, 20, 2, 2), z, var, weight)


def test_truth_channels_follow_the_input_geometry():
    """A section whose atlas plate position is a ramp along x: each cell's target is the ramp at the
    cell's source pixels (crop, pad and resize of prepare_input accounted for)."""
    h, w = 300, 420
    section = np.zeros((h, w), np.float32)
    section[60:250, 100:380] = np.random.default_rng(0).uniform(0.5, 1, (190, 280))
    ramp = np.tile(np.linspace(10, 40, w, dtype=np.float32), (h, 1))
    image, geometry = prepare_input_geometry(section, SIZE)
    truth = truth_channels(ramp, geometry, SIZE)
    z, _, weight = cell_targets(torch.from_numpy(truth)[None], CELLS)
    ys, xs = geometry.source(SIZE)
    assert xs[0] < 100 < xs[-1] and xs[-1] < 400  # the input spans the tissue, not the whole image
    for j in range(CELLS):
        cols = xs[j * 8 : (j + 1) * 8]
        m = geometry.mask[:, j * 8 : (j + 1) * 8]
        expected = (np.interp(cols, np.arange(w), ramp[0])[None, :] * m).sum() / max(m.sum(), 1e-6)
        if m.sum() > 1:
            assert np.allclose(z[0, :, j][weight[0, :, j] > 0.2].numpy(), expected, atol=0.6)
    assert np.isclose(cell_cover(geometry.mask, CELLS).mean(), geometry.mask.mean(), atol=1e-5)
    constant = truth_channels(7.0, geometry, SIZE)
    assert np.allclose(constant[1], 7.0 * geometry.mask)


def test_training_views_carry_their_plate_positions(toy_reference):
    """The truth of a synthetic training view: its tissue's mean plate position is the view's plate
    (the synthesiser centres the cut there, up to its offset of 0.2 plates), and a tilted cut's
    cells spread over several plates along a plane."""
    from napari_nephi.engines.atlas.plates import Plates
    from napari_nephi.engines.atlas.synthesis import SectionSynthesizer, SynthesisConfig
    from napari_nephi.engines.atlas.train import _view_with_truth

    reference, labels = toy_reference
    config = SynthesisConfig.none()
    config.max_tilt = 10.0
    synth = SectionSynthesizer(Plates.from_reference(reference, labels), config, work_size=60, seed=4)
    spreads = []
    for plate in (8, 20, 31):
        image, truth = _view_with_truth(synth, plate, 48)
        z, _, weight = cell_targets(torch.from_numpy(truth)[None], 6)
        mean = float((z * weight).sum() / weight.sum())
        assert abs(mean - plate) < 0.5, (plate, mean)
        assert image.shape == (48, 48) and truth.shape == (3, 48, 48)
        cells = z[0][weight[0] > 0.5].numpy()
        spreads.append(float(np.ptp(cells)))
    assert max(spreads) > 1.0  # tilted cuts cross plates
