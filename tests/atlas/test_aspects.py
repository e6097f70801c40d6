"""The aspect step of the pose search (rerank.py ``aspects``, pose_grid.py ``Cut.aspect``; session 26):
the best pose of each plate near the top cut again with its rows and columns scaled apart, for
specimens stretched along one axis against the other."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas.pose_grid import Pose, SectionGrid
from napari_nephi.engines.atlas.rerank import (
    SECTION_FACTOR,
    PoseSearch,
    _best_near_top,
    _Refine,
    check_rerank_options,
)

from .test_rerank import search  # noqa: F401 (the fixture)

STRETCH = 1.15  # the section's rows over its columns, against the plate


def _stretched(reference, plate: int) -> np.ndarray:
    """Plate ``plate`` of the toy atlas with its rows stretched by :data:`STRETCH` (columns kept)."""
    img = reference[plate].astype(np.float32)
    h, w = img.shape
    return cv2.resize(img, (w, round(h * STRETCH)), interpolation=cv2.INTER_LINEAR)


def test_an_aspect_cut_fits_a_stretched_section_better_than_the_plates_own_shape(search, toy_reference):  # noqa: F811
    reference, _ = toy_reference
    plate = 20
    section = _stretched(reference, plate)
    options = check_rerank_options({})
    order = [(p, 0.0) for p in range(search.n)]
    found = search.search(section, order, options)
    best = found.poses[found.ranking[0][0]]
    assert abs(best.z - plate) <= 1.5 and best.aspect == 1.0
    grey, mask, zoom = PoseSearch.prepare(section, SECTION_FACTOR * options["work_size"])
    grid = SectionGrid(grey, mask, options["work_size"])
    atlas = search.atlas(options["work_size"])
    centre = np.asarray(best.centre)
    scores = {}
    for ratio in (1 / STRETCH, 1.0, STRETCH):
        cut = grid.oblique_cuts(atlas, [(best.z, best.tilt)], centre, best.scale / zoom, ratio)[0]
        pose = grid.score([(best.rotation, best.scale / zoom, cut)], atlas.n)[0]
        assert pose.aspect == pytest.approx(ratio)
        # the shift is read along each axis at its own step: the pose stays on the same atlas point
        assert np.hypot(*(np.asarray(pose.centre) - centre)) < 4.0
        scores[ratio] = pose.score
    # rows stretched on the section: fewer plate pixels per section pixel along the rows
    assert scores[1 / STRETCH] > scores[1.0] + 0.02
    assert scores[1 / STRETCH] > scores[STRETCH] + 0.04


def test_the_search_adds_aspect_poses_near_the_top_only(search, toy_reference):  # noqa: F811
    reference, _ = toy_reference
    section = _stretched(reference, 24)
    order = [(p, 0.0) for p in range(search.n)]
    off = search.search(section, order, check_rerank_options({}))
    on = search.search(section, order, check_rerank_options({"aspects": [1 / STRETCH, STRETCH]}))
    assert all(p.aspect == 1.0 for p in off.poses.values())
    assert on.options["aspects"] == [1 / STRETCH, STRETCH]
    top = on.poses[on.ranking[0][0]]
    assert top.aspect == pytest.approx(1 / STRETCH) and abs(top.z - 24) <= 1.5
    assert top.score > off.poses[off.ranking[0][0]].score
    assert on.pairs > off.pairs
    # the step adds poses only at the plates within the margin of the best (no prior here: the order's
    # distances are all 0), one plate either side where a tilted cut's shift moves its centre
    low = max(p.score for p in off.poses.values()) - 0.05
    near = {q for q, p in off.poses.items() if p.score >= low - 1e-9}
    stretched = {q for q, p in on.poses.items() if p.aspect != 1.0}
    assert stretched and all(min(abs(q - n) for n in near) <= 1 for q in stretched)
    assert len(near) < search.n // 2


def test_aspect_max_tilt_leaves_out_tilted_poses(search, toy_reference):  # noqa: F811
    # session 27: a tilt about one axis also shortens the cut along the other; with aspect_max_tilt
    # the step cuts only poses tilted by at most that much
    reference, _ = toy_reference
    section = _stretched(reference, 20)
    options = check_rerank_options({})
    found = search.search(section, [(p, 0.0) for p in range(search.n)], options)
    best = found.poses[found.ranking[0][0]]
    grey, mask, zoom = PoseSearch.prepare(section, SECTION_FACTOR * options["work_size"])
    atlas = search.atlas(options["work_size"])
    flat = Pose(best.score, best.z, best.plate, (0.0, 0.0), best.rotation, best.scale / zoom, best.centre)
    tilted = Pose(
        best.score - 0.01, best.z + 6, best.plate + 6, (6.0, 0.0), best.rotation, flat.scale, best.centre
    )
    prior = np.zeros(search.n)
    cut = {}
    for limit in (None, 0.0, 6.0):
        opts = check_rerank_options({"aspects": [0.9, 1.1], "aspect_max_tilt": limit})
        refine = _Refine(atlas, SectionGrid(grey, mask, options["work_size"]), opts, None)
        new = refine.aspects([flat, tilted], prior)
        cut[limit] = sorted({p.tilt for p in new})
        assert refine.pairs == 2 * len(cut[limit]) and {p.aspect for p in new} == {0.9, 1.1}
    assert cut[None] == cut[6.0] == [(0.0, 0.0), (6.0, 0.0)]
    assert cut[0.0] == [(0.0, 0.0)]
    with pytest.raises(InputError, match="aspect_max_tilt"):
        check_rerank_options({"aspects": [0.9], "aspect_max_tilt": -1.0})
    # review 1 of session 27, C1: without aspects it would do nothing
    with pytest.raises(InputError, match="runs only where 'aspects' lists ratios"):
        check_rerank_options({"aspect_max_tilt": 0.0})
    assert check_rerank_options({"aspects": [], "aspect_max_tilt": None})["aspect_max_tilt"] is None


def _pose(score, z):
    return Pose(score, z, round(z), (0.0, 0.0), 0.0, 1.0, (0.0, 0.0), plain=score)


def test_best_near_top_takes_one_pose_per_plate_within_the_margin_less_the_prior():
    poses = [_pose(0.50, 10.0), _pose(0.49, 10.2), _pose(0.48, 14.0), _pose(0.40, 30.0), _pose(0.47, 36.0)]
    prior = np.zeros(40)
    prior[36] = 0.05  # 0.47 less 0.05: outside the margin of 0.05
    assert _best_near_top(poses, prior, 0.05) == {10: 0, 14: 2}
    assert _best_near_top(poses, prior, 0.2) == {10: 0, 14: 2, 30: 3, 36: 4}


@pytest.mark.parametrize(
    "value, match",
    [
        ([1.0], "other than 1"),
        ([0.9, 3.0], r"in \[0.5, 2\]"),
        (0.9, "list of ratios"),
        ("wide", "list of ratios"),
    ],
)
def test_bad_aspects_raise(value, match):
    with pytest.raises(InputError, match=match):
        check_rerank_options({"aspects": value})
    with pytest.raises(InputError, match="aspect_margin"):
        check_rerank_options({"aspect_margin": -0.1})


def test_the_information_is_read_on_the_cut_at_the_poses_aspect(search, toy_reference):  # noqa: F811
    # review 1 of session 26, C1: a pose found at an aspect is measured on that cut, not the isotropic one
    reference, _ = toy_reference
    section = _stretched(reference, 20)
    options = check_rerank_options({"aspects": [1 / STRETCH]})
    found = search.search(section, [(p, 0.0) for p in range(search.n)], options)
    best = found.poses[found.ranking[0][0]]
    assert best.aspect == pytest.approx(1 / STRETCH)
    grey, mask, zoom = PoseSearch.prepare(section, SECTION_FACTOR * options["work_size"])
    grid = SectionGrid(grey, mask, options["work_size"])
    atlas = search.atlas(options["work_size"])
    pose = Pose(best.score, best.z, best.plate, best.tilt, best.rotation, best.scale / zoom, best.centre)
    pose.aspect = best.aspect
    stretched = grid.information(atlas, pose)
    pose.aspect = 1.0
    assert stretched > grid.information(atlas, pose) + 0.05
