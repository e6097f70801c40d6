"""The mitochondria's drift read against the tissue right around them (engines/mito/organelles.py,
session 32; ``organelle_reading="local"``)."""

import cv2
import numpy as np
import pytest

from napari_nephi.core.errors import InputError
from napari_nephi.engines.mito import align_stack
from napari_nephi.engines.mito.align import _auto_decision
from napari_nephi.engines.mito.organelles import relative_motion

SIDE, N = 384, 12


def _smooth_field(rng, amplitude):
    """A smooth random displacement (2, SIDE, SIDE) of ``amplitude`` px rms per axis, ~200 px long."""
    coarse = rng.normal(0.0, 1.0, (2, 4, 4)).astype(np.float32)
    f = np.stack([cv2.resize(c, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC) for c in coarse])
    return f * np.float32(amplitude / max(float(f.std()), 1e-6))


def _stack(drift, seed=0, distortion=1.5, stage=(0.5, -0.3)):
    """Sections of a fixed tissue texture with four elliptic mitochondria (their own texture) that move
    through it by ``drift`` px per section; every section also moves as a whole (``stage`` px per
    section) and carries its own smooth distortion (``distortion`` px rms). Returns (stack, masks)."""
    rng = np.random.default_rng(seed)
    tissue = cv2.GaussianBlur(rng.normal(0.0, 1.0, (SIDE, SIDE)).astype(np.float32), (0, 0), 1.5)
    inner = cv2.GaussianBlur(rng.normal(0.0, 1.0, (SIDE, SIDE)).astype(np.float32), (0, 0), 1.5)
    centres = np.array([[110.0, 110.0], [110.0, 270.0], [270.0, 110.0], [270.0, 270.0]])
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    stack, masks = [], []
    for k in range(N):
        c = centres + np.asarray(drift) * k
        inside = np.zeros((SIDE, SIDE), bool)
        for cy, cx in c:
            inside |= ((yy - cy) / 40.0) ** 2 + ((xx - cx) / 28.0) ** 2 <= 1.0
        # the mitochondria's texture moves with them (sampled at p - drift k)
        shift = np.float32([[1, 0, drift[1] * k], [0, 1, drift[0] * k]])
        moved = cv2.warpAffine(inner, shift, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT)
        img = np.where(inside, 0.35 + 0.04 * moved, 0.62 + 0.05 * tissue)
        img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.7)
        # the section as acquired: moved by the stage and distorted (sampled at p - stage k + d(p))
        d = _smooth_field(rng, distortion)
        map_y = yy - np.float32(stage[0] * k) + d[0]
        map_x = xx - np.float32(stage[1] * k) + d[1]
        sec = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        msk = cv2.remap(inside.astype(np.uint8), map_x, map_y, cv2.INTER_NEAREST)
        stack.append(np.clip(sec * 255 + rng.normal(0.0, 3.0, sec.shape), 1, 255).astype(np.uint8))
        masks.append(msk)
    return np.array(stack), np.array(masks)


@pytest.mark.parametrize(("drift", "drifts"), [((0.6, -0.4), True), ((0.0, 0.0), False)])
def test_the_local_reading_finds_the_mitochondria_drift_on_distorted_moving_sections(drift, drifts):
    """Distorted sections (1.5 px rms each) that also move as a whole, placed by the identity (so the
    placement is off by the stage drift and the distortion): the mitochondria's motion through the
    tissue is read within 0.15 px per section, and stands out of 0 only where they drift."""
    stack, masks = _stack(drift)
    eye = np.repeat(np.eye(3)[None], N, axis=0)
    r = relative_motion(lambda k: stack[k], lambda k: masks[k], eye, (SIDE, SIDE), np.ones(N, bool))
    assert r["readings"] >= 4 * (N - 1) - 4
    np.testing.assert_allclose(r["slope"], drift, atol=0.15)
    assert r["drifts"] is drifts


def test_the_decision_classifies_the_local_reading_against_the_trend():
    """``_auto_decision`` with the local reading: its drift, negated (the placement followed the
    mitochondria), is classified against the trend as the background's slope is: equal to the trend
    removes the whole trend, 0 keeps it, neither removes the negated drift; with too few readings the
    background decides as before (none here: the trend test alone)."""
    test = {"p": 1e-20, "slope": [0.3, 0.0]}
    use = np.ones(40, bool)
    mats = np.repeat(np.eye(3)[None], 40, axis=0)

    def reading(v, readings=100):
        return lambda m, u: {"slope": list(v), "se": [0.02, 0.02], "readings": readings, "drifts": True}

    assert _auto_decision(dict(test), mats, use, None, reading((-0.3, 0.0))) == (True, None)
    assert _auto_decision(dict(test), mats, use, None, reading((0.0, 0.01))) == (False, None)
    apply, slope = _auto_decision(dict(test), mats, use, None, reading((-0.15, 0.1)))
    assert apply and np.allclose(slope, [0.15, -0.1])
    apply, slope = _auto_decision(dict(test), mats, use, None, reading((0.0, 0.0), readings=3))
    assert apply and slope is None


def test_organelle_reading_is_checked_and_recorded():
    """An unknown reading is an InputError naming the choices; the settings record the one asked, and
    "local" by default."""
    stack, masks = _stack((0.0, 0.0), distortion=0.0)
    with pytest.raises(InputError, match="background, local"):
        align_stack(stack[:4], organelle_reading="nearby")
    reg = align_stack(stack[:4], masks=masks[:4], warp=False, workers=1, organelle_reading="background")
    assert reg.settings["organelle_reading"] == "background"
    # the default since session 32 (the lead's held-out check, docs/mito.md)
    reg = align_stack(stack[:4], masks=masks[:4], warp=False, workers=1)
    assert reg.settings["organelle_reading"] == "local"
    # what decided (session 33, review 2 of session 32 A5): 4 sections are too few for a drift decision,
    # so neither reading ran, although "local" was asked (before session 33 only the choice was recorded)
    assert reg.settings["organelle_reading_applied"] == "none"


def test_the_settings_say_which_reading_decided():
    """``organelle_reading_applied`` (session 33; review 2 of session 32, A5): what decided, as
    ``_auto_decision`` records it in the trend test's dict (``decided_by``). "local" only where the local
    reading decided; with too few local readings the next reader decides: the trend test alone here (no
    background given), the background where there is one (here too few steps: "unmeasured"); without
    a trend nobody reads ("none"). Review 1 of session 33 (A3): the trend test deciding alone is named."""
    from napari_nephi.engines.mito.align import _organelle_reading_applied as applied

    use = np.ones(40, bool)
    mats = np.repeat(np.eye(3)[None], 40, axis=0)

    def reading(v, readings=100):
        return lambda m, u: {"slope": list(v), "se": [0.02, 0.02], "readings": readings, "drifts": True}

    def background(m, u, second=False, trend=None):
        return {"slope": [0.0, 0.0], "se": [1.0, 1.0], "pairs": 0, "planned": 2}

    def decided(bg, local, p=1e-20):
        test = {"p": p, "slope": [0.3, 0.0]}
        _auto_decision(test, mats, use, bg, local)
        return applied({"method": "detrend", "auto": test})

    assert decided(None, reading((-0.15, 0.1))) == "local"  # "both"
    assert decided(background, reading((0.0, 0.01))) == "local"  # "sections": kept, still the local reading's
    assert decided(None, reading((0.0, 0.0), readings=3)) == "trend-test"
    assert decided(background, reading((0.0, 0.0), readings=3)) == "background"
    assert decided(background, None) == "background"
    assert decided(background, reading((-0.3, 0.0)), p=0.5) == "none"  # no trend: nobody read
    assert applied(None) == "none" and applied({"method": "none", "skipped": "too few"}) == "none"


def test_a_mitochondrion_is_matched_by_overlap_not_by_its_number():
    """Review 2 of session 32 (A2): the two sections of a pair are labelled apart, so the size check "in
    both sections" must find the other section's mitochondrion by overlap. Here the same mitochondrion
    (40 x 28 px half-axes, 3500 px) is number 1 in ``a`` and number 2 in ``b``, where number 1 is a blob
    of 100 px: matched by number (before session 33) it was dropped as too small in ``b``; matched by
    overlap it is read, and its step through the tissue (0 here: ``b`` is ``a`` moved by 1 px as a whole)
    is 0 within 0.15 px (-0.04, +0.09 here; the tiles' sub-pixel peaks)."""
    from napari_nephi.engines.mito.organelles import match, pair_motion

    stack, masks = _stack((0.0, 0.0), distortion=0.0, stage=(0.0, 0.0))
    smooth = [
        [cv2.GaussianBlur(s.astype(np.float32), (0, 0), sigma) for sigma in (1.0, 2.0)] for s in stack[:2]
    ]
    band = [fine - coarse for fine, coarse in smooth]
    a_lab = cv2.connectedComponents(masks[0].astype(np.uint8))[1]
    first = (a_lab == a_lab[110, 110]).astype(np.uint8)  # the upper left mitochondrion
    a_lab = first.astype(np.int32)
    b_lab = 2 * first.astype(np.int32)
    b_lab[350:360, 10:20] = 1  # another, small one, that happens to be number 1 in b
    b = np.roll(band[1], 1, axis=1)  # everything moved by one pixel: the mitochondrion not through the tissue
    b_lab = np.roll(b_lab, 1, axis=1)
    assert match(b_lab, first) == 2 and match(b_lab, np.zeros_like(first)) == 0
    valid = np.ones(first.shape, np.uint8)
    steps = pair_motion(band[0], a_lab, b, b_lab, valid)
    assert len(steps) == 1 and np.abs(steps[0]).max() < 0.15


def test_the_tissue_step_read_over_a_grid_of_tiles():
    """Session 34 (``organelle_reading="local-grid"``, opt-in): the tissue's step of each tile may be the
    median over tissue tiles on a grid around it (the tissue's own content changes between sections, so one
    tile's tissue step is noisy on the benchmark's stacks). Here the four mitochondria move by (2, -1) px
    through a still tissue: both readings give (2, -1) within 0.15 px (grid: (1.93-1.96, -0.96..-1.00));
    an unknown way is refused, and ``align_stack`` records the choice."""
    from napari_nephi.engines.mito.organelles import pair_motion

    stack, masks = _stack((2.0, -1.0), distortion=0.0, stage=(0.0, 0.0))
    band = [
        cv2.GaussianBlur(s.astype(np.float32), (0, 0), 1.0)
        - cv2.GaussianBlur(s.astype(np.float32), (0, 0), 2.0)
        for s in stack[:2]
    ]
    a_lab, b_lab = (cv2.connectedComponents(m.astype(np.uint8))[1] for m in masks[:2])
    valid = np.ones(a_lab.shape, np.uint8)
    for way in ("tile", "grid"):
        steps = pair_motion(band[0], a_lab, band[1], b_lab, valid, way)
        assert len(steps) == 4
        np.testing.assert_allclose(steps, [[2.0, -1.0]] * 4, atol=0.15)
    with pytest.raises(InputError, match="tissue_read"):
        pair_motion(band[0], a_lab, band[1], b_lab, valid, "ring")
    eye = np.repeat(np.eye(3)[None], 2, axis=0)
    r = relative_motion(
        lambda k: stack[k], lambda k: masks[k], eye, (SIDE, SIDE), np.ones(2, bool), tissue="grid"
    )
    assert r["tissue"] == "grid" and r["readings"] == 4  # recorded in the drift decision's metrics
    with pytest.raises(InputError, match="tissue must be one of"):  # up front, even where no pair is read
        relative_motion(
            lambda k: stack[k], lambda k: masks[k], eye, (SIDE, SIDE), np.zeros(2, bool), tissue="ring"
        )
    reg = align_stack(stack[:4], masks=masks[:4], warp=False, workers=1, organelle_reading="local-grid")
    assert reg.settings["organelle_reading"] == "local-grid"


def test_the_placement_error_read_at_the_mitochondria(monkeypatch):
    """Session 36 (``organelles.BOTH_SLOPE``, opt-in "placement"): beside the mitochondria's drift through the
    tissue, the reading gives the placement's error slope at the mitochondria (their own step in the aligned
    frame less that drift). Here the sections are placed by the identity while they move as a whole by (0.5,
    -0.3) px per section and the mitochondria drift (0.6, -0.4) through the tissue: the drift is read within
    0.15 px and the placement's error is the sections' motion, (0.5, -0.3) within 0.15 px (not -drift, which
    the placement would carry had it followed the mitochondria). Where the local reading decides "both",
    ``_auto_decision`` removes ``-slope`` ("drift", the default) or ``placement_error`` ("placement"),
    recorded as ``both_slope``; another value is refused."""
    stack, masks = _stack((0.6, -0.4), distortion=0.3)
    eye = np.repeat(np.eye(3)[None], N, axis=0)
    r = relative_motion(lambda k: stack[k], lambda k: masks[k], eye, (SIDE, SIDE), np.ones(N, bool))
    np.testing.assert_allclose(r["slope"], (0.6, -0.4), atol=0.15)
    np.testing.assert_allclose(r["placement_error"], (0.5, -0.3), atol=0.15)
    assert np.all(np.isfinite(r["placement_error_se"]))

    from napari_nephi.engines.mito import organelles

    use = np.ones(40, bool)
    mats = np.repeat(np.eye(3)[None], 40, axis=0)
    read = {"slope": [-0.15, 0.1], "se": [0.02, 0.02], "readings": 100, "drifts": True}
    read["placement_error"] = [0.12, -0.07]
    for way, removed in (("drift", [0.15, -0.1]), ("placement", [0.12, -0.07])):
        monkeypatch.setattr(organelles, "BOTH_SLOPE", way)
        test = {"p": 1e-20, "slope": [0.3, 0.0]}
        apply, slope = _auto_decision(test, mats, use, None, lambda m, u: dict(read))
        assert apply and np.allclose(slope, removed)
        assert test["organelles"]["decision"] == "both" and test["organelles"]["both_slope"] == way
    monkeypatch.setattr(organelles, "BOTH_SLOPE", "mitochondria")
    with pytest.raises(InputError, match="BOTH_SLOPE"):
        _auto_decision({"p": 1e-20, "slope": [0.3, 0.0]}, mats, use, None, lambda m, u: dict(read))
