"""Re-ranking by a pose search in the atlas (engines/atlas/rerank.py), on the toy atlas, CPU.

The embedding's part is replaced by a shuffled shortlist, so these tests check the pose search alone:
the true plate must come first (or within a stated distance) whatever order the shortlist has.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.atlas.plates import Plates
from napari_nephi.engines.atlas.rerank import PoseSearch, check_rerank_options
from napari_nephi.synthetic.atlas import section_from_atlas

#: Plates the top pick may lie from the truth (a cut's centre rounds to a plate; neighbours are
#: nearly the same anatomy on the toy atlas).
PLATE_TOLERANCE = 1
#: Relative error allowed on the found scale (the scale grid steps by sqrt(1.1) in stage 2).
SCALE_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def search(toy_reference):
    reference, labels = toy_reference
    return PoseSearch(Plates.from_reference(reference, labels))


def _shuffled(n: int, truth: int, seed: int, size: int = 6) -> list[tuple[int, float]]:
    """A ranking of every plate in random order whose first ``size`` hold ``truth`` (not first)."""
    rng = np.random.default_rng(seed)
    others = [int(p) for p in rng.permutation(n) if abs(p - truth) > 3]
    head = others[: size - 1]
    head.insert(int(rng.integers(1, size)), truth)
    rest = [p for p in range(n) if p not in head]
    return [(p, 0.1 * k) for k, p in enumerate(head + rest)]


def _run(search, section, truth, seed=0, **options):
    """The pose search given a shuffled shortlist of 6 holding ``truth`` (no sweep of the atlas)."""
    order = _shuffled(search.n, truth, seed)
    opts = {"shortlist": 6, "neighbours": 2, "sweep_step": 0, **options}
    return search.search(section, order, check_rerank_options(opts))


def test_the_sweep_finds_a_plate_the_shortlist_misses(search, toy_reference):
    reference, _ = toy_reference
    plate = 27
    order = [(p, 0.0) for p in range(search.n) if abs(p - plate) > 6]  # the embedding far off
    order += [(p, 1.0) for p in range(search.n) if abs(p - plate) <= 6]
    section = section_from_atlas(reference, plate, (0.0, 5.0))
    opts = {"shortlist": 4, "neighbours": 1}
    missed = search.search(section, order, check_rerank_options({**opts, "sweep_step": 0}))
    swept = search.search(section, order, check_rerank_options({**opts, "sweep_step": 3}))
    assert abs(missed.ranking[0][0] - plate) > 3  # only far plates searched
    assert abs(swept.ranking[0][0] - plate) <= PLATE_TOLERANCE


@pytest.mark.parametrize("plate", [12, 24])
def test_straight_section_puts_the_true_plate_first(search, toy_reference, plate):
    reference, _ = toy_reference
    section = section_from_atlas(reference, plate)
    before = section.copy()
    result = _run(search, section, plate, seed=plate)
    np.testing.assert_array_equal(section, before)  # input not modified
    assert abs(result.ranking[0][0] - plate) <= PLATE_TOLERANCE, result.ranking[:5]
    plates = [p for p, _ in result.ranking]
    assert sorted(plates) == list(range(search.n))  # every plate once
    dist = np.array([d for _, d in result.ranking])
    assert np.all(np.diff(dist) >= 0)
    pose = result.poses[result.ranking[0][0]]
    assert abs(pose.scale - 1.0) < SCALE_TOLERANCE
    assert abs(pose.rotation) <= 5.0


@pytest.mark.parametrize("tilt", [(8.0, 0.0), (0.0, -8.0)])
def test_tilted_section_finds_its_centre_plate_and_tilt(search, toy_reference, tilt):
    reference, _ = toy_reference
    plate = 20
    section = section_from_atlas(reference, plate, tilt)
    result = _run(search, section, plate, seed=3)
    best = result.poses[result.ranking[0][0]]
    assert abs(best.z - plate) <= PLATE_TOLERANCE, best
    # the tilt is found on a 6-degree grid, with its sign
    assert np.allclose(best.tilt, tilt, atol=6.0), best.tilt
    assert np.sign(best.tilt[0] + best.tilt[1]) == np.sign(tilt[0] + tilt[1])


def test_half_section_is_matched_at_its_true_scale(search, toy_reference):
    reference, _ = toy_reference
    plate, zoom = 16, 1.5
    half = section_from_atlas(reference, plate, crop=(0, 0, 0, 0.5))  # the right hemisphere cut away
    half = cv2.resize(half, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)
    result = _run(search, half, plate, seed=5)
    best = result.poses[result.ranking[0][0]]
    assert abs(best.plate - plate) <= PLATE_TOLERANCE
    assert abs(best.scale / zoom - 1.0) < SCALE_TOLERANCE, best.scale
    # the tissue centre lies in the left half of the plate, not at the plate's centre
    assert best.centre[1] < 0.42 * reference.shape[2]


def test_inverted_contrast_scores_the_same_plate_best(search, toy_reference):
    reference, _ = toy_reference
    plate = 24
    section = section_from_atlas(reference, plate)
    inverted = np.where(section > 0.02, 1.0 - section, 1.0).astype(np.float32)  # bright background
    a = _run(search, section, plate, seed=7)
    b = _run(search, inverted, plate, seed=8)
    assert abs(a.ranking[0][0] - plate) <= PLATE_TOLERANCE
    assert abs(b.ranking[0][0] - a.ranking[0][0]) <= PLATE_TOLERANCE


@pytest.mark.parametrize(
    "options, match",
    [
        ({"shortlits": 5}, "shortlits"),
        ({"work_size": 4}, "work_size"),
        ({"max_tilt": -1}, "max_tilt"),
        ({"scale_step": 1.0}, "scale_step"),
        ("fast", "rerank_options must be a dict"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(InputError, match=match):
        check_rerank_options(options)


def test_blank_section_raises(search):
    with pytest.raises(InputError, match="no tissue|constant"):
        search.search(
            np.zeros((40, 40), np.float32), [(p, 0.0) for p in range(search.n)], check_rerank_options({})
        )


def test_cancel_stops_the_search(search, toy_reference):
    import threading

    from napari_nephi import Cancelled
    from napari_nephi.core.progress import Progress

    reference, _ = toy_reference
    flag = threading.Event()
    flag.set()
    progress = Progress(None, flag)
    order = [(p, 0.0) for p in range(search.n)]
    with pytest.raises(Cancelled):
        search.search(section_from_atlas(reference, 10.0), order, check_rerank_options({}), progress)


def test_a_list_of_plates_is_searched_without_tilt(toy_reference):
    reference, _ = toy_reference
    plates = [reference[i] for i in range(0, reference.shape[0], 2)]  # a folder of plates: no volume
    search = PoseSearch(Plates.from_reference(plates))
    assert not search.is_volume
    truth = 8  # plate 16 of the volume
    section = cv2.resize(section_from_atlas(reference, 16.0), None, fx=1.3, fy=1.3)
    result = _run(search, section, truth, seed=11)
    best = result.poses[result.ranking[0][0]]
    assert abs(result.ranking[0][0] - truth) <= PLATE_TOLERANCE
    assert best.tilt == (0.0, 0.0) and best.z == float(best.plate)
    assert abs(best.scale / 1.3 - 1.0) < SCALE_TOLERANCE
