"""``benchmarks/mito_truth_read.py`` (session 40; session 38 A2's truth read, committed): the placement that
follows the mitochondria perfectly, in the generator's frame and in a reference section's."""

import inspect
import json

import numpy as np
import pytest

from napari_nephi.engines.mito.detrend import section_centres, trend_test
from napari_nephi.synthetic import rotation_matrix

from .._bench import import_benchmark

T = import_benchmark("mito_truth_read")


def _true(n=9, shape=(300, 400), seed=3):
    rng = np.random.default_rng(seed)
    mats = np.stack([rotation_matrix(a, shape) for a in rng.uniform(-np.pi, np.pi, n)])
    mats[:, :2, 2] += rng.normal(0, 5, (n, 2))  # scatter, as placement_shift
    return mats


def test_truth_placement_moves_aligned_content_by_the_drift_and_the_background_by_minus_it():
    n, shape, v = 9, (300, 400), np.array([0.3, -0.2])
    true = _true(n, shape)
    placed = T.truth_placement(true, v)
    k0 = (n - 1) / 2
    p = np.array([120.0, 80.0, 1.0])  # a point of the generator's (unrotated) frame
    for k in range(n):
        # aligned point p samples the unrotated frame at p + v (k - k0): content moving by v stands still
        assert np.allclose(placed[k] @ p, true[k] @ (p + np.r_[v * (k - k0), 0.0]))
    assert np.allclose(placed[int(k0)], true[int(k0)])  # no drift at the middle section
    assert np.allclose(T.expected_background(v), -v)
    # the sections' centres move by -v per section in the aligned frame: the trend reads the organelles' part
    m = 40  # sections enough for the trend test
    still = T.truth_placement(np.repeat(np.eye(3)[None], m, 0), v)
    slope = trend_test(section_centres(still, shape), np.ones(m, bool))["slope"]
    assert np.allclose(slope, -v, atol=1e-9)


def test_truth_placement_in_a_reference_frame():
    """Seen from section ``ref``'s frame (the engine's), the same placement: section ``ref`` is the identity,
    and the sections' centres of rotated sections (about their centre, no scatter) move by ``-v`` turned into
    that frame, which the trend test reads and :func:`expected_background` predicts."""
    n, shape, v, ref = 40, (300, 400), np.array([0.3, -0.2]), 27
    rng = np.random.default_rng(5)
    true = np.stack([rotation_matrix(a, shape) for a in rng.uniform(-np.pi, np.pi, n)])
    placed, in_ref = T.truth_placement(true, v), T.truth_placement(true, v, ref)
    assert np.allclose(in_ref[ref], np.eye(3))
    p = np.array([120.0, 80.0, 1.0])  # a point of section ref's frame lands where the placement puts it
    for k in (0, 13, ref, n - 1):
        assert np.allclose(in_ref[k] @ p, placed[k] @ np.linalg.solve(placed[ref], p))
    slope = trend_test(section_centres(in_ref, shape), np.ones(n, bool))["slope"]
    expected = T.expected_background(v, placed[ref])
    assert np.allclose(slope, expected, atol=1e-9)
    assert np.isclose(np.hypot(*expected), np.hypot(*v)) and not np.allclose(expected, -v)  # turned, not -v


def test_the_table_reads_each_look_along_the_drift_as_a_share_of_it(tmp_path, capsys):
    """Review 2 (A-2): the share of the organelles' part a reading reads along it (docs/mito.md's 14-stack
    table), from a reading's ``along_drift`` or, in rows written before it, from the slopes."""
    part = [0.3, -0.4]  # |0.5|
    assert np.isclose(T.along_drift([0.15, -0.2], part), 0.5)
    assert np.isclose(T.along_drift([0.4, 0.3], part), 0.0)  # across the drift: none of it
    look = {"slope": [0.3, -0.4], "decision": "both"}
    rows = [
        {"seed": 2, "unrotated": {"organelles_part": part, "first": dict(look, slope=[0.15, -0.2]),
                                  "second": look, "both": look, "all": dict(look, along_drift=0.25)}},
        {"seed": 1, "unrotated": {"organelles_part": part, "first": look, "second": look, "both": look,
                                  "all": look}},
    ]  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(rows))
    out = T.table([tmp_path / "t.json"])
    assert (
        out["seeds"] == [1, 2]
        and np.allclose(out["first"], [1.0, 0.5])
        and np.allclose(out["all"], [1, 0.25])
    )
    assert "| 2 | 0.500 | 0.50 | 1.00 | 1.00 | 0.25 | both / both |" in capsys.readouterr().out


def test_the_reader_builds_the_options_align_stack_builds_by_default(monkeypatch):
    """Session 41: the reader's keypoint-stage options come from ``align_stack``'s signature, not restated by
    hand: they equal those ``align_stack`` builds with given masks and its defaults (captured at the call),
    and they follow a changed default (``mask_dilation``, which sets the background's masks)."""
    from napari_nephi.engines.mito import align

    built, build = [], align.build_options

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        built.append(build(*args, **kwargs))
        raise Stop

    stack = np.zeros((3, 64, 80), np.uint8)
    monkeypatch.setattr(align, "build_options", capture)
    try:
        align.align_stack(stack, masks=np.zeros_like(stack))
    except Stop:
        pass
    monkeypatch.setattr(align, "build_options", build)
    assert len(built) == 1 and built[0] == build(shape=(64, 80), masks_given=True, **T.stack_defaults())
    wrapped = align.align_stack.__wrapped__
    params = dict(inspect.signature(wrapped).parameters)
    params["mask_dilation"] = params["mask_dilation"].replace(default=5.0)
    monkeypatch.setattr(
        align.align_stack, "__signature__", inspect.Signature(list(params.values())), raising=False
    )
    assert T.stack_defaults()["mask_dilation"] == 5.0
    del params["border"]  # review 1: a parameter missing, or without a default, is named, not passed on
    params["mask_dilation"] = params["mask_dilation"].replace(default=inspect.Parameter.empty)
    monkeypatch.setattr(align.align_stack, "__signature__", inspect.Signature(list(params.values())))
    with pytest.raises(ValueError, match="mask_dilation, border"):
        T.stack_defaults()


def test_the_background_geometry_reads_minus_the_drift_on_the_truth_placement_and_the_lag_elsewhere():
    """Session 41's oracle: on the truth placement a still background moves by exactly ``-v`` (turned into the
    reference's frame) on every run of pairs; a placement that follows only part of the drift (the truth's
    moved by a straight line, ``lag`` px per section) moves it by ``-v - lag`` there, and
    :func:`placement_parts` finds that line (no jitter, no linear part) and rebuilds the placement from it."""
    n, shape, v, ref = 80, (300, 400), np.array([0.3, -0.2]), 0
    rng = np.random.default_rng(7)
    true = np.stack([rotation_matrix(a, shape) for a in rng.uniform(-np.pi, np.pi, n)])
    use = np.ones(n, bool)
    truth = T.truth_placement(true, v, ref)
    expected = T.expected_background(v, T.truth_placement(true, v)[ref])
    for second in (False, True):
        runs = T.background_geometry(truth, true, use, shape, second, pairs=32)
        assert len(runs) >= 3 and np.allclose(runs, expected, atol=1e-9)
    lag = np.array([0.02, 0.01])
    engine = np.stack([truth[k] @ T.translation(lag * (k - ref)) for k in range(n)])
    assert np.allclose(T.background_geometry(engine, true, use, shape).mean(0), expected - lag, atol=1e-9)
    split = T.placement_parts(truth, engine, use, shape, ref)
    assert np.allclose(split["lag"], lag, atol=1e-12) and np.allclose(split["jitter_rms"], 0, atol=1e-9)
    assert np.allclose(split["hybrids"]["trend"], engine, atol=1e-9)
    assert np.allclose(split["hybrids"]["linear"], truth, atol=1e-9)
    assert np.allclose(split["hybrids"]["jitter"], truth, atol=1e-9)


def test_a_look_that_plans_no_run_reads_an_empty_geometry_that_pools_with_the_other():
    """A short stack (48 sections) plans no run for the second look: its geometry is ``(0, 2)``, so the pooled
    "both" of ``--oracle`` is the first look's (it raised in ``np.concatenate`` before)."""
    n, shape, v, ref = 48, (300, 400), np.array([0.3, -0.2]), 0
    true = np.stack([rotation_matrix(a, shape) for a in np.random.default_rng(3).uniform(-np.pi, np.pi, n)])
    use = np.ones(n, bool)
    truth = T.truth_placement(true, v, ref)
    first, second = (T.background_geometry(truth, true, use, shape, look) for look in (False, True))
    assert second.shape == (0, 2) and len(first) >= 1
    assert np.allclose(np.concatenate([first, second]).mean(0), first.mean(0))


def test_the_reader_builds_the_masks_with_the_engine_run_s_options(monkeypatch):
    """Session 41: with ``--engine-option mask_dilation=0`` the background is read with the masks that run
    used (the engine's first look is reproduced), not with the default dilation; other options pass by."""
    seen = []

    class Sections:
        def __init__(self, stack, masks, opts, intensity):
            seen.append(opts)

        def background_mask(self, k):
            return None

    monkeypatch.setattr(T.align, "_Sections", Sections)
    data = {"stack": np.zeros((2, 32, 32), np.uint8), "masks": np.zeros((2, 32, 32), np.uint8)}
    T.reader(data, 1, options={"mask_dilation": 0.0, "drift_correction": "none"})
    T.reader(data, 1)
    assert [o.mask_dilation for o in seen] == [0.0, 12.0]


def test_an_unmeasured_look_reads_unmeasured_not_zero(capsys):
    """Session 42 (session 41's reread): on a short stack the second look measures no pair (slope 0, se inf);
    ``oracle_reads`` prints it "unmeasured" (as ``_show`` does) and records None, not 0.0000 along the drift;
    a measured look still prints its value."""
    n, shape, v = 48, (300, 400), np.array([0.3, -0.2])
    true = np.stack([rotation_matrix(a, shape) for a in np.random.default_rng(3).uniform(-np.pi, np.pi, n)])
    truth = T.truth_placement(true, v, 0)
    runs = [[-0.3, 0.2], [-0.28, 0.21], [-0.31, 0.19]]
    first = {"slope": [-0.2963, 0.2], "se": [0.01, 0.006], "runs": runs, "pairs": 40, "planned": 42}
    second = {"slope": [0.0, 0.0], "se": [np.inf, np.inf], "runs": [], "pairs": 0, "planned": 0}

    def background(mats, use, look=False, trend=None, pairs=None):
        return second if look else first

    out = T.oracle_reads(background, true, {"truth": truth}, np.ones(n, bool), shape, v)
    line = capsys.readouterr().out
    assert "second unmeasured" in line and "second 0.0000" not in line, line
    assert out["truth"]["img"]["second"] is None
    assert out["truth"]["img"]["both"] == pytest.approx(out["truth"]["img"]["first"])
    assert f"first {out['truth']['img']['first']:.4f}" in line and "(40+0 pairs)" in line
