"""The stain gate of the quarters' plate re-estimate (session 41, opt-in ``rerank_options`` ``quarter_gate``;
engines/atlas/pose_grid.py ``SectionGrid.level_correlation``): ``quarter_shift`` acts only where the section's
intensities go the atlas's way at the best pose (each in its own polarity). Off (None) by default, and then
``quarter_shift`` is session 40's, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.pose_grid import Pose, SectionGrid
from napari_nephi.engines.atlas.rerank import (
    DEFAULTS,
    SECTION_FACTOR,
    PoseSearch,
    check_rerank_options,
)


def test_gate_off_by_default_checked_and_refused_without_quarter_shift():
    assert DEFAULTS["quarter_gate"] is None
    assert check_rerank_options({"quarter_shift": 0.5, "quarter_gate": 0})["quarter_gate"] == 0.0
    assert (
        check_rerank_options({"quarter_shift": 0.5, "quarter_gate": "polarity"})["quarter_gate"] == "polarity"
    )
    for bad in (1.5, -2, "nissl", float("nan"), True, [0.0]):
        with pytest.raises(InputError, match="quarter_gate"):
            check_rerank_options({"quarter_shift": 0.5, "quarter_gate": bad})
    with pytest.raises(InputError, match="set quarter_shift"):
        check_rerank_options({"quarter_gate": 0.0})


def test_level_correlation_reads_the_polarity_of_the_stain(toy_pose_search, toy_reference):
    reference, labels = toy_reference
    plate = 20
    own = (reference[plate] / reference.max()).astype(np.float32)  # the atlas's stain
    options = check_rerank_options({})
    found = toy_pose_search.search(own, [(p, 0.0) for p in range(toy_pose_search.n)], options)
    best = found.poses[found.ranking[0][0]]
    assert abs(best.z - plate) <= 1.5
    atlas = toy_pose_search.atlas(options["work_size"])
    assert not atlas.bright  # the toy atlas: bright tissue on a dark background
    readings = []
    for image in (own, 1.0 - own):  # the atlas's stain, then its negative (a bright background)
        grey, mask, zoom, bright = PoseSearch._prepare(image, SECTION_FACTOR * options["work_size"])
        grid = SectionGrid(grey, mask, options["work_size"])
        pose = Pose(best.score, best.z, best.plate, best.tilt, best.rotation, best.scale / zoom, best.centre)
        readings.append((bright, grid.level_correlation(atlas, pose, bright)))
    (b_own, r_own), (b_neg, r_neg) = readings
    assert (b_own, b_neg) == (False, True)
    assert r_own > 0.6 and r_neg < -0.6  # the same edges, the opposite levels
    assert r_neg == pytest.approx(-r_own, abs=0.05)
    # no shared tissue: NaN (the gate then stays shut)
    grid = SectionGrid(
        *PoseSearch.prepare(own, SECTION_FACTOR * options["work_size"])[:2], options["work_size"]
    )
    far = Pose(0.0, best.z, best.plate, best.tilt, best.rotation, best.scale / zoom, (-500.0, -500.0))
    assert math.isnan(grid.level_correlation(atlas, far, False))


def test_the_gate_opens_on_the_atlas_stain_and_shuts_on_its_negative(toy_pose_search, toy_reference):
    reference, labels = toy_reference
    own = (reference[24] / reference.max()).astype(np.float32)
    order = [(p, 0.0) for p in range(toy_pose_search.n)]

    def run(image, options):
        return toy_pose_search.search(image, order, check_rerank_options(options))

    own_plain = run(own, {})
    ungated = run(own, {"quarter_shift": 0.5})
    # off (None): session 40's option bit for bit, the very same options (the search runs on them alone)
    assert check_rerank_options({"quarter_shift": 0.5, "quarter_gate": None}) == ungated.options
    assert ungated.quarter_reading is None and ungated.quarter_open is None and ungated.quarter_moved > 0
    negative = 1.0 - own
    plain = run(negative, {})
    for gate in (0.0, "polarity"):
        gated = run(own, {"quarter_shift": 0.5, "quarter_gate": gate})
        assert gated.quarter_reading > 0.6 and gated.quarter_open is True
        assert gated.ranking == ungated.ranking and gated.quarter_moved == ungated.quarter_moved
        assert gated.options["quarter_gate"] == gate
        shut = run(negative, {"quarter_shift": 0.5, "quarter_gate": gate})
        assert shut.quarter_reading < -0.6 and shut.quarter_open is False and shut.quarter_moved == 0
        assert shut.ranking == plain.ranking and shut.pairs == plain.pairs
        assert all(p.shifted is None for p in shut.poses.values())
    # a gate above every reading shuts it on the atlas's own stain too
    high = run(own, {"quarter_shift": 0.5, "quarter_gate": 0.99})
    assert high.quarter_moved == 0 and high.ranking == own_plain.ranking


def test_on_a_list_of_plates_the_gate_reads_nothing(toy_reference):
    reference, labels = toy_reference
    search = PoseSearch(Plates.from_reference([reference[i] for i in range(0, 40, 4)]))
    section = (reference[20] / reference.max()).astype(np.float32)
    found = search.search(
        section,
        [(p, 0.0) for p in range(search.n)],
        check_rerank_options({"quarter_shift": 0.5, "quarter_gate": 0}),
    )
    assert found.quarter_reading is None and found.quarter_open is None and found.quarter_moved == 0
