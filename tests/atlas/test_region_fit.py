"""Correlation ratio of a section given the atlas's regions (engines/atlas/region_fit.py), CPU."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.pose_grid import Pose
from napari_nephi.engines.atlas.region_fit import (
    LEVELS,
    RegionAtlas,
    SectionSamples,
    correlation_ratio,
    pose_points,
    refine,
)
from napari_nephi.engines.atlas.rerank import PoseSearch, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas


def _direct(values: np.ndarray, groups: np.ndarray) -> float:
    """Adjusted correlation ratio times the share off group 0, pixel by pixel (no bincount)."""
    n = values.size
    total = ((values - values.mean()) ** 2).sum()
    within = 0.0
    present = 0
    for k in np.unique(groups):
        v = values[groups == k]
        within += ((v - v.mean()) ** 2).sum()
        present += 1
    adjusted = 1.0 - (within / (n - present)) / (total / (n - 1))
    return adjusted * np.mean(groups != 0)


def test_correlation_ratio_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    values = rng.normal(size=400)
    groups = rng.integers(0, 7, size=(3, 400))
    groups[1] = np.where(values > 0.5, 3, groups[1])  # a row that explains part of the values
    got = correlation_ratio(values, groups, 7)
    want = [_direct(values, g) for g in groups]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert got[1] > got[0] + 0.1  # the explaining grouping scores higher


def test_correlation_ratio_is_invariant_to_a_per_region_restaining():
    rng = np.random.default_rng(1)
    truth = rng.integers(1, 6, size=2000)
    wrong = np.roll(truth, 37)  # the same groups, misplaced
    noise = 0.02 * rng.normal(size=truth.size)
    nissl = np.array([0.0, 0.3, 0.5, 0.6, 0.8, 0.9])[truth] + noise
    fluor = np.array([0.0, 0.9, 0.1, 0.7, 0.2, 0.4])[truth] + noise  # levels redrawn, inverted
    for stain in (nissl, fluor, 1.0 - nissl):
        right, off = correlation_ratio(stain, np.stack([truth, wrong]), 6)
        assert right > 0.97, right
        assert off < 0.1, off
    # groups on the atlas's background (0) lower the score by their share
    half_out = np.where(np.arange(truth.size) < 500, 0, truth)
    assert correlation_ratio(nissl, half_out[None], 6)[0] < 0.76


def test_region_atlas_without_annotation_uses_intensity_levels(toy_reference):
    reference, labels = toy_reference
    with_labels = RegionAtlas(Plates.from_reference(reference, labels))
    levels = RegionAtlas(Plates.from_reference(reference))
    assert with_labels.groups_count == np.unique(labels).size + 1
    assert levels.groups_count == LEVELS + 1
    z, y, x = 20, 32, 32
    points = np.array([[z, y, x], [z, -5, x], [200, y, x]], dtype=float)
    assert with_labels.lookup(points).tolist()[1:] == [0, 0]  # outside the atlas
    assert with_labels.lookup(points)[0] > 0 and levels.lookup(points)[0] > 0
    # a straight plate's tissue pixels fall into several intensity levels
    assert np.unique(levels.volume[z][levels.volume[z] > 0]).size >= 4


def test_refine_moves_a_displaced_pose_back_to_the_truth(toy_reference):
    reference, labels = toy_reference
    plate = 22
    section = section_from_atlas(reference, plate)
    regions = RegionAtlas(Plates.from_reference(reference, labels))
    grey, mask, _ = PoseSearch.prepare(section, 128)
    centre = np.argwhere(mask).mean(axis=0)
    samples = SectionSamples(grey, mask, centre)
    zoom = max(section.shape) / max(grey.shape)  # section pixels per grey pixel
    truth = Pose(0.0, plate, plate, (0.0, 0.0), 0.0, 1.0 / zoom, tuple(centre * zoom))
    start = Pose(0.0, plate - 1.6, plate - 2, (4.0, 0.0), 4.0, 1.08 / zoom, tuple(centre * zoom + 2.0))
    points = pose_points(samples, np.array([[plate, 0, 0, 0, np.log(1 / zoom), *truth.centre]]))
    # the true pose maps the samples onto their own positions in the plate (a direct check)
    assert np.allclose(points[0, :, 0], plate)
    assert np.allclose(points[0, :, 1:], samples.offsets * zoom + centre * zoom, atol=1e-6)
    found = refine(regions, samples, start, max_tilt=12.0, max_rotation=15.0)
    before = refine(regions, samples, start, 12.0, 15.0, free_z=False)
    assert abs(found.z - plate) <= 1.0, found
    assert abs(found.rotation) <= 2.0 and abs(found.scale * zoom - 1.0) < 0.06, found
    assert found.score > before.score  # freeing z helped


@pytest.mark.parametrize("annotated", [True, False])
def test_search_with_region_refinement_ranks_the_true_plate_near_the_top(toy_reference, annotated):
    reference, labels = toy_reference
    plate = 18
    search = PoseSearch(Plates.from_reference(reference, labels if annotated else None))
    section = section_from_atlas(reference, plate, (6.0, 0.0))
    order = [(p, float(abs(p - plate))) for p in range(search.n)]
    order.sort(key=lambda t: (t[1], t[0]))
    opts = check_rerank_options({"shortlist": 3, "neighbours": 1, "sweep_step": 0, "region_refine": 2})
    result = search.search(section, order, opts)
    assert abs(result.ranking[0][0] - plate) <= 1, result.ranking[:5]
    assert 0.0 < 1.0 - result.ranking[0][1] <= 1.0  # the distance is 1 - the correlation ratio
