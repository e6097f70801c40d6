"""``kept_reading="local-tracks"`` (session 46, opt-in): the mitochondria's drift through the tissue (session
45's local reading) with the sections' borders left out by 12 px (``border``) and an se that counts each
mitochondrion, followed through depth, as one sample (``tracks=True``)."""

import cv2
import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.mito import align
from napari_nephi.engines.mito.align import _auto_decision, align_stack
from napari_nephi.engines.mito.organelles import MIN_TRACKS, _tracks, relative_motion, track_se
from napari_nephi.synthetic import em_stack

SIDE, N = 512, 8


def _texture(rng, side=SIDE):
    return cv2.GaussianBlur(rng.normal(0.0, 1.0, (side, side)).astype(np.float32), (0, 0), 1.5)


def _matrix(dy, dx, angle=0.0):
    """OpenCV's (x, y) 2 x 3 map: a turn by ``angle`` rad about the centre, then a move by (dy, dx) px."""
    c = (SIDE - 1) / 2.0
    m = cv2.getRotationMatrix2D((c, c), float(np.degrees(angle)), 1.0)
    m[:, 2] += (dx, dy)
    return m


def _moved(img, dy, dx, angle=0.0):
    """``img`` with its content at ``p`` moved to ``_matrix(dy, dx, angle) p`` (``cv2.warpAffine``)."""
    m = _matrix(dy, dx, angle)
    return cv2.warpAffine(img, m, (SIDE, SIDE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _stack(drift, stage=(0.5, -0.3), seed=0):
    """N sections of a still tissue texture with six mitochondria (their own texture) that move through it by
    ``drift`` px per section; every section also moves as a whole by ``stage`` px per section (undistorted).
    Returns (stack, masks)."""
    rng = np.random.default_rng(seed)
    tissue, inner = _texture(rng), _texture(rng)
    centres = np.array([[y, x] for y in (150.0, 360.0) for x in (110.0, 256.0, 400.0)])
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    stack, masks = [], []
    for k in range(N):
        inside = np.zeros((SIDE, SIDE), bool)
        for cy, cx in centres + np.asarray(drift) * k:
            inside |= ((yy - cy) / 44.0) ** 2 + ((xx - cx) / 30.0) ** 2 <= 1.0
        img = np.where(inside, 0.35 + 0.04 * _moved(inner, drift[0] * k, drift[1] * k), 0.62 + 0.05 * tissue)
        img = _moved(cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.7), stage[0] * k, stage[1] * k)
        msk = _moved(inside.astype(np.float32), stage[0] * k, stage[1] * k) > 0.5
        stack.append(np.clip(img * 255 + rng.normal(0.0, 3.0, img.shape), 1, 255).astype(np.uint8))
        masks.append(msk.astype(np.uint8))
    return np.array(stack), np.array(masks)


@pytest.mark.parametrize(("drift", "drifts"), [((0.6, -0.4), True), ((0.0, 0.0), False)])
def test_the_tracked_reading_finds_the_drift_through_still_tissue_on_moving_sections(drift, drifts):
    """Sections that move as a whole by (0.5, -0.3) px per section, placed by the identity (so the placement
    is off by that motion): the mitochondria's motion through the tissue is read within 0.1 px per section and
    stands out of 0 only where they drift. The six mitochondria are followed through depth (6 tracks) and
    the se is the larger of the blocks' and the tracks' per axis."""
    stack, masks = _stack(drift)
    eye = np.repeat(np.eye(3)[None], N, axis=0)
    r = relative_motion(
        lambda k: stack[k], lambda k: masks[k], eye, (SIDE, SIDE), np.ones(N, bool), tracks=True, border=12
    )
    assert r["readings"] == 6 * (N - 1) and r["tracks"] == 6
    np.testing.assert_allclose(r["slope"], drift, atol=0.1)
    assert r["drifts"] is drifts
    assert np.allclose(r["se"], np.maximum(r["se_blocks"], r["se_tracks"]))


def test_tracks_link_readings_through_depth_and_count_each_as_one_sample():
    """Readings ``(k, i, j)`` (pair k, label i matched to label j of section k + 1) chain where the next
    pair's reading starts at j. The tracks' se of a mean over equal tracks is their means' spread / sqrt(T); a
    mitochondrion whose readings all sit off the rest (a persistent error) widens it, where blocks of pairs,
    each holding every track, would not see it; too few tracks give inf."""
    reads = [(0, 1, 2), (1, 2, 3), (2, 3, 1), (0, 2, 1), (1, 1, 1), (2, 1, 5), (2, 9, 9)]
    t = _tracks(reads)
    assert t[0] == t[1] == t[2] and t[3] == t[4] == t[5] and len({t[0], t[3], t[6]}) == 3
    rng = np.random.default_rng(1)
    offsets = np.array([[0.3, 0.0], [-0.1, 0.2], [0.0, -0.2], [0.2, 0.1], [-0.3, 0.0], [0.1, 0.1]])
    ids = np.repeat(np.arange(6), 40)
    values = offsets[ids] + rng.normal(0.0, 0.05, (240, 2))
    means = np.array([values[ids == i].mean(0) for i in range(6)])
    np.testing.assert_allclose(track_se(values, ids), means.std(0, ddof=1) / np.sqrt(6), rtol=1e-9)
    blocks = np.array(
        [values[np.arange(240) % 40 // 5 == b].mean(0) for b in range(8)]
    )  # every track in each
    assert np.all(track_se(values, ids) > 3 * blocks.std(0, ddof=1) / np.sqrt(8))
    assert np.all(np.isinf(track_se(values[ids < MIN_TRACKS - 1], ids[ids < MIN_TRACKS - 1])))


class Reader:
    """A local reading returning ``slope``; records the keyword arguments of each call."""

    def __init__(self, slope, se=(0.03, 0.03)):
        self.slope, self.se, self.kw = list(slope), list(se), []

    def __call__(self, matrices, use, **kw):
        self.kw.append(kw)
        return {
            "slope": list(self.slope),
            "se": list(self.se),
            "readings": 500,
            "placement_error": [0.0, 0.0],
        }


@pytest.mark.parametrize(("value", "kw"), [("local-tracks", {"tracks": True, "border": 12}), ("local", {})])
def test_the_decision_asks_the_reader_for_the_value_s_reading(value, kw):
    """``"local-tracks"`` reads with the 12 px border and the tracks' se; ``"local"`` as in session 45 (no
    keyword: the call of before). Either way only the local "both" changes the decision."""
    reader = Reader([-0.3, 0.0])
    test = {"p": 1e-9, "slope": [0.5, 0.0]}
    still = {"slope": [0.05, 0.0], "se": [0.1, 0.1], "pairs": 64}
    apply, slope = _auto_decision(
        test, None, np.ones(160, bool), lambda m, u, **_: dict(still), kept=reader, kept_reading=value
    )
    assert reader.kw == [kw]
    assert apply and np.allclose(slope, [0.3, 0.0]) and test["decided_by"] == "kept-local"


def test_the_engine_records_it_and_refuses_bad_values():
    """``align_stack(kept_reading="local-tracks")`` is recorded in the settings. On session 45's pinned stack
    (48 sections, the background keeps: "sections") no mitochondrion is large enough to read at 256 x 256
    ("unmeasured"), so the matrices are the default's, bit for bit. A misspelt value and a run without masks
    are refused; ``align-em --option`` reaches it."""
    import argparse

    from napari_nephi.cli.em import _align_options, add_parser

    d = em_stack(48, (256, 256), seed=3, placement_trend=0.5)
    base = align_stack(d["stack"], masks=d["masks"], warp=False, workers=1)
    reg = align_stack(d["stack"], masks=d["masks"], warp=False, workers=1, kept_reading="Local-Tracks")
    assert reg.settings["kept_reading"] == "local-tracks"
    assert np.array_equal(reg.transform.matrices, base.transform.matrices)
    auto = reg.metrics["drift_correction"]["auto"]
    assert auto["background"]["decision"] == "sections"
    assert auto["kept_reading"]["decision"] == "unmeasured"
    with pytest.raises(InputError, match="kept_reading must be None"):
        align_stack(d["stack"], masks=d["masks"], warp=False, workers=1, kept_reading="section")
    with pytest.raises(InputError, match="needs masks"):
        align_stack(
            d["stack"], detector="orb", descriptor="orb", warp=False, workers=1, kept_reading="local-tracks"
        )
    p = argparse.ArgumentParser(prog="napari-nephi")
    add_parser(p.add_subparsers(dest="command", required=True))
    kw = _align_options(
        p.parse_args(["align-em", "s.tif", "-o", "o", "--option", "kept_reading=local-tracks"])
    )
    assert kw["kept_reading"] == "local-tracks" and "kept_reading" in align.STACK_OPTIONS


def test_a_tissue_tile_on_the_section_s_border_reads_outward_unless_the_border_is_left_out():
    """Session 46's diagnosis: on the truth placement of a rotated stack, a tissue tile on the section's
    border (the local reading's tissue part, the border left out by 4 px) reads the still tissue moving
    outward by about 1.4 px, pair after pair (the correlation's 8 px search reaches the section's edge). With
    the 12 px that ``border=12`` leaves out, the mean of the same tiles is within 0.6 px of 0. The tiles: the
    top row of the 768 x 1024 content (y 200-296, the content from y 250), 5 neighbour pairs."""
    from napari_nephi.engines.mito import organelles as org

    d = em_stack(6, (768, 1024), seed=98, pad=250, placement_trend=0.5)
    n, h, w = d["stack"].shape
    placed = [org._placed(d["stack"][k], d["matrices"][k], (h, w)) for k in range(n)]
    f32 = [p.astype(np.float32) for p in placed]
    band = [cv2.GaussianBlur(p, (0, 0), 1.0) - cv2.GaussianBlur(p, (0, 0), 2.0) for p in f32]
    means = {}
    for side in (9, 25):  # relative_motion's erosion: 4 px (border None), 2 * 12 + 1 (border=12)
        steps = []
        for k in range(n - 1):
            inside = (placed[k] > 0).view(np.uint8) & (placed[k + 1] > 0).view(np.uint8)
            valid = cv2.erode(inside, np.ones((side, side), np.uint8)).astype(np.float32)
            steps += [org.tile_step(band[k], valid, band[k + 1], 200, x0) for x0 in range(296, 1200, 96)]
        means[side] = np.mean([s for s in steps if s is not None], axis=0)
    assert means[9][0] < -0.8  # outward (up) on the top border
    assert abs(means[25][0]) < 0.6
