"""The joint tilt grid climbed from the untilted best (rerank ``tilt_climb``, session 31): the grid's
tilts one step around the best so far until none is better, instead of every pitch x yaw."""

from __future__ import annotations

import types

import pytest

from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.rerank import PoseSearch, _Refine, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas

ANGLES = [0.0, -12.0, -6.0, 6.0, 12.0]  # the default grid: max_tilt 12, tilt_step 6


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
def search(toy_reference):
    reference, labels = toy_reference
    return PoseSearch(Plates.from_reference(reference, labels))


def test_climb_finds_the_grids_tilt_with_fewer_pairs(search, toy_reference):
    """A section of the toy atlas tilted by (12, 6) degrees: the climb finds the full grid's best pose
    (its tilt, plate and score) and the same ranking, from fewer pairs."""
    reference, _ = toy_reference
    section = section_from_atlas(reference, 20, (12.0, 6.0))
    order = sorted([(p, 0.01 * abs(p - 20)) for p in range(search.n)], key=lambda e: e[1])
    full = search.search(section, order, check_rerank_options({}))
    climb = search.search(section, order, check_rerank_options({"tilt_climb": True}))
    assert climb.options["tilt_climb"] and not full.options["tilt_climb"]
    best_full, best_climb = full.poses[full.ranking[0][0]], climb.poses[climb.ranking[0][0]]
    assert best_climb.tilt == best_full.tilt == (12.0, 6.0)
    assert best_climb.score == pytest.approx(best_full.score, abs=1e-6)
    assert [p for p, _ in climb.ranking[:5]] == [p for p, _ in full.ranking[:5]]
    assert climb.pairs < full.pairs - 20  # about 10 tilts fewer per hypothesis


def test_tilt_climb_must_be_a_bool():
    from napari_nephi import InputError

    with pytest.raises(InputError, match="tilt_climb"):
        check_rerank_options({"tilt_climb": "yes"})
