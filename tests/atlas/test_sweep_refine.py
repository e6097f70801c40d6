"""Stage 1 on the neighbours of the best swept plates outside the shortlist (rerank ``sweep_refine``,
``sweep_outside``; session 34, default 4 and 2), on the toy atlas (40 plates; the default sweep scores
every 6th plate from 3: 3, 9, ..., 33, 39, so plate 36 lies 3 plates from every swept plate)."""

from __future__ import annotations

import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas import rerank
from napari_nephi.engines.atlas.rerank import check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas

#: The truth: 3 plates from each plate of the default sweep, far from the first stage's plates.
PLATE = 36
#: An untilted section: no tilt search, no scan along the plates (a faster test)
FAST = {"max_tilt": 0.0, "z_scan": 0}


@pytest.fixture(scope="module")
def search(toy_pose_search):
    return toy_pose_search


def _far_order(n: int) -> list[tuple[int, float]]:
    """A first stage pointing at plates 0-11 (the shortlist and its neighbours: plates 0-14)."""
    return [(p, 0.01 * p) for p in range(n)]


def test_the_best_swept_plates_neighbours_are_scored_and_the_plate_is_found(search, toy_reference):
    """Session 28's toy case (45 % of the left cut away, ranked far with the sweep alone): with
    ``sweep_refine`` the neighbours of the best swept plates outside plates 0-14 join stage 1, a start
    lands next to plate 36 and the search ranks it within one plate."""
    reference, _ = toy_reference
    section = section_from_atlas(reference, PLATE, 0.0, crop=(0.0, 0.0, 0.45, 0.0))
    order = _far_order(search.n)
    plain = search.search(section, order, check_rerank_options({**FAST, "sweep_refine": 0}))
    assert abs(plain.ranking[0][0] - PLATE) > 1  # no start near plate 36
    assert not plain.refined
    refined = search.search(
        section, order, check_rerank_options({**FAST, "sweep_refine": 2, "sweep_outside": 0})
    )
    assert refined.refined and abs(refined.ranking[0][0] - PLATE) <= 1, refined.ranking[:5]
    assert refined.pairs > plain.pairs
    assert refined.options["sweep_refine"] == 2  # recorded: rerank_options=result.options repeats it
    default = search.search(section, order, check_rerank_options(FAST))  # sweep_refine 4, sweep_outside 2
    assert default.refined and abs(default.ranking[0][0] - PLATE) <= 1, default.ranking[:5]


def test_sweep_outside_refines_only_where_the_starts_left_the_shortlist(search, toy_reference):
    """``sweep_outside``: with the first stage right (every start among the shortlisted plates) nothing
    runs, the same ranking and pairs as without the option; with it pointing away, it runs."""
    reference, _ = toy_reference
    plate = 20
    section = section_from_atlas(reference, plate)
    near = sorted(_far_order(search.n), key=lambda e: abs(e[0] - plate))  # the embedding right
    opts = {**FAST, "hypotheses": 1, "anchors": 1}  # one start (a faster test)
    plain = search.search(section, near, check_rerank_options(opts))
    gated = search.search(
        section, near, check_rerank_options({**opts, "sweep_refine": 4, "sweep_outside": 1})
    )
    assert not gated.refined
    assert gated.ranking == plain.ranking and gated.pairs == plain.pairs
    away = sorted(_far_order(search.n), key=lambda e: abs(e[0] - 3))  # shortlisted plates 0-14
    fired = search.search(
        section, away, check_rerank_options({**opts, "sweep_refine": 4, "sweep_outside": 1})
    )
    assert fired.refined and abs(fired.ranking[0][0] - plate) <= 1


def test_refine_sweep_scores_the_neighbours_of_the_best_swept_plates_only(search, toy_reference):
    """``_refine_sweep``: the plates within ``neighbours`` of the ``sweep_refine`` best stage-1 poses
    outside the shortlisted plates, those not scored yet; nothing where no swept plate lies outside."""
    from napari_nephi.engines.atlas.pose_grid import Pose

    reference, _ = toy_reference
    section = section_from_atlas(reference, 20)
    grey, mask, _ = search.prepare(section, 4 * 56)
    options = check_rerank_options({"sweep_refine": 2, "neighbours": 1})
    coarse_atlas = search.atlas(options["coarse_size"])
    coarse = rerank.coarse_grid(grey, mask, options["coarse_size"], options["edge_blur"], 0.3)

    def pose(z, score):
        return Pose(
            score=score, z=float(z), plate=z, tilt=(0.0, 0.0), rotation=0.0, scale=1.0, centre=(0.0, 0.0)
        )

    shortlist, zs = [5], [4, 5, 6, 21, 27, 33]
    first = [pose(4, 0.9), pose(5, 0.9), pose(6, 0.9), pose(21, 0.5), pose(27, 0.2), pose(33, 0.4)]
    found, pairs, extra = rerank._refine_sweep(
        coarse, coarse_atlas, mask, first, shortlist, zs, options, search.n
    )
    assert extra == [20, 22, 32, 34]  # 21 and 33 (not 27), one plate each side
    assert sorted(p.plate for p in found) == extra and pairs
    assert rerank._refine_sweep(coarse, coarse_atlas, mask, first[:3], shortlist, zs, options, search.n) == (
        [],
        [],
        [],
    )


def test_sweep_refine_defaults_presets_and_checks():
    """Session 34's defaults; the presets keep the search they were measured with (SEEDED has no sweep)."""
    assert check_rerank_options({})["sweep_refine"] == 4
    assert check_rerank_options({})["sweep_outside"] == 2
    assert check_rerank_options(rerank.FAST)["sweep_refine"] == 0
    assert check_rerank_options(rerank.SEEDED)["sweep_refine"] == 0
    for name in ("sweep_refine", "sweep_outside"):
        with pytest.raises(InputError, match=name):
            check_rerank_options({name: -1})


def test_refined_is_recorded_only_where_a_plate_was_scored(search, toy_reference, monkeypatch):
    """With ``neighbours`` 0 the best swept plates' neighbours are those plates, scored already: the gate
    opens but nothing is scored, so the search is the one without the option and ``refined`` is False
    (review 2 of session 34, C2: it said True)."""
    reference, _ = toy_reference
    section = section_from_atlas(reference, PLATE)
    opts = {**FAST, "hypotheses": 2, "anchors": 1, "shortlist": 1, "neighbours": 0}
    off = search.search(section, _far_order(search.n), check_rerank_options({**opts, "sweep_refine": 0}))
    calls, refine = [], rerank._refine_sweep
    monkeypatch.setattr(rerank, "_refine_sweep", lambda *a: calls.append(1) or refine(*a))
    on = search.search(section, _far_order(search.n), check_rerank_options(opts))
    assert calls == [1]  # the gate opened
    assert on.ranking == off.ranking and on.pairs == off.pairs
    assert not on.refined
