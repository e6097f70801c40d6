"""Routing (session 32, rerank ``route_gap`` / ``route_agree``, opt-in): where stage 1 places the
section clearly (its best start scores at least ``route_gap`` above every stage-1 pose more than
``ROUTE_REACH`` plates away), stage 2 refines that start alone, with one pose scanned along the plate
axis."""

from __future__ import annotations

import pytest

from napari_nephi.engines.atlas import rerank
from napari_nephi.engines.atlas.rerank import check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas


@pytest.fixture(scope="module")
def search(toy_pose_search):
    return toy_pose_search


@pytest.fixture(scope="module")
def tilted(search, toy_reference):
    """The toy atlas cut at plate 26 tilted by 6 degrees: (section, order, the defaults' result). Stage 1's
    best start (plate 26) scores 0.14 above every stage-1 pose more than 3 plates away."""
    reference, _ = toy_reference
    section = section_from_atlas(reference, 26, (6.0, 0.0))
    order = sorted([(p, 0.01 * abs(p - 26)) for p in range(search.n)], key=lambda e: e[1])
    return section, order, search.search(section, order, check_rerank_options({}))


def test_a_clear_section_is_routed_to_its_best_start_alone(search, tilted):
    """Stage 1 places the tilted cut clearly: routed, the defaults' best pose (tilt, plate), score and
    first plates from fewer pairs (one start of stage 2 instead of four; stage 1 is the same)."""
    section, order, full = tilted
    assert not full.routed and full.options["route_gap"] is None
    routed = search.search(section, order, check_rerank_options({"route_gap": 0.05}))
    assert routed.routed and routed.options["route_gap"] == 0.05
    best, best_full = routed.poses[routed.ranking[0][0]], full.poses[full.ranking[0][0]]
    assert (best.tilt, best.plate) == (best_full.tilt, best_full.plate) == ((6.0, 0.0), 26)
    assert best.score == pytest.approx(best_full.score, abs=1e-6)
    assert [p for p, _ in routed.ranking[:4]] == [p for p, _ in full.ranking[:4]]
    assert routed.pairs < full.pairs - 100


def test_a_section_stage1_does_not_place_clearly_gets_the_full_search(search, tilted):
    """A gap no stage-1 start reaches, or a first stage whose best plate lies far from stage 1's best
    start (``route_agree``): not routed, the defaults' ranking and pairs exactly."""
    section, order, full = tilted
    for options, first_stage in (
        ({"route_gap": 0.2}, order),
        ({"route_gap": 0.0, "route_agree": 2}, sorted(order, key=lambda e: abs(e[0] - 5))),
    ):
        result = search.search(section, first_stage, check_rerank_options(options))
        assert not result.routed
        if first_stage is order:
            assert [p for p, _ in result.ranking] == [p for p, _ in full.ranking]
            assert result.pairs == full.pairs
    agreeing = search.search(section, order, check_rerank_options({"route_gap": 0.0, "route_agree": 2}))
    assert agreeing.routed


def _pose(z, score):
    from napari_nephi.engines.atlas.pose_grid import Pose

    return Pose(score=score, z=float(z), plate=z, tilt=(0.0, 0.0), rotation=0.0, scale=1.0, centre=(0.0, 0.0))


def test_route_signal_counts_only_poses_beyond_the_reach():
    """``_route``: the best start against the best stage-1 pose more than ROUTE_REACH plates away."""
    first = [_pose(10, 0.5), _pose(11, 0.49), _pose(10 + rerank.ROUTE_REACH, 0.48), _pose(20, 0.44)]
    options = check_rerank_options({"route_gap": 0.05})
    assert rerank._route(first, [first[0], first[3]], [(10, 0.0)], options) is first[0]  # 0.06 above 20
    first.append(_pose(10 - rerank.ROUTE_REACH - 1, 0.46))
    assert rerank._route(first, [first[0], first[4]], [(10, 0.0)], options) is None  # only 0.04 above
    agree = check_rerank_options({"route_gap": 0.0, "route_agree": 1})
    assert rerank._route(first, [first[0]], [(11, 0.0)], agree) is first[0]
    assert rerank._route(first, [first[0]], [(12, 0.0)], agree) is None


def test_route_needs_a_far_pose_and_keeps_the_best_start():
    """Review 1 of session 32: no stage-1 pose beyond the reach (a search without a sweep) is no
    evidence of a gap, so not routed (C1); the start kept is the best of the starts, which
    ``dense_mode`` "add" does not keep in score order (C2)."""
    options = check_rerank_options({"route_gap": 0.05})
    near = [_pose(10, 0.5), _pose(12, 0.3), _pose(8, 0.2)]
    assert rerank._route(near, near[:1], [(10, 0.0)], options) is None
    first = [_pose(10, 0.5), _pose(30, 0.3), _pose(40, 0.62), _pose(42, 0.55)]
    assert rerank._route(first, [first[0], first[1], first[2]], [(10, 0.0)], options) is first[2]


@pytest.mark.parametrize(
    "options, name",
    [
        ({"route_gap": -0.1}, "route_gap"),
        ({"route_gap": "a"}, "route_gap"),
        ({"route_gap": 0.05, "route_agree": -1}, "route_agree"),
        ({"route_agree": 2}, "route_agree"),  # without route_gap it would do nothing (review 1, C3)
    ],
)
def test_bad_route_options_raise(options, name):
    from napari_nephi import InputError

    with pytest.raises(InputError, match=name):
        check_rerank_options(options)
