"""``Dice fit`` of ``benchmarks/mito_benchmark.py`` (session 36): the chain Dice after the best single rigid
map of the whole aligned stack onto the truth, fitted on the true mitochondria's positions. A perfect
alignment put in a turned and shifted frame scores as the perfect one; a drift slope keeps its loss."""

import numpy as np
import pytest

from napari_nephi.synthetic import em_stack

from .._bench import import_benchmark

MB = import_benchmark("mito_benchmark")


def _rigid(theta: float, shift, centre) -> np.ndarray:
    """Homogeneous (y, x) rotation by ``theta`` about ``centre``, then ``shift``."""
    c, s = np.cos(theta), np.sin(theta)
    r = np.array([[c, -s], [s, c]])
    g = np.eye(3)
    g[:2, :2] = r
    g[:2, 2] = np.asarray(centre) - r @ np.asarray(centre) + np.asarray(shift)
    return g


@pytest.fixture(scope="module")
def stack():
    return em_stack(9, (192, 256), seed=13)


def _perfect(data, ref):
    """The true maps: aligned (the reference section's frame) -> section k."""
    return data["matrices"] @ np.linalg.inv(data["matrices"][ref])


def test_dice_fit_forgives_one_common_frame(stack):
    """Every section aligned exactly, then the whole stack turned by 0.06 rad and shifted by (5, -4) px: Dice
    ref falls, Dice fit stays the perfect alignment's and the fit finds the frame's turn."""
    ref = 4
    perfect = MB.evaluate(_perfect(stack, ref), stack, ref)
    centre = np.array(stack["stack"].shape[1:]) / 2.0
    g = _rigid(0.06, (5.0, -4.0), centre)
    moved = MB.evaluate(_perfect(stack, ref) @ g, stack, ref)
    assert moved["dice_ref"] < perfect["dice_ref"] - 0.1
    assert moved["dice_fit"] == pytest.approx(perfect["dice_ref"], abs=0.01)
    assert perfect["dice_fit"] == pytest.approx(perfect["dice_ref"], abs=0.005)
    fit = moved["frame_fit"]
    assert fit["rotation"] == pytest.approx(0.06, abs=0.004)
    assert fit["rms_after"] < 1.0 < 5.0 < fit["rms_before"]
    assert np.hypot(*fit["slope"]) < 0.05  # no slope along the stack


@pytest.mark.parametrize("ref", [4, 0])
def test_dice_fit_keeps_a_drift_slope(stack, ref):
    """A translation slope of 1.5 px per section along the stack is no common map: Dice fit stays far under
    the perfect alignment's (with the reference in the middle as low as Dice ref; at the end only the slope's
    mean, the frame's offset, is forgiven), and ``frame_fit`` reports the slope."""
    perfect = MB.evaluate(_perfect(stack, ref), stack, ref)
    slope = np.array([1.5, -1.5 / np.sqrt(2.0)])
    drifted = _perfect(stack, ref).copy()
    for k in range(len(drifted)):
        drifted[k] = drifted[k] @ _rigid(0.0, slope * (k - ref), (0.0, 0.0))
    res = MB.evaluate(drifted, stack, ref)
    assert res["dice_fit"] < perfect["dice_ref"] - 0.1
    # the slope left is reported (review 1 of session 36, A1): the true points sit at p - slope (k - ref)
    np.testing.assert_allclose(res["frame_fit"]["slope"], -slope, atol=0.1)
    assert res["frame_fit"]["slope_rms"] == pytest.approx(np.hypot(*slope) * np.std(np.arange(9)), rel=0.1)
    if ref == 4:  # centred: nothing common to take off
        assert res["dice_fit"] == pytest.approx(res["dice_ref"], abs=0.01)
    else:
        assert res["dice_ref"] < res["dice_fit"]
