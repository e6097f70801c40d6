"""Stage 1 in two passes (rerank ``stage1_prune``, session 30): every plate at rotation 0 first, the
other rotations only on plates that could still make one of stage 2's starts; on the toy atlas."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.rerank import (
    FAST,
    SEEDED,
    PoseSearch,
    _around,
    _pruned_stage1,
    _stage1,
    check_rerank_options,
    coarse_grid,
    hypotheses,
)
from napari_nephi.synthetic.atlas import section_from_atlas


@pytest.fixture(scope="module")
def search(toy_reference):
    reference, labels = toy_reference
    return PoseSearch(Plates.from_reference(reference, labels))


def _stage1_both(search, section, order, prune):
    """Stage 1 in one pass and in two (``stage1_prune`` ``prune``): (one pass's best pose per plate,
    its pairs, the two-pass result's poses, its pairs, the options, the shortlist)."""
    options = check_rerank_options({"stage1_prune": prune})
    grey, mask, _ = search.prepare(section, 4 * options["work_size"])
    grid = coarse_grid(grey, mask, options["coarse_size"], options["edge_blur"], options["outside_weight"])
    shortlist = [p for p, _ in order[: options["shortlist"]]]
    zs = sorted(set(_around(shortlist, options["neighbours"], search.n)) | set(range(3, search.n, 6)))
    pairs = _stage1(grid, search.atlas(options["coarse_size"]), mask, zs, options)
    one = grid.score(pairs, search.n, best_per_cut_z=True)
    two, used = _pruned_stage1(grid, pairs, shortlist, options, search.n, None)
    return one, pairs, two, used, options, shortlist


@pytest.mark.parametrize("plate", [12, 27])
def test_two_passes_keep_the_starts_and_score_fewer_pairs(search, toy_reference, plate):
    """Every plate scored in full keeps its one-pass best pose; every plate left out lies below the
    weakest start at rotation 0 and in full; so stage 2's starts are the same, from fewer pairs."""
    reference, _ = toy_reference
    section = section_from_atlas(reference, plate, 0.0, crop=(0.0, 0.0, 0.3, 0.0))
    order = sorted([(p, 0.01 * abs(p - plate)) for p in range(search.n)], key=lambda e: e[1])
    one, pairs, two, used, options, shortlist = _stage1_both(search, section, order, 0.0)
    assert len(two) == len(one) and len(used) < len(pairs)
    left_out = {p.z for p in two} - {p[2].z for p in used if p[0] != 0.0}  # rotation 0 only
    starts = hypotheses(one, shortlist, options)
    assert [(h.plate, h.rotation, h.scale) for h in hypotheses(two, shortlist, options)] == [
        (h.plate, h.rotation, h.scale) for h in starts
    ]
    weakest = min(h.score for h in starts[: options["hypotheses"]])
    by_z = {p.z: p for p in one}
    for pose in two:
        if pose.z in left_out:  # left out: its rotation-0 best and its best in full below the weakest start
            assert pose.rotation == 0.0 and pose.score < weakest and by_z[pose.z].score < weakest
        else:
            mine = by_z[pose.z]
            assert (pose.rotation, pose.scale, pose.centre) == (mine.rotation, mine.scale, mine.centre)
            assert pose.score == pytest.approx(mine.score, abs=1e-6)
    assert left_out  # some plates were left out


def test_a_margin_of_2_scores_every_pair(search, toy_reference):
    reference, _ = toy_reference
    section = section_from_atlas(reference, 20)
    order = sorted([(p, 0.01 * abs(p - 20)) for p in range(search.n)], key=lambda e: e[1])
    one, pairs, two, used, _, _ = _stage1_both(search, section, order, 2.0)
    assert len(used) == len(pairs)
    assert [(p.plate, p.rotation, p.scale) for p in two] == [(p.plate, p.rotation, p.scale) for p in one]
    np.testing.assert_allclose([p.score for p in two], [p.score for p in one], atol=1e-6)


def test_the_default_prunes_the_search_records_it_and_the_presets_leave_it_off(search, toy_reference):
    reference, _ = toy_reference
    section = section_from_atlas(reference, 20)
    order = sorted([(p, 0.01 * abs(p - 20)) for p in range(search.n)], key=lambda e: e[1])
    fast = {"max_tilt": 0.0, "z_scan": 0}
    plain = search.search(section, order, check_rerank_options({**fast, "stage1_prune": None}))
    pruned = search.search(section, order, check_rerank_options(fast))  # the default since session 30
    assert pruned.ranking[0][0] == plain.ranking[0][0] == 20 and pruned.pairs < plain.pairs
    assert pruned.options["stage1_prune"] == 0.05 and plain.options["stage1_prune"] is None
    assert check_rerank_options(SEEDED)["stage1_prune"] is None
    assert check_rerank_options(FAST)["stage1_prune"] is None


@pytest.mark.parametrize("value", [-0.1, 3.0, "a"])
def test_bad_stage1_prune_raises(value):
    with pytest.raises(InputError, match="stage1_prune"):
        check_rerank_options({"stage1_prune": value})
