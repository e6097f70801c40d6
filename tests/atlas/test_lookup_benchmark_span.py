"""``benchmarks/atlas_lookup.py``'s "in span" column (session 41): the share of sections whose top plate lies
within the plates the section's own tissue spans (the generator's ``plate_range``), beside the rank of the
plate at the tissue's centre. On known cuts of a small phantom (no network, no search): a fake ranker puts a
chosen plate first."""

import math

import numpy as np
import pytest

from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom, section_from_atlas

from .._bench import import_benchmark

AL = import_benchmark("atlas_lookup")


@pytest.fixture(scope="module")
def cuts():
    """A small phantom, six oblique cuts (tilts up to 14 degrees) and six straight ones, with no warp,
    in-plane rotation or pixel-size change, so each cut's plane is known from ``tilt`` and ``index``."""
    ref, labels = brain_phantom((66, 48, 56), seed=0)
    plain = dict(partial=0, tears=0, rotation=0, scale=(1, 1), deform=0)
    oblique = atlas_queries(ref, labels, 6, seed=2, max_tilt=14, **plain)
    straight = atlas_queries(ref, labels, 6, seed=2, max_tilt=0, **plain)
    return ref, labels, oblique, straight


def _method(first: dict):
    """A ranker that puts ``first[id(image)]`` first and the other plates after it."""

    def rank(image):
        top = first[id(image)]
        return [top] + [p for p in range(66) if p != top]

    return dict(rank=rank, train_s=0.0, load=0.0, settings=None)


def test_in_span_bounds_inclusive_and_none_without_a_range():
    assert AL.in_span(10, (10, 14)) and AL.in_span(14, [10, 14]) and AL.in_span(12, (10, 14))
    assert not AL.in_span(9, (10, 14)) and not AL.in_span(15, (10, 14))
    assert AL.in_span(20, (20, 20)) and not AL.in_span(21, (20, 20))
    assert AL.in_span(3, None) is None


def test_span_of_a_known_oblique_cut_and_the_share_in_the_table(cuts):
    ref, labels, oblique, straight = cuts
    q = max(oblique, key=lambda q: math.hypot(*q["tilt"]))
    assert math.hypot(*q["tilt"]) > 7
    # the span read again from the same plane, cut independently: its tissue's atlas z, 5th-95th percentile
    _, lab, coords = section_from_atlas(
        ref, q["index"], tilt_degrees=q["tilt"], labels=labels, return_coords=True
    )
    lo, hi = np.percentile(coords[0][lab > 0], [5, 95])
    first, last = q["plate_range"]
    assert abs(first - math.floor(lo)) <= 1 and abs(last - math.ceil(hi)) <= 1
    assert last - first >= 3  # an oblique cut crosses several plates
    assert first < q["plate"] < last
    s = min(straight, key=lambda q: q["plate_range"][1] - q["plate_range"][0])
    assert s["plate_range"][1] - s["plate_range"][0] <= 1  # a straight cut of an unwarped brain: its plate

    # the oblique cut ranked with its span's last plate first (in span, not the truth), then again
    # with the plate beyond it (not in span); the straight cut with its plate's neighbour beyond its span
    beyond = s["plate_range"][1] + 1
    queries = {"oblique": [q, {**q, "image": q["image"].copy()}], "straight": [s]}
    picks = {
        id(queries["oblique"][0]["image"]): last,
        id(queries["oblique"][1]["image"]): last + 1,
        id(s["image"]): beyond,
    }
    res = AL.evaluate("fake", _method(picks), queries)
    rows = res["rows"]
    assert [r["in_span"] for r in rows] == [True, False, False]
    assert rows[0]["plate_range"] == [first, last] and rows[0]["rank"] > 0
    text = AL.table({"fake": res}, ["oblique", "straight"])
    summary = res["summary"]
    assert summary["all"]["in_span"] == pytest.approx(100 / 3)
    assert summary["oblique"]["in_span"] == pytest.approx(50.0)
    assert summary["straight"]["in_span"] == pytest.approx(0.0)
    assert summary["all"]["top1"] == pytest.approx(0.0)  # the headline truth is untouched
    assert "| fake | oblique | 2 |" in text and " | 50 | " in text and " | 33 | " in text
    # rows without a span (the Dice oracle's): no share, an empty cell
    assert AL.summarise([dict(rank=0, picked=3, plate=3)])["in_span"] is None
