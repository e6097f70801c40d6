"""Stage 1's second pass at the scales near each plate's rotation-0 best (session 43, opt-in
``rerank_options={"stage1_scale_reach": k}``; None, every scale, by default): an in-plane turn of at
most ``max_rotation`` does not change how large the section's anatomy is against the plate."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas import rerank
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.rerank import DEFAULTS, PoseSearch, _near_scales, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas


def test_off_by_default_recorded_and_bad_values_refused():
    assert DEFAULTS["stage1_scale_reach"] is None
    assert check_rerank_options({})["stage1_scale_reach"] is None
    assert check_rerank_options({"stage1_scale_reach": 1})["stage1_scale_reach"] == 1
    for bad in (-1, 1.5, "one", 21):
        with pytest.raises(InputError, match="stage1_scale_reach"):
            check_rerank_options({"stage1_scale_reach": bad})
    with pytest.raises(InputError, match="stage1_prune"):  # it would do nothing in one pass
        check_rerank_options({"stage1_scale_reach": 1, "stage1_prune": None})


def test_near_scales_keeps_the_steps_around_the_rotation_0_best_by_hand():
    cut = SimpleNamespace(z=5.0)
    scales = [1.1**k for k in range(-3, 4)]  # best at 1.0 (k = 0), steps of 1.1
    rest = {5.0: [(7.5, s, cut) for s in scales], 9.0: [(7.5, 2.0, SimpleNamespace(z=9.0))]}
    best = {5.0: SimpleNamespace(scale=1.0)}  # plate 9 has no rotation-0 pose: all of its pairs kept
    options = {"scale_step": 1.1}
    for reach, kept in ((None, scales), (0, [1.0]), (1, scales[2:5]), (2, scales[1:6]), (3, scales)):
        got = _near_scales(rest, best, {**options, "stage1_scale_reach": reach})
        assert [p[1] for p in got[5.0]] == kept, reach
        assert len(got[9.0]) == 1


def test_the_toy_search_scores_fewer_stage1_pairs_and_finds_the_same_plates(toy_reference, monkeypatch):
    reference, labels = toy_reference
    plates = Plates.from_reference(reference, labels)
    section = section_from_atlas(reference, 17, (4.0, -4.0))
    order = [(p, 0.0) for p in range(plates.n)]
    off = PoseSearch(plates).search(section, order, check_rerank_options({}))
    # every second-pass pair lies within one step (and half a step of slack) of its plate's rotation-0 best
    seen = []
    near = rerank._near_scales

    def spy(rest, best, options, close=None):
        out = near(rest, best, options, close)
        seen.extend((best[z].scale, p[1]) for z, ps in out.items() for p in ps if z in best)
        return out

    monkeypatch.setattr(rerank, "_near_scales", spy)
    on = PoseSearch(plates).search(section, order, check_rerank_options({"stage1_scale_reach": 1}))
    assert seen and all(abs(math.log(s / b)) <= 1.5 * math.log(1.1) + 1e-12 for b, s in seen)
    assert on.stage1_pairs < 0.7 * off.stage1_pairs, (on.stage1_pairs, off.stage1_pairs)
    assert on.pairs - on.stage1_pairs == off.pairs - off.stage1_pairs  # stage 2 from the same starts
    assert [p for p, _ in on.ranking[:5]] == [p for p, _ in off.ranking[:5]] == [17, 16, 18, 15, 19]
    assert on.options["stage1_scale_reach"] == 1 and off.options["stage1_scale_reach"] is None


def test_the_margin_is_off_by_default_recorded_and_bad_values_refused():
    assert DEFAULTS["stage1_scale_margin"] is None
    assert check_rerank_options({})["stage1_scale_margin"] is None
    got = check_rerank_options({"stage1_scale_reach": 1, "stage1_scale_margin": 0.04})
    assert got["stage1_scale_margin"] == 0.04
    for bad in (-0.1, "wide", 2.5):
        with pytest.raises(InputError, match="stage1_scale_margin"):
            check_rerank_options({"stage1_scale_reach": 1, "stage1_scale_margin": bad})
    with pytest.raises(InputError, match="stage1_scale_reach"):  # without the reach every scale is kept
        check_rerank_options({"stage1_scale_margin": 0.04})


def test_near_scales_keeps_the_close_cuts_too_by_hand():
    cuts = {s: SimpleNamespace(z=5.0) for s in [1.1**k for k in range(-3, 4)]}
    rest = {5.0: [(7.5, s, c) for s, c in cuts.items()]}
    best = {5.0: SimpleNamespace(scale=1.0)}
    options = {"scale_step": 1.1, "stage1_scale_reach": 0}
    far = 1.1**3  # three steps from the rotation-0 best: kept only where its cut is close
    assert [p[1] for p in _near_scales(rest, best, options)[5.0]] == [1.0]
    assert [p[1] for p in _near_scales(rest, best, options, {id(cuts[far])})[5.0]] == [1.0, far]
    assert [p[1] for p in _near_scales(rest, best, options, set())[5.0]] == [1.0]


def test_a_wide_margin_scores_every_scale_and_is_the_default_search(toy_reference, monkeypatch):
    reference, labels = toy_reference
    plates = Plates.from_reference(reference, labels)
    section = section_from_atlas(reference, 17, (4.0, -4.0))
    order = [(p, 0.0) for p in range(plates.n)]
    off = PoseSearch(plates).search(section, order, check_rerank_options({}))
    reach = check_rerank_options({"stage1_scale_reach": 0})
    narrow = PoseSearch(plates).search(section, order, reach)
    some = PoseSearch(plates).search(section, order, {**reach, "stage1_scale_margin": 0.05})
    wide = PoseSearch(plates).search(section, order, {**reach, "stage1_scale_margin": 2.0})
    # every rotation-0 score lies within 2 of its plate's best: every scale kept, the search before
    assert wide.ranking == off.ranking and wide.pairs == off.pairs and wide.poses == off.poses
    assert narrow.stage1_pairs < some.stage1_pairs < off.stage1_pairs, (
        narrow.stage1_pairs,
        some.stage1_pairs,
    )
    assert some.options["stage1_scale_margin"] == 0.05 and off.options["stage1_scale_margin"] is None
