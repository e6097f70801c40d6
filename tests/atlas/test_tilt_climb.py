"""Stage 2 with fewer pairs (session 31): the joint tilt grid climbed from the untilted best (rerank
``tilt_climb``: the grid's tilts one step around the best so far until none is better, instead of
every pitch x yaw), the finer grid only near the best (``finer_margin``) and the untilted step in
two passes (``untilted_prune``)."""

from __future__ import annotations

import types

import pytest

from napari_nephi.engines.atlas.rerank import _Refine, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas

ANGLES = [0.0, -12.0, -6.0, 6.0, 12.0]  # the default grid: max_tilt 12, tilt_step 6
#: the options of stage 2 before session 31: every finer grid, every rotation of the untilted step
# the regions term (opt-in, session 35) pinned off: its gain is counted from the least of the plates near
# the best, so a search that scores fewer poses shifts the best pose's score by a few thousandths
BEFORE = {"finer_margin": None, "untilted_prune": None, "region_weight": 0.0, "tilt_share": None}


def _climb(landscape):
    """``_Refine._climb`` on a score ``landscape(pitch, yaw)``: (the pose it returns, the tilts cut)."""
    asked: list[tuple[float, float]] = []

    def score(pairs):
        found = [types.SimpleNamespace(tilt=t, score=landscape(*t)) for t in pairs]
        return max(found, key=lambda p: p.score)

    def cuts(tilts):
        asked.extend(tilts)
        return list(tilts)

    fake = types.SimpleNamespace(options={"tilt_step": 6.0}, _score=score)
    best = types.SimpleNamespace(tilt=(0.0, 0.0), score=landscape(0.0, 0.0))
    return _Refine._climb(fake, best, ANGLES, cuts), asked


def test_climb_reaches_a_corner_peak_cutting_fewer_tilts():
    """A single peak at the grid's corner (12, -12): reached in two steps, each tilt cut once."""
    top, asked = _climb(lambda p, y: -((p - 12.0) ** 2) - (y + 12.0) ** 2)
    assert top.tilt == (12.0, -12.0)
    assert len(asked) == len(set(asked)) == 8 + 5 < 24  # the ring, then the new tilts around (6, -6)
    assert (0.0, 0.0) not in asked


def test_climb_stops_where_no_tilt_beats_the_untilted_best():
    top, asked = _climb(lambda p, y: -(p**2) - y**2)
    assert top.tilt == (0.0, 0.0) and len(asked) == 8


def test_climb_stops_at_a_local_peak():
    """What it gives up against the whole grid: a second, higher peak beyond a dip is not reached."""
    top, asked = _climb(lambda p, y: 1.0 if (p, y) == (-12.0, 0.0) else -((p - 6.0) ** 2) - y**2)
    assert top.tilt == (6.0, 0.0) and (-12.0, 0.0) not in asked


@pytest.fixture(scope="module")
def search(toy_pose_search):
    return toy_pose_search


@pytest.fixture(scope="module")
def tilted(search, toy_reference):
    """The toy atlas cut at plate 20 tilted by (12, 6) degrees: (section, order, the result of
    :data:`BEFORE`)."""
    reference, _ = toy_reference
    section = section_from_atlas(reference, 20, (12.0, 6.0))
    order = sorted([(p, 0.01 * abs(p - 20)) for p in range(search.n)], key=lambda e: e[1])
    return section, order, search.search(section, order, check_rerank_options(BEFORE))


def _same_best(result, full):
    """The same best pose (tilt, rotation, plate, score) and first five plates as ``full``."""
    best, best_full = result.poses[result.ranking[0][0]], full.poses[full.ranking[0][0]]
    assert (best.tilt, best.rotation, best.plate) == (best_full.tilt, best_full.rotation, best_full.plate)
    assert best.score == pytest.approx(best_full.score, abs=1e-6)
    assert [p for p, _ in result.ranking[:5]] == [p for p, _ in full.ranking[:5]]


def test_climb_finds_the_grids_tilt_with_fewer_pairs(search, tilted):
    """The climb finds the full grid's best pose (its tilt (12, 6), plate and score) and the same
    first plates, from fewer pairs."""
    section, order, full = tilted
    climb = search.search(section, order, check_rerank_options({**BEFORE, "tilt_climb": True}))
    assert climb.options["tilt_climb"] and not full.options["tilt_climb"]
    assert full.poses[full.ranking[0][0]].tilt == (12.0, 6.0)
    _same_best(climb, full)
    assert climb.pairs < full.pairs - 20  # about 10 tilts fewer per hypothesis


def test_finer_grid_only_near_the_best(search, tilted):
    """``finer_margin``: hypotheses far below the best pose after the joint grid get no finer grid:
    the same best pose and first plates here, from fewer pairs."""
    section, order, full = tilted
    near = search.search(section, order, check_rerank_options({**BEFORE, "finer_margin": 0.08}))
    assert full.options["finer_margin"] is None and near.options["finer_margin"] == 0.08
    _same_best(near, full)
    assert near.pairs < full.pairs - 40


def test_untilted_step_in_two_passes_keeps_the_ranking(search, tilted):
    """``untilted_prune``: stage 2's untilted step scores every cut at the hypothesis's rotation, the
    other rotations only on cuts near the best of those: the same ranking here, from fewer pairs; a
    margin of 2 scores every rotation of every cut (the pairs of the search before session 31)."""
    section, order, full = tilted
    pruned = search.search(section, order, check_rerank_options({**BEFORE, "untilted_prune": 0.05}))
    every = search.search(section, order, check_rerank_options({**BEFORE, "untilted_prune": 2.0}))
    assert full.options["untilted_prune"] is None and pruned.options["untilted_prune"] == 0.05
    assert [p for p, _ in pruned.ranking] == [p for p, _ in full.ranking]
    _same_best(pruned, full)
    assert pruned.pairs < full.pairs == every.pairs


def test_the_defaults_score_fewer_pairs_with_the_same_ranking(search, tilted):
    """Since session 31 the defaults are ``finer_margin`` 0.08 and ``untilted_prune`` 0.05: with no
    options, the ranking of the search before (both None) from fewer pairs (``tilt_share``, session 44's
    default, left out: it shares tilts between hypotheses, a change of its own, test_tilt_share.py)."""
    section, order, full = tilted
    options = check_rerank_options({"tilt_share": None})
    assert (options["finer_margin"], options["untilted_prune"]) == (0.08, 0.05)
    now = search.search(section, order, {**options, "region_weight": 0.0})
    assert [p for p, _ in now.ranking] == [p for p, _ in full.ranking]
    _same_best(now, full)
    assert now.pairs < full.pairs - 60


def test_tilt_climb_needs_the_joint_search():
    from napari_nephi import InputError

    with pytest.raises(InputError, match="tilt_climb"):
        check_rerank_options({"tilt_climb": True, "tilt_search": "sequential"})


@pytest.mark.parametrize(
    "options, name",
    [
        ({"tilt_climb": "yes"}, "tilt_climb"),
        ({"finer_margin": -1}, "finer_margin"),
        ({"untilted_prune": "a"}, "untilted_prune"),
    ],
)
def test_bad_stage2_options_raise(options, name):
    from napari_nephi import InputError

    with pytest.raises(InputError, match=name):
        check_rerank_options(options)
