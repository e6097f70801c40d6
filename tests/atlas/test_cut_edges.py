"""The outside band's cut edges and free share (engines/atlas/pose_grid.py, rerank.py; session 22).

A partial section's cut edge has atlas tissue beyond it at the true pose, so the band outside the
section punished the true pose there; ``spare_cuts`` spares the band beyond straight runs of the
section's outline (and beyond the image where the tissue reaches its edge), ``outside_free`` lets a
small share of the band on atlas tissue (an outline that misfits by a pixel or two) cost nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_nephi import InputError
from napari_nephi.engines.atlas.pose_grid import (
    Pose,
    SectionGrid,
    cut_zone,
    outside_band,
    straight_runs,
)
from napari_nephi.engines.atlas.rerank import _rank, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas

from .test_rerank import PLATE_TOLERANCE, box_section, search  # noqa: F401 (the fixture)


def _disc(n=100, r=30.0, centre=(50.0, 50.0)):
    yy, xx = np.mgrid[:n, :n]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def test_straight_runs_find_a_knife_cut_and_not_a_round_outline():
    assert straight_runs(_disc(), 5) == []
    half = _disc()
    half[:, 56:] = False  # cut along column 55
    runs = straight_runs(half, 5)
    assert len(runs) == 1
    a, b, normal = runs[0]
    assert abs(a[1] - 55) <= 1 and abs(b[1] - 55) <= 1 and abs(a[0] - b[0]) > 40  # along the cut
    np.testing.assert_allclose(normal, [0.0, 1.0], atol=1e-6)  # pointing away from the tissue
    torn = half.copy()
    torn[48:50, 25:56] = False  # a tear 2 pixels wide from the cut inwards: closed, not an outline
    assert len(straight_runs(torn, 5)) == 1


def test_cut_zone_lies_beyond_the_cut_and_not_beyond_the_natural_outline():
    half = _disc()
    half[:, 56:] = False
    zone = cut_zone(half, 5) > 0
    band = outside_band(half, 5) > 0
    assert not (zone & half)[:, :55].any()  # nothing inside the tissue but the cut's own column
    assert zone[50, 56:61].all() and zone[30, 57]  # the band beyond the cut
    assert not zone[50, 15:20].any() and not zone[15:20, 40].any()  # the natural outline's band
    spared = (band & zone).sum() / band.sum()
    assert 0.2 < spared < 0.45, spared  # the cut's share of the band


def test_the_band_is_spared_beyond_the_image_where_the_tissue_reaches_its_edge():
    grey = np.zeros((60, 60), np.float32)
    mask = np.zeros((60, 60), bool)
    mask[15:45, 0:40] = True  # the tissue runs off the image's left edge
    grey[mask] = 1.0
    none = np.zeros((60, 60), np.float32)
    plain = SectionGrid(grey, mask, 32, outside=0.3).variant(0.0)[3]
    spared = SectionGrid(grey, mask, 32, outside=0.3, spare=none).variant(0.0)[3]
    assert spared < 0.9 * plain  # the band's left side (beyond the image) no longer counts
    inner = np.roll(mask, 10, axis=1)  # the same tissue, clear of the edge: nothing spared
    grey2 = np.where(inner, np.float32(1.0), np.float32(0.0))
    assert SectionGrid(grey2, inner, 32, outside=0.3, spare=none).variant(0.0)[3] == pytest.approx(
        SectionGrid(grey2, inner, 32, outside=0.3).variant(0.0)[3]
    )


@pytest.mark.parametrize("free", [0.25, 0.6])
def test_free_share_of_the_band_costs_nothing_and_the_rest_grows_to_the_weight(free):
    """The band of a 16 x 20 section on a slice whose tissue covers the band's top rows only: its
    share on tissue is known; the score loses 0.3 * (share - free) / (1 - free), nothing below free."""
    a_re, a_im, a_mask, ring, corr, (fa, ea, na) = box_section(3, 32, 1)
    b_mask = a_mask.copy()
    b_mask[:8, :] = True  # the band's rows above the section lie on tissue
    args = (fa[None], torch.tensor([ea]), torch.tensor([na]), corr.slice(a_re, a_im, b_mask)[None])
    share = float((ring * b_mask).sum() / ring.sum())
    assert 0.1 < share < 0.5
    plain = float(corr.best(*args)[0][0, 0])
    value, _, without = corr.best(*args, torch.tensor([float(ring.sum())]), 0.3, free, True)
    got = float(value[0, 0])
    assert float(without[0, 0]) == pytest.approx(plain, rel=1e-5)  # the band divided out again
    expected = plain * (1 - 0.3 * max(0.0, share - free) / (1 - free))
    assert got == pytest.approx(expected, rel=1e-4)
    assert (got < plain) == (share > free)


def test_spare_cuts_keeps_a_half_section_s_score_and_its_plate(search, toy_reference):  # noqa: F811
    """A half section clear of the image's edge loses score to the band beyond its cut (atlas tissue
    there at the true pose) unless the cut is spared; then it loses about what a whole one does."""
    reference, _ = toy_reference
    plate = 20
    order = [(plate, 0.0)] + [(p, 1.0) for p in range(search.n) if p != plate]
    opts = {"shortlist": 1, "neighbours": 2, "sweep_step": 0, "hypotheses": 1, "anchors": 1, "z_scan": 0}
    half = section_from_atlas(reference, float(plate), crop=(0, 0, 0, 0.5))
    half = np.pad(half, 10, constant_values=float(np.median(half[:, 0])))  # background all around
    plain = search.search(half, order, check_rerank_options({**opts, "outside_weight": 0.0}))
    best = max(p.score for p in plain.poses.values())
    loss = {}
    for spare in (False, True):
        opt = check_rerank_options({**opts, "outside_weight": 0.3, "spare_cuts": spare})
        band = search.search(half, order, opt)
        assert abs(band.ranking[0][0] - plate) <= PLATE_TOLERANCE
        loss[spare] = 1 - max(p.score for p in band.poses.values()) / best
    assert loss[False] > 0.05 and 0 <= loss[True] < 0.03, loss


def test_the_plain_score_survives_a_band_that_takes_the_whole_score():
    """``outside_weight`` 1 with the band all on tissue scores 0; the plain score is still the similarity."""
    a_re, a_im, a_mask, ring, corr, (fa, ea, na) = box_section(4, 32, 2)
    args = (
        fa[None],
        torch.tensor([ea]),
        torch.tensor([na]),
        corr.slice(a_re, a_im, np.ones_like(a_mask))[None],
    )
    similarity = float(corr.best(*args)[0][0, 0])
    value, _, plain = corr.best(*args, torch.tensor([float(ring.sum())]), 1.0, 0.0, True)
    assert float(value[0, 0]) == pytest.approx(0.0, abs=1e-6) and similarity > 0.5
    assert float(plain[0, 0]) == pytest.approx(similarity, rel=1e-5)


def _pose(z, score, plain):
    return Pose(score, float(z), int(round(z)), (0.0, 0.0), 0.0, 1.0, (0.0, 0.0), plain=plain)


def test_plain_reach_orders_the_best_pose_s_neighbours_by_the_similarity_without_the_band():
    """The band picks the region (a far pose whose plain similarity is best but whose band lies on
    atlas tissue stays behind), the plain similarity picks the plate next to the best pose."""
    poses = [_pose(20, 0.50, 0.60), _pose(21, 0.52, 0.55), _pose(60, 0.45, 0.70)]
    order = [(p, 0.0) for p in range(80)]
    banded = _rank(poses, order, 0.005, 0, 80, None, 8)
    plain = _rank(poses, order, 0.005, 0, 80, None, 8, plain_reach=1)
    assert [p for p, _ in banded.ranking[:2]] == [21, 20]
    assert [p for p, _ in plain.ranking[:2]] == [20, 21]
    assert plain.ranking[0][1] == pytest.approx(banded.ranking[0][1])  # the best distance is kept
    # plate 21 takes the better of its own 0.55 and 0.60 - 0.005 from the pose at 20: 0.005 behind
    assert plain.ranking[1][1] == pytest.approx(banded.ranking[0][1] + 0.005)
    far = [p for p, _ in plain.ranking].index(60)
    assert far > 2 and [p for p, _ in banded.ranking].index(60) > 2
    # a tilted best pose lies between plates: a window of 0 plates still holds its own plate
    tilted = [_pose(20.4, 0.52, 0.55), _pose(19.0, 0.50, 0.60)]
    for reach, top in ((0, 20), (2, 19)):  # 19 is 1.4 plates from 20.4: in the window of 2 only
        assert _rank(tilted, order, 0.005, 0, 80, None, 8, reach).ranking[0][0] == top
    # without the band's scores (None) nothing changes
    bare = [_pose(20, 0.50, None), _pose(21, 0.52, None)]
    assert (
        _rank(bare, order, 0.005, 0, 80, None, 8, 1).ranking
        == _rank(bare, order, 0.005, 0, 80, None, 8).ranking
    )


def test_plain_reach_is_on_by_default_and_off_without_the_band():
    from napari_nephi.engines.atlas.rerank import FAST, SEEDED

    assert check_rerank_options({})["plain_reach"] == 1  # session 22
    for preset in (SEEDED, FAST):  # no band, so no plain score: the ranking is the score's
        assert check_rerank_options(preset)["outside_weight"] == 0.0


def test_bad_band_options_raise():
    with pytest.raises(InputError, match="spare_cuts"):
        check_rerank_options({"spare_cuts": "yes"})
    with pytest.raises(InputError, match="outside_free"):
        check_rerank_options({"outside_free": 0.95})
    with pytest.raises(InputError, match="outside_free"):
        check_rerank_options({"outside_free": -0.1})
    with pytest.raises(InputError, match="plain_reach"):
        check_rerank_options({"plain_reach": -1})


def test_a_search_records_the_options_it_ran_and_whether_plain_reach_ordered(search, toy_reference):  # noqa: F811
    """The result says every option the search ran with (defaults filled in) and whether plain_reach
    ordered the plates: the same options repeat the ranking; plain_reach None or no band is recorded
    as not ordered."""
    from napari_nephi.engines.atlas.rerank import SEEDED

    reference, _ = toy_reference
    plate = 20
    order = [(plate, 0.0)] + [(p, 1.0) for p in range(search.n) if p != plate]
    section = section_from_atlas(reference, float(plate), crop=(0, 0, 0, 0.3))
    small = {"shortlist": 1, "neighbours": 2, "sweep_step": 0, "hypotheses": 1, "anchors": 1, "z_scan": 2}
    for given, ordered in (({}, True), ({"plain_reach": None}, False), (SEEDED, False)):
        opts = check_rerank_options({**given, **small})
        found = search.search(section, order, opts)
        assert found.options == opts and found.options is not opts  # a copy: later edits do not change it
        assert found.plain_ranked is ordered, given
        again = search.search(section, order, check_rerank_options(found.options))
        assert again.ranking == found.ranking and again.plain_ranked is ordered
