"""``background_mask_dilation`` (session 43, opt-in): the dilation of the mitochondria masks that the
background reading of ``drift_correction="auto"`` leaves out, apart from the keypoints' ``mask_dilation``."""

import json

import cv2
import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.mito import align
from napari_nephi.engines.mito.align import align_stack
from napari_nephi.synthetic import em_stack

N = 32


@pytest.fixture(scope="module")
def drifting():
    """32 sections of 256 x 256 whose stage and mitochondria both drift: the background is read."""
    return em_stack(N, (256, 256), seed=3, placement_trend=0.5, organelle_drift=0.4)


def _run(d, **kw):
    return align_stack(d["stack"], masks=d["masks"], warp=False, workers=1, **kw)


def _auto(reg):
    return json.dumps(reg.metrics["drift_correction"], sort_keys=True, default=float)


def test_off_is_the_keypoint_masks_bit_for_bit(drifting):
    """None (the default) and a value equal to ``mask_dilation`` read the background through the keypoint
    masks themselves: the same matrices and the same drift record as the run without the option."""
    plain = _run(drifting)
    assert plain.metrics["drift_correction"]["auto"]["background"]["pairs"] >= 16  # it was read
    for value in (None, 12.0):
        reg = _run(drifting, background_mask_dilation=value)
        np.testing.assert_array_equal(reg.transform.matrices, plain.transform.matrices)
        assert _auto(reg) == _auto(plain)
        assert reg.settings["background_mask_dilation"] == value
        assert reg.settings["background_mask_dilation_applied"] == 12.0
    assert plain.settings["background_mask_dilation"] is None


def test_another_dilation_changes_the_reading_and_nothing_before_it(drifting):
    """0 px: the placement's pairs are the default's (the keypoints keep 12 px), the background reads other
    pixels (another slope), and the settings record it."""
    plain = _run(drifting)
    reg = _run(drifting, background_mask_dilation=0)
    for a, b in zip(reg.metrics["report"], plain.metrics["report"]):
        a, b = dict(a), dict(b)
        a.pop("drift_shift", None), b.pop("drift_shift", None)  # the detrend's own, after the reading
        assert a == b
    mine = reg.metrics["drift_correction"]["auto"]["background"]
    theirs = plain.metrics["drift_correction"]["auto"]["background"]
    assert mine["pairs"] == theirs["pairs"] and mine["slope"] != theirs["slope"]
    assert reg.settings["mask_dilation"] == 12.0 and reg.settings["background_mask_dilation_applied"] == 0.0
    # review 1 of session 43 (A2): where no background is read, nothing is recorded as applied
    none = _run(drifting, background_mask_dilation=0, drift_correction="none")
    assert none.settings["background_mask_dilation"] == 0.0
    assert none.settings["background_mask_dilation_applied"] is None


def test_the_background_masks_are_the_raw_masks_dilated_by_the_option(drifting):
    """The masks handed to the background: the given masks at the working scale dilated by the option's disc
    (kept at the keypoint stage or made again, alike), the keypoint masks still dilated by ``mask_dilation``;
    a ``dilation`` asked per call wins (the twin of ``benchmarks/mito_paired.py``)."""
    d = drifting
    shape = d["stack"].shape[1:]
    opts = align.build_options(
        shape, "mito", "brisk", "bf", "homography", None, 3.0, 0.8, 1000, None, 1.0, 12.0, 6, 10, (), 2,
        None, 10, 1.5, masks_given=True, background_mask_dilation=4.0,
    )  # fmt: skip
    sections = align._Sections(d["stack"], d["masks"], opts, (None, None))
    k = 5
    work, _, valid = sections.work_image(k)
    raw = sections._raw_mask(k, work)

    assert opts.scale == 1.0  # 374 px sections: the work scale is 1

    def disc(r):
        return cv2.dilate(raw, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) & valid

    keypoints = sections.keypoint_mask(k, work, valid)
    np.testing.assert_array_equal(keypoints, disc(12))
    made = sections.background_mask(k)
    np.testing.assert_array_equal(made, disc(4))
    sections.keep_masks = {k}
    sections.keypoint_mask(k, work, valid)
    np.testing.assert_array_equal(sections.background_mask(k), made)  # kept, alike
    np.testing.assert_array_equal(sections.background_mask(k, dilation=0), raw & valid)
    np.testing.assert_array_equal(sections.background_mask(k, dilation=12.0), keypoints)
    assert raw.sum() < made.sum() < keypoints.sum()


def test_bad_values_and_no_masks_are_refused(drifting):
    d = drifting
    with pytest.raises(InputError, match="background_mask_dilation"):
        _run(d, background_mask_dilation=-1)
    with pytest.raises(InputError, match="background_mask_dilation"):
        _run(d, background_mask_dilation="wide")
    with pytest.raises(InputError, match="needs masks"):
        align_stack(d["stack"], detector="orb", descriptor="orb", warp=False, background_mask_dilation=2)
