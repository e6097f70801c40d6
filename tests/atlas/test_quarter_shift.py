"""The quarters' plate offsets of the pose search (session 40, opt-in ``rerank_options`` ``quarter_shift``;
engines/atlas/pose_grid.py ``SectionGrid.quarter_offsets``): each quarter of the section's tissue is
compared with the atlas cut at the pose moved along the plate axis, and the best pose of each plate near the
top moves by a share of the quarters' mean best offset (a warped brain's cut is not flat in the atlas).
Off by default, the off state bit for bit as before."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.pose_grid import Pose, SectionGrid, best_offset
from napari_nephi.engines.atlas.rerank import (
    DEFAULTS,
    SECTION_FACTOR,
    PoseSearch,
    _quarter_shift,
    check_rerank_options,
)

from .test_aspects import _pose
from .test_information import _restained
from .test_rerank import search  # noqa: F401 (the fixture)


def test_quarter_offsets_recover_a_known_shift_along_the_plate_axis(search, toy_reference):  # noqa: F811
    reference, labels = toy_reference
    plate = 20
    section = _restained(reference, labels, plate)
    options = check_rerank_options({})
    found = search.search(section, [(p, 0.0) for p in range(search.n)], options)
    best = found.poses[found.ranking[0][0]]
    assert abs(best.z - plate) <= 1.5
    grey, mask, zoom = PoseSearch.prepare(section, SECTION_FACTOR * options["work_size"])
    grid = SectionGrid(grey, mask, options["work_size"], blur=options["edge_blur"])
    atlas = search.atlas(options["work_size"])
    at = Pose(best.score, best.z, best.plate, best.tilt, best.rotation, best.scale / zoom, best.centre)
    offsets, areas = grid.quarter_offsets(atlas, at, 4)
    assert (areas > 0).all() and areas.sum() <= mask.size
    assert abs(float((offsets * areas).sum() / areas.sum())) <= 1.0  # at the truth: no move
    for dz in (-3, 3):  # the same pose 3 plates off: the quarters point back to the truth
        off = Pose(0.0, at.z + dz, at.plate + dz, at.tilt, at.rotation, at.scale, at.centre)
        offsets, areas = grid.quarter_offsets(atlas, off, 4)
        assert float((offsets * areas).sum() / areas.sum()) == pytest.approx(-dz, abs=1.0), dz


def test_best_offset_takes_the_offset_nearest_zero_among_ties():
    offsets = [-2, -1, 0, 1, 2]
    assert best_offset([0.1, 0.3, 0.2, 0.1, 0.0], offsets) == -1.0
    assert best_offset([0.0] * 5, offsets) == 0.0  # a quarter without edges: no move (it was -2, the first)
    assert best_offset([0.5, 0.1, 0.1, 0.1, 0.5], offsets) == -2.0  # a tie away from 0: the first nearest
    assert best_offset([0.1, 0.1, 0.1, 0.5, 0.5 - 1e-9], offsets) == 1.0  # within TIE of the best


class _Quarters:
    """A stand-in grid whose quarters' offsets at a pose are fixed per plate."""

    def __init__(self, values):
        self.values, self.asked = values, []

    def quarter_offsets(self, atlas, pose, reach):
        self.asked.append((pose.plate, reach))
        offsets, areas = self.values[pose.plate]
        return np.array(offsets, float), np.array(areas, float)


def test_the_best_pose_of_each_plate_near_the_top_moves_by_the_share_of_the_weighted_mean():
    poses = [_pose(0.50, 10.0), _pose(0.49, 10.2), _pose(0.48, 14.0), _pose(0.40, 30.0), _pose(0.47, 36.0)]
    prior = np.zeros(40)
    prior[36] = 0.05  # 0.47 less 0.05: outside the margin of 0.05
    grid = _Quarters(
        {
            10: ([4, 4, 0, 0], [10, 10, 20, 0]),  # weighted mean 2 (the empty quarter does not count)
            14: ([-4, -4, -4, -4], [5, 5, 5, 5]),
            30: ([4, 4, 4, 4], [5, 5, 5, 5]),
            36: ([4, 4, 4, 4], [5, 5, 5, 5]),
        }
    )
    _quarter_shift(
        poses, prior, grid, None, {"quarter_shift": 0.5, "quarter_margin": 0.05, "quarter_reach": 3}, 40
    )
    assert sorted(grid.asked) == [(10, 3), (14, 3)]  # one pose per plate, only within the margin
    assert [p.z for p in poses] == pytest.approx([11.0, 10.2, 12.0, 30.0, 36.0])
    assert [p.plate for p in poses] == [11, 10, 12, 30, 36]
    assert [p.shifted for p in poses] == [1.0, None, -2.0, None, None]
    assert [p.score for p in poses] == pytest.approx([0.50, 0.49, 0.48, 0.40, 0.47])  # scores kept
    edge = [_pose(0.5, 0.5)]
    _quarter_shift(
        edge,
        np.zeros(40),
        _Quarters({0: ([-4] * 4, [5] * 4)}),
        None,
        {"quarter_shift": 1.0, "quarter_margin": 0.05, "quarter_reach": 4},
        40,
    )
    assert edge[0].z == 0.0 and edge[0].plate == 0  # never beyond the atlas


def test_off_by_default_and_the_off_state_is_the_search_as_before(search, toy_reference):  # noqa: F811
    assert DEFAULTS["quarter_shift"] == 0.0
    reference, labels = toy_reference
    section = _restained(reference, labels, 24, seed=1)
    order = [(p, 0.0) for p in range(search.n)]
    default = search.search(
        section, order, check_rerank_options({"tilt_share": None})
    )  # as pinned (before 44)
    # the defaults' search as at 8008ee3, before the option (review 1 of session 40, C3; recorded there with
    # this toy atlas, section and order: /tmp/s40/C/pin.py on that commit's src and on this one agree)
    assert [p for p, _ in default.ranking[:10]] == [24, 23, 25, 22, 26, 21, 27, 20, 28, 19]
    assert default.pairs == 1677
    assert default.ranking[0][1] == pytest.approx(0.537109285593, abs=1e-9)
    idle = search.search(
        section, order, check_rerank_options({"quarter_margin": 0.5, "quarter_reach": 8, "tilt_share": None})
    )
    assert idle.ranking == default.ranking and idle.pairs == default.pairs
    assert all(p.shifted is None for p in default.poses.values())
    on = search.search(section, order, check_rerank_options({"quarter_shift": 0.5, "tilt_share": None}))
    moved = [p for p in on.poses.values() if p.shifted is not None]
    assert moved and all(abs(p.shifted) <= 0.5 * 4 for p in moved)
    assert on.options["quarter_shift"] == 0.5 and on.options["quarter_reach"] == 4
    assert default.quarter_moved == idle.quarter_moved == 0
    assert on.quarter_moved >= len(moved)  # poses moved onto one plate: on.poses keeps one of them


def test_on_a_list_of_plates_nothing_moves_and_the_result_says_so(toy_reference):
    """A flat atlas (a list of 2D plates, no volume) has no plate axis to cut along: the option is
    recorded as asked but moves nothing, and ``quarter_moved`` is 0 (review 2 of session 40, C-2)."""
    reference, labels = toy_reference
    flat = PoseSearch(Plates.from_reference([reference[i] for i in range(0, reference.shape[0], 2)]))
    assert not flat.is_volume
    section = _restained(reference, labels, 24, seed=1)
    order = [(p, 0.0) for p in range(flat.n)]
    on = flat.search(section, order, check_rerank_options({"quarter_shift": 0.5, "tilt_share": None}))
    assert on.options["quarter_shift"] == 0.5
    assert on.quarter_moved == 0 and all(p.shifted is None for p in on.poses.values())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"quarter_shift": -0.1}, "quarter_shift"),
        ({"quarter_shift": 1.5}, "quarter_shift"),
        ({"quarter_margin": 2.0}, "quarter_margin"),
        ({"quarter_reach": 0}, "quarter_reach"),
        ({"quarter_reach": "four"}, "quarter_reach"),
    ],
)
def test_bad_quarter_options_raise(options, match):
    with pytest.raises(InputError, match=match):
        check_rerank_options(options)
