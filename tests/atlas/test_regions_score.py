"""The regions term of the pose search (engines/atlas/rerank.py ``region_weight``, session 35): the
correlation ratio of the section's intensities given the atlas's regions at the best poses near the
top, which asks how much of the section's variance the atlas's regions explain, whatever level the
stain gives each region, where the edge field compares where boundaries run and how strongly."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas import rerank
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.pose_grid import Pose
from napari_nephi.engines.atlas.region_fit import RegionAtlas, SectionSamples, refine, region_ratio
from napari_nephi.engines.atlas.rerank import (
    SECTION_FACTOR,
    PoseSearch,
    _rank,
    _regions_score,
    check_rerank_options,
)

from .test_information import _restained
from .test_rerank import search  # noqa: F401 (the fixture)


def _pose(score, z, plain=None):
    return Pose(score, z, round(z), (0.0, 0.0), 0.0, 1.0, (0.0, 0.0), plain=score if plain is None else plain)


def test_regions_move_only_the_plates_within_the_margin_over_the_least_of_them(monkeypatch):
    poses = [_pose(0.50, 10.0), _pose(0.49, 10.2), _pose(0.48, 14.0), _pose(0.40, 30.0), _pose(0.47, 36.0)]
    prior = np.zeros(40)
    prior[36] = 0.05  # 0.47 less 0.05: outside the margin of 0.05
    ratios = {10: 0.3, 14: 0.6, 30: 0.9, 36: 0.9}
    asked = []

    def fake(regions, samples, pose):
        asked.append(pose.plate)
        return ratios[pose.plate]

    monkeypatch.setattr(rerank, "region_ratio", fake)
    order = [(p, 0.0) for p in range(40)]
    assert _rank([_pose(p.score, p.z) for p in poses], order, 0.005, 0, 40, prior).ranking[0][0] == 10
    options = {"region_weight": 0.1, "region_margin": 0.05, "region_refit": False}
    _regions_score(poses, prior, None, None, options)
    assert sorted(asked) == [10, 14]  # one pose per plate, only within the margin
    # plate 10 has the least ratio: unchanged; plate 14 gains 0.1 * (0.6 - 0.3)
    assert [p.score for p in poses] == pytest.approx([0.50, 0.49, 0.51, 0.40, 0.47])
    assert [p.plain for p in poses] == pytest.approx([0.50, 0.49, 0.48, 0.40, 0.47])  # edges alone
    assert [p.region for p in poses] == [0.3, None, 0.6, None, None]
    assert _rank(poses, order, 0.005, 0, 40, prior).ranking[0][0] == 14


def test_region_ratio_is_highest_at_the_true_plate_of_a_restained_section(search, toy_reference):  # noqa: F811
    reference, labels = toy_reference
    plate = 20
    section = _restained(reference, labels, plate)
    options = check_rerank_options(rerank.SEEDED)
    order = [(plate, 0.0)] + [(p, 0.0) for p in range(search.n) if p != plate]
    found = search.search(section, order, options)
    best = found.poses[found.ranking[0][0]]
    assert abs(best.z - plate) <= 1.5
    grey, mask, zoom = PoseSearch.prepare(section, SECTION_FACTOR * options["work_size"])
    samples = SectionSamples(grey, mask, np.argwhere(mask).mean(axis=0))
    regions = RegionAtlas(Plates.from_reference(reference, labels))
    pose = Pose(best.score, best.z, best.plate, best.tilt, best.rotation, best.scale / zoom, best.centre)
    here = region_ratio(regions, samples, pose)
    assert here > 0.5  # the regions explain most of the restained section's variance
    for dz in (-8, 8):
        away = Pose(0.0, best.z + dz, best.plate + dz, best.tilt, best.rotation, pose.scale, best.centre)
        assert here > region_ratio(regions, samples, away) + 0.1, dz


def test_the_refit_stops_after_the_moves_and_halvings_it_is_given(toy_reference):
    reference, labels = toy_reference
    section = _restained(reference, labels, 20)
    grey, mask, _ = PoseSearch.prepare(section, 128)
    samples = SectionSamples(grey, mask, np.argwhere(mask).mean(axis=0), size=32)
    regions = RegionAtlas(Plates.from_reference(reference, labels))
    centre = np.argwhere(labels[20] > 0).mean(axis=0)
    start = Pose(
        0.0, 20.0, 20, (3.0, -2.0), 4.0, grey.shape[0] / 64 * 0.95, (centre[0] + 2.0, centre[1] - 2.0)
    )
    here = region_ratio(regions, samples, start)
    assert refine(regions, samples, start, 10.0, 10.0, free_z=False, moves=0).score == pytest.approx(here)
    one = refine(regions, samples, start, 10.0, 10.0, free_z=False, moves=1)
    full = refine(regions, samples, start, 10.0, 10.0, free_z=False)
    assert here < one.score <= full.score  # one move gains, the full search at least as much
    assert one.z == full.z == 20.0  # the plate position stays


def test_the_search_records_the_ratio_it_counted_and_does_nothing_without_labels(search, toy_reference):  # noqa: F811
    reference, labels = toy_reference
    section = _restained(reference, labels, 24, seed=1)
    order = [(24, 0.0)] + [(p, 0.0) for p in range(search.n) if p != 24]
    seeded = dict(rerank.SEEDED, region_margin=0.2)  # a small search: the plates next to the truth
    off = search.search(section, order, check_rerank_options(dict(seeded, region_weight=0.0)))
    on = search.search(section, order, check_rerank_options(dict(seeded, region_weight=0.2)))
    assert all(p.region is None for p in off.poses.values())
    measured = [p for p in on.poses.values() if p.region is not None]
    assert measured and all(-1.0 <= p.region <= 1.0 for p in measured)
    best = max(p.score for p in off.poses.values())
    assert len(measured) >= 2  # more than one plate within the margin
    assert all(off.poses[p.plate].score >= best - 0.2 - 1e-9 for p in measured)  # within the margin
    assert all(on.poses[q].score >= off.poses[q].score - 1e-9 for q in off.poses)  # never lower
    assert on.options["region_weight"] == 0.2 and on.options["region_refit"] is True
    # an atlas without annotation: the option does nothing, the ranking is the one without it
    bare = PoseSearch(Plates.from_reference(reference))
    plain_off = bare.search(section, order, check_rerank_options(dict(seeded, region_weight=0.0)))
    plain_on = bare.search(section, order, check_rerank_options(dict(seeded, region_weight=0.2)))
    assert plain_on.ranking == plain_off.ranking
    assert all(p.region is None for p in plain_on.poses.values())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"region_weight": -0.1}, "region_weight"),
        ({"region_margin": 1.5}, "region_margin"),
        ({"region_refit": "yes"}, "region_refit"),
    ],
)
def test_bad_region_options_raise(options, match):
    with pytest.raises(InputError, match=match):
        check_rerank_options(options)


def test_the_regions_term_is_off_by_default_and_in_the_presets():
    """Opt-in (session 35: the phantom's stain is the term's own model, review 1)."""
    defaults = check_rerank_options({})
    assert defaults["region_weight"] == 0.0 and defaults["region_margin"] == 0.03
    assert defaults["region_refit"] is True
    assert check_rerank_options(rerank.SEEDED)["region_weight"] == 0.0
    assert check_rerank_options(rerank.FAST)["region_weight"] == 0.0
