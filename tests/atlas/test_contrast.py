"""Contrast matching and the edge-agreement judge of the deformable step (engines/atlas/contrast.py)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_nephi.engines.atlas.contrast import edge_agreement, match_contrast


def _regions(shape=(64, 72), seed=0) -> np.ndarray:
    """Integer regions 1..4: a disk, a ring round it, a band, and the rest of an ellipse (0 outside)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    cy, cx = shape[0] / 2, shape[1] / 2
    r = np.hypot((yy - cy) / (0.42 * shape[0]), (xx - cx) / (0.42 * shape[1]))
    out = np.where(r < 1.0, 4, 0)
    out[(r < 1.0) & (np.abs(yy - cy - 10) < 4)] = 3
    inner = np.hypot(yy - cy + 3, xx - cx - 5)
    out[inner < 14] = 2
    out[inner < 7] = 1
    return out


def test_match_contrast_maps_region_levels_to_the_section():
    regions = _regions()
    plate_levels = np.array([0.0, 0.9, 0.6, 0.35, 0.75], np.float32)  # Nissl-like
    section_levels = np.array([0.0, 0.15, 0.8, 0.95, 0.4], np.float32)  # redrawn, partly inverted
    plate, section = plate_levels[regions], section_levels[regions]
    tissue = regions > 0
    before = plate.copy()
    matched = match_contrast(plate, section, tissue)
    np.testing.assert_array_equal(plate, before)  # the input is not modified
    for v in range(1, 5):
        assert abs(np.median(matched[regions == v]) - section_levels[v]) < 0.03, v
    # unmatched, the plate correlates badly with the section; matched, closely
    assert np.corrcoef(plate[tissue], section[tissue])[0, 1] < 0.2
    assert np.corrcoef(matched[tissue], section[tissue])[0, 1] > 0.98


def test_match_contrast_with_no_overlap_returns_the_plate():
    plate = np.random.default_rng(0).uniform(size=(32, 32)).astype(np.float32)
    out = match_contrast(plate, 1 - plate, np.zeros((32, 32), bool))
    np.testing.assert_array_equal(out, plate)
    assert out is not plate


def test_edge_agreement_ignores_polarity_and_drops_when_misaligned():
    regions = _regions()
    rng = np.random.default_rng(1)
    a = ndi.gaussian_filter(np.array([0.0, 0.9, 0.6, 0.35, 0.75])[regions], 0.7)
    a = a + rng.normal(0, 0.01, a.shape)
    remapped = ndi.gaussian_filter(np.array([0.0, 0.15, 0.8, 0.95, 0.4])[regions], 0.7)
    tissue = ndi.binary_dilation(regions > 0, iterations=2)
    same = edge_agreement(a, a, tissue)
    assert 0.0 < same <= 1.0
    assert edge_agreement(a, 1.0 - a, tissue) == same  # squared cosine: an inverted stain scores the same
    aligned = edge_agreement(remapped, a, tissue)
    shifted = edge_agreement(np.roll(remapped, (3, -2), axis=(0, 1)), a, tissue)
    assert aligned > shifted + 0.1
    # against a direct computation with numpy's gradient on the same smoothed images
    ga = np.stack(np.gradient(ndi.gaussian_filter(a, 1.0)))
    gb = np.stack(np.gradient(ndi.gaussian_filter(remapped, 1.0)))
    na, nb = (ga**2).sum(0), (gb**2).sum(0)
    ea, eb = 0.25 * np.median(na[tissue]), 0.25 * np.median(nb[tissue])
    direct = np.mean(((ga * gb).sum(0) ** 2 / ((na + ea) * (nb + eb)))[tissue])
    assert abs(aligned - direct) < 0.05
    assert np.isnan(edge_agreement(a, a, np.zeros_like(tissue)))
