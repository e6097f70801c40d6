"""``track_shift`` (session 44, opt-in): the placement moved along the mitochondria's own refined tracks by
one velocity for the stack (the lag of maps fitted to the mitochondria and the still tissue around them)."""

import numpy as np
import pytest

from napari_nephi import InputError
from napari_nephi.engines.mito import align
from napari_nephi.engines.mito.align import align_stack
from napari_nephi.synthetic import em_stack

from .._bench import import_benchmark

T = import_benchmark("mito_truth_read")


def _run(d, **kw):
    return align_stack(d["stack"], masks=d["masks"], warp=False, workers=1, **kw)


@pytest.fixture(scope="module")
def drifting():
    """64 sections of 256 x 256 whose mitochondria drift (0.4), the generator's mean drift captured."""
    seen = {}
    add = T.em_module._add_drift

    def capture(mitos, *a):
        out = add(mitos, *a)
        seen["v"] = np.mean([m.drift[0] for m in mitos], axis=0)
        return out

    T.em_module._add_drift = capture
    try:
        d = em_stack(64, (256, 256), seed=3, organelle_drift=0.4)
    finally:
        T.em_module._add_drift = add
    d["v"] = np.asarray(seen["v"], np.float64)
    return d


def test_off_is_bit_for_bit_the_code_before_the_option():
    """None (the default) runs the code of ea17525 (before the option) bit for bit: these values were printed
    there (``git worktree add ... ea17525``, PYTHONPATH to its src) on this stack with the defaults, and the
    settings record None and the metrics hold no ``track_shift``."""
    d = em_stack(32, (256, 256), seed=3, placement_trend=0.5, organelle_drift=0.4)
    for kw in ({}, {"track_shift": None}):
        reg = _run(d, **kw)
        m = reg.transform.matrices
        assert m[-1].tolist() == [
            [-0.21564851191128795, 0.9764714430584238, 39.56317989166816],
            [-0.9764729317287687, -0.2156518573390615, 402.21767358848666],
            [0.0, 0.0, 1.0],
        ]
        assert m[13].tolist() == [
            [0.3167381337908821, 0.9485133296588828, -49.2583020453083],
            [-0.9485121767904422, 0.31673899266245126, 305.34849488320214],
            [0.0, 0.0, 1.0],
        ]
        slope = reg.metrics["drift_correction"]["auto"]["background"]["slope"]
        assert list(slope) == [0.1672730781195133, 0.374851224930716]
        assert reg.settings["track_shift"] is None and "track_shift" not in reg.metrics


def _lag_along(d, matrices):
    """The placement's lag along the mitochondria's drift (px per section, +: follows it less) and its
    jitter rms ((y, x) px) against the truth placement (session 41's split)."""
    n = len(matrices)
    truth = T.truth_placement(d["matrices"], d["v"], 0)
    parts = T.placement_parts(truth, matrices, np.ones(n, bool), (256, 256), 0)
    part = T.expected_background(d["v"], T.truth_placement(d["matrices"], d["v"])[0])
    return float(parts["lag"] @ part / np.linalg.norm(part)), parts["jitter_rms"]


def test_the_lag_along_the_drift_is_recovered_and_the_jitter_kept(drifting):
    """A known drift of the mitochondria (|v| 0.44 px per section): the defaults' placement lags 0.076 px per
    section behind it; with ``track_shift="stack"`` the lag is under a third of that and the jitter (what is
    left off the straight line) stays within 5 % (session 43's per-pair shift raised it 13-39 %)."""
    base = _run(drifting, drift_correction="none")
    cand = _run(drifting, drift_correction="none", track_shift="stack")
    lag0, jit0 = _lag_along(drifting, base.transform.matrices)
    lag1, jit1 = _lag_along(drifting, cand.transform.matrices)
    assert lag0 > 0.05
    assert abs(lag1) < lag0 / 3
    np.testing.assert_array_less(jit1, 1.05 * jit0)
    rec = cand.metrics["track_shift"]
    assert rec["applied"] and rec["pairs_read"] >= align.TRACK_SHIFT_MIN_PAIRS and rec["option"] == "stack"
    assert cand.settings["track_shift"] == "stack"
    # the velocity read points with the mitochondria's drift (aligned frame, (y, x))
    frame = T.truth_placement(drifting["matrices"], drifting["v"])[0]
    along = -T.expected_background(drifting["v"], frame)
    assert np.dot(rec["velocity"], along) > 0


def test_the_chain_moves_by_the_straight_line_it_reports(drifting):
    """With the chain (no solve after it), the placement is the defaults' moved by ``(k - ref) v`` in the
    aligned frame, ``v`` the recorded velocity, at every section."""
    base = _run(drifting, drift_correction="none", neighbours=1)
    cand = _run(drifting, drift_correction="none", neighbours=1, track_shift="stack")
    v = np.asarray(cand.metrics["track_shift"]["velocity"])
    for k, (b, c) in enumerate(zip(base.transform.matrices, cand.transform.matrices)):
        t = np.eye(3)
        t[:2, 2] = k * v
        want = b @ t
        np.testing.assert_allclose(c, want / want[2, 2], atol=1e-9)
    assert abs(v).max() > 0.01


def test_too_few_pairs_move_nothing():
    """12 sections: 11 neighbour pairs, fewer than the 16 readings needed; the placement is the defaults',
    the record and a note say why."""
    d = em_stack(12, (256, 256), seed=5, organelle_drift=0.4)
    base = _run(d, drift_correction="none")
    cand = _run(d, drift_correction="none", track_shift="stack")
    np.testing.assert_array_equal(cand.transform.matrices, base.transform.matrices)
    rec = cand.metrics["track_shift"]
    assert not rec["applied"] and rec["velocity"] is None and rec["pairs_read"] <= 11
    assert any("track_shift" in note for note in cand.metrics["notes"])


def test_decision_reads_the_shifted_placement_and_keeps_the_solved_one_where_it_keeps():
    """``"decision"``: on a stack whose stage and mitochondria both drift, the background read on the shifted
    placement moves further along its slope than the defaults' (the placement follows the mitochondria more)
    and "both" removes it; where the stage alone drifts the decision keeps the placement, which is then the
    defaults' bit for bit (and the record says nothing was applied)."""
    both = em_stack(32, (256, 256), seed=3, placement_trend=0.5, organelle_drift=0.4)
    base, cand = _run(both), _run(both, track_shift="decision")
    b = np.asarray(base.metrics["drift_correction"]["auto"]["background"]["slope"])
    c = np.asarray(cand.metrics["drift_correction"]["auto"]["background"]["slope"])
    assert (
        cand.settings["drift_correction_applied"] == "detrend-slope"
        and cand.metrics["track_shift"]["applied"]
    )
    assert np.linalg.norm(c) > np.linalg.norm(b) + 0.05 and c @ b > 0
    stage = em_stack(32, (256, 256), seed=3, placement_trend=0.5)
    base, cand = _run(stage), _run(stage, track_shift="decision")
    assert cand.settings["drift_correction_applied"] == "none" and not cand.metrics["track_shift"]["applied"]
    assert cand.metrics["track_shift"]["velocity"] is not None  # read, and not used
    np.testing.assert_array_equal(cand.transform.matrices, base.transform.matrices)
    # without the background decision (drift_correction "none") it moves nothing, and says so
    none = _run(stage, track_shift="decision", drift_correction="none")
    np.testing.assert_array_equal(
        none.transform.matrices, _run(stage, drift_correction="none").transform.matrices
    )
    assert any("track_shift='decision'" in note for note in none.metrics["notes"])


def test_bad_values_are_refused():
    d = em_stack(6, (128, 128), seed=1)
    for bad in ("pair", 1, True, "none "):
        with pytest.raises(InputError, match="track_shift"):
            _run(d, track_shift=bad)
    with pytest.raises(InputError, match="track_shift"):  # no masks
        align_stack(d["stack"], detector="orb", descriptor="orb", warp=False, track_shift="stack")
    with pytest.raises(InputError, match="refine"):
        _run(d, track_shift="stack", refine=False)
    assert "track_shift" in align.STACK_OPTIONS


def test_align_em_option_reaches_the_engine():
    """``align-em --option track_shift=stack`` gives the engine the option (the generic ``--option``)."""
    import argparse

    from napari_nephi.cli.em import _align_options, add_parser

    p = argparse.ArgumentParser(prog="napari-nephi")
    add_parser(p.add_subparsers(dest="command", required=True))
    kw = _align_options(p.parse_args(["align-em", "s.tif", "-o", "out", "--option", "track_shift=stack"]))
    assert kw["track_shift"] == "stack"
