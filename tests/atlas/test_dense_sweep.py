"""A denser stage-1 sweep where stage 1's starts outscore the shortlist (rerank ``dense_sweep``,
``dense_outside``; session 29), on the toy atlas (40 plates; the default sweep scores every 6th
plate from 3: 3, 9, ..., 33, 39, so plate 36 lies 3 plates from every swept plate)."""

from __future__ import annotations

import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.rerank import FAST, SEEDED, PoseSearch, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas

#: The truth: 3 plates from each plate of the default sweep, far from the first stage's plates.
PLATE = 36


@pytest.fixture(scope="module")
def search(toy_reference):
    reference, labels = toy_reference
    return PoseSearch(Plates.from_reference(reference, labels))


def _far_order(n: int) -> list[tuple[int, float]]:
    """A first stage pointing at plates 0-11 (the shortlist and its neighbours: plates 0-14)."""
    return [(p, 0.01 * p) for p in range(n)]


def test_the_denser_sweep_runs_where_the_sweep_outscored_the_shortlist_and_finds_the_plate(
    search, toy_reference
):
    reference, _ = toy_reference
    # 45 % of the left cut away: session 28's toy case, ranked 36th with the sweep of every 6th plate
    section = section_from_atlas(reference, PLATE, 0.0, crop=(0.0, 0.0, 0.45, 0.0))
    order = _far_order(search.n)
    # an untilted section: no tilt search, no scan (a faster test); the sweep as in session 29 (session 34's
    # sweep_refine would find the plate without the denser sweep)
    fast = {"max_tilt": 0.0, "z_scan": 0, "sweep_refine": 0}
    plain = search.search(section, order, check_rerank_options(fast))
    assert not plain.densified and abs(plain.ranking[0][0] - PLATE) > 1  # no start near plate 36
    for mode in ("add", "replace"):
        dense = search.search(
            section, order, check_rerank_options({**fast, "dense_sweep": 3, "dense_mode": mode})
        )
        assert dense.densified and dense.pairs > plain.pairs
        # "add": the default starts include plate 39 (stage 1 0.37), 2 plates from the new plate 37
        # (0.50): a start only blocks a new one that it outscores, so 37 gets its start (session 29)
        assert abs(dense.ranking[0][0] - PLATE) <= 1, (mode, dense.ranking[:5])
        assert dense.options["dense_mode"] == mode  # recorded: rerank_options=result.options repeats it


def test_no_denser_sweep_where_every_start_lies_in_the_shortlist(search, toy_reference):
    reference, _ = toy_reference
    plate = 20
    section = section_from_atlas(reference, plate)
    order = sorted(_far_order(search.n), key=lambda e: abs(e[0] - plate))  # the embedding right
    # the one start: the shortlist's best; untilted, no scan (a faster test)
    opts = {"shortlist": 12, "neighbours": 3, "hypotheses": 1, "max_tilt": 0.0, "z_scan": 0}
    plain = search.search(section, order, check_rerank_options(opts))
    dense = search.search(section, order, check_rerank_options({**opts, "dense_sweep": 3}))
    assert not dense.densified
    assert dense.ranking == plain.ranking and dense.pairs == plain.pairs


def test_the_presets_leave_the_denser_sweep_off():
    assert check_rerank_options(SEEDED)["dense_sweep"] == 0
    assert check_rerank_options(FAST)["dense_sweep"] == 0


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dense_sweep": -1}, "dense_sweep"),
        ({"dense_outside": 0}, "dense_outside"),
        # review 1 of session 29, C1: not a denser sweep, or one that could never fire
        ({"dense_sweep": 6}, "smaller than sweep_step"),
        ({"dense_sweep": 12}, "smaller than sweep_step"),
        ({"dense_sweep": 3, "sweep_step": 0}, "without a sweep"),
        ({"dense_mode": "more"}, "dense_mode"),
        ({"dense_starts": 0}, "dense_starts"),
    ],
)
def test_bad_dense_options_raise(options, match):
    with pytest.raises(InputError, match=match):
        check_rerank_options(options)
