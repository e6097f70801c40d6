"""The information term of the pose search (engines/atlas/pose_grid.py ``information``, rerank.py
``information_weight``; session 24): the mutual information of the section's intensities and the
atlas's at a pose, which tells regions apart by how their levels go together whatever the stain maps
them to, where the edge field only compares where boundaries run."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas.pose_grid import Pose, SectionGrid, information
from napari_nephi.engines.atlas.rerank import (
    SECTION_FACTOR,
    PoseSearch,
    _inform,
    _rank,
    check_rerank_options,
)

from .test_rerank import search  # noqa: F401 (the fixture)


def test_information_is_blind_to_remapped_levels_and_zero_for_unrelated_ones():
    rng = np.random.default_rng(0)
    regions = rng.integers(0, 6, 4000)
    atlas = np.array([0.1, 0.3, 0.45, 0.6, 0.8, 0.95])[regions] + rng.normal(0, 0.01, regions.size)
    stain = np.array([0.7, 0.2, 0.9, 0.05, 0.5, 0.35])[regions] + rng.normal(0, 0.01, regions.size)
    same = information(atlas, atlas)
    assert information(atlas, stain) > 0.8 * same > 0.5  # six regions: up to log 6 = 1.79 nats
    assert information(atlas, 1.0 - stain) == pytest.approx(information(atlas, stain), abs=1e-3)
    assert information(atlas, rng.permutation(stain)) < 0.05
    assert information(atlas, np.full(regions.size, 0.3)) == 0.0  # a constant sample


def _restained(reference, labels, plate, seed=0):
    """Plate ``plate`` of the toy atlas with each region's level drawn anew (bright background)."""
    lab = labels[plate]
    levels = np.random.default_rng(seed).uniform(0.1, 0.9, int(labels.max()) + 1)
    section = np.where(lab > 0, levels[lab], 1.0)
    section = section + 0.1 * (reference[plate] / reference.max() - 0.5) * (lab > 0)
    return section.astype(np.float32)


def test_information_is_highest_at_the_true_plate_of_a_restained_section(search, toy_reference):  # noqa: F811
    reference, labels = toy_reference
    plate = 20
    section = _restained(reference, labels, plate)
    options = check_rerank_options({})
    order = [(p, 0.0) for p in range(search.n)]
    found = search.search(section, order, options)
    best = found.poses[found.ranking[0][0]]
    assert abs(best.z - plate) <= 1.5
    grey, mask, zoom = PoseSearch.prepare(section, SECTION_FACTOR * options["work_size"])
    grid = SectionGrid(grey, mask, options["work_size"])
    atlas = search.atlas(options["work_size"])
    pose = Pose(best.score, best.z, best.plate, best.tilt, best.rotation, best.scale / zoom, best.centre)
    here = grid.information(atlas, pose)
    for dz in (-8, 8):
        away = Pose(0.0, best.z + dz, best.plate + dz, best.tilt, best.rotation, pose.scale, best.centre)
        assert here > grid.information(atlas, away) + 0.05, dz


class _Levels:
    """A stand-in grid whose information at a pose is a fixed value per plate."""

    def __init__(self, values):
        self.values, self.asked = values, []

    def information(self, atlas, pose):
        self.asked.append(pose.plate)
        return self.values[pose.plate]


def _pose(score, z, plain=None):
    return Pose(score, z, round(z), (0.0, 0.0), 0.0, 1.0, (0.0, 0.0), plain=score if plain is None else plain)


def test_information_moves_only_the_plates_within_the_margin_over_the_least_of_them():
    poses = [_pose(0.50, 10.0), _pose(0.49, 10.2), _pose(0.48, 14.0), _pose(0.40, 30.0), _pose(0.47, 36.0)]
    prior = np.zeros(40)
    prior[36] = 0.05  # 0.47 less 0.05: outside the margin of 0.05
    grid = _Levels({10: 0.2, 14: 0.5, 30: 0.9, 36: 0.9})
    before = _rank([_pose(p.score, p.z) for p in poses], [(p, 0.0) for p in range(40)], 0.005, 0, 40, prior)
    assert before.ranking[0][0] == 10
    _inform(poses, prior, grid, None, {"information_weight": 0.1, "information_margin": 0.05})
    assert sorted(grid.asked) == [10, 14]  # one pose per plate, only within the margin
    # plate 10 holds the least information: unchanged; plate 14 gains 0.1 * (0.5 - 0.2)
    assert [p.score for p in poses] == pytest.approx([0.50, 0.49, 0.51, 0.40, 0.47])
    assert [p.plain for p in poses] == pytest.approx([0.50, 0.49, 0.48, 0.40, 0.47])  # edges alone
    assert [p.info for p in poses] == [0.2, None, 0.5, None, None]
    after = _rank(poses, [(p, 0.0) for p in range(40)], 0.005, 0, 40, prior)
    assert after.ranking[0][0] == 14


def test_the_search_records_the_information_it_counted(search, toy_reference):  # noqa: F811
    reference, labels = toy_reference
    section = _restained(reference, labels, 24, seed=1)
    order = [(p, 0.0) for p in range(search.n)]
    # the regions term (opt-in, session 35) pinned off: it would move other plates in each search
    off = search.search(
        section, order, check_rerank_options({"information_weight": 0.0, "region_weight": 0.0})
    )
    on = search.search(
        section, order, check_rerank_options({"information_weight": 0.2, "region_weight": 0.0})
    )
    assert all(p.info is None for p in off.poses.values())
    measured = [p for p in on.poses.values() if p.info is not None]
    assert measured and all(p.info >= 0 for p in measured)
    best = max(p.score for p in off.poses.values())
    # within the margin of the best pose (no prior here), and never lower than without the term
    assert all(off.poses[p.plate].score >= best - 0.05 - 1e-9 for p in measured)
    assert all(on.poses[q].score >= off.poses[q].score - 1e-9 for q in off.poses)
    assert on.options["information_weight"] == 0.2


@pytest.mark.parametrize(
    "options, match",
    [
        ({"information_weight": -0.1}, "information_weight"),
        ({"information_margin": 1.5}, "information_margin"),
        ({"information_weight": "a lot"}, "information_weight"),
    ],
)
def test_bad_information_options_raise(options, match):
    with pytest.raises(InputError, match=match):
        check_rerank_options(options)
