"""``benchmarks/mito_paired.py`` (session 40): the paired queue's lanes, its decision twin (the candidate's
arm shared only where it decides as the base, run in full otherwise) and the marks of session 40's rule."""

import numpy as np
import pytest

from .._bench import import_benchmark

P = import_benchmark("mito_paired")


def _row(seed, case, base, cand, applied=("none", "none"), first="sections", looks=1):
    arm = {"dice_fit": 0.0, "chi0": None}
    return {
        "seed": seed, "case": case, "cand_from": "shared", "prediction_matches": None,
        "base": {**arm, "dice_ref": base, "applied": applied[0], "decision": first, "first_look": first,
                 "looks": looks},
        "cand": {**arm, "dice_ref": cand, "applied": applied[1], "decision": first, "first_look": first,
                 "looks": looks},
    }  # fmt: skip


def _passing():
    """Three stage-drift+drift rows read "sections" on one look (one gains 0.02: ceil(3 / 3) = 1 needed),
    one read "both", and two stage-drift rows kept."""
    return [
        _row(1, "stage-drift+drift", 0.60, 0.62, ("none", "detrend-slope")),
        _row(2, "stage-drift+drift", 0.64, 0.64),
        _row(3, "stage-drift+drift", 0.61, 0.605),  # a loss of exactly 0.005 is allowed
        _row(4, "stage-drift+drift", 0.92, 0.92, ("detrend-slope",) * 2, first="both"),
        _row(1, "stage-drift", 0.97, 0.97),
        _row(2, "stage-drift", 0.89, 0.97, ("detrend-slope", "none"), first="both"),  # a floored gain
    ]


def test_marks_pass_on_every_bound_and_fail_one_past_each():
    rows = _passing()
    m = P.marks(rows)
    assert m["verdict"] == "PASS", m
    assert m["c_sections_rows"] == [
        (1, "stage-drift+drift"),
        (2, "stage-drift+drift"),
        (3, "stage-drift+drift"),
    ]
    assert m["c_gained"] == [(1, "stage-drift+drift")] and m["c_needed"] == 1
    lost = _passing()
    lost[2]["cand"]["dice_ref"] = 0.6049  # (a): a loss over 0.005
    assert P.marks(lost)["verdict"] == "FAIL" and P.marks(lost)["a_losses"] == [(3, "stage-drift+drift")]
    detrended = _passing()
    detrended[4]["cand"]["applied"] = "detrend-slope"  # (b): a kept stage-drift row detrended
    assert P.marks(detrended)["b_detrended"] == [(1, "stage-drift")]
    assert P.marks(detrended)["verdict"] == "FAIL"
    short = _passing()
    short[0]["cand"]["dice_ref"] = 0.6199  # (c): the gain under 0.02
    assert P.marks(short)["verdict"] == "FAIL" and P.marks(short)["c_gained"] == []
    more = _passing() + [_row(k, "stage-drift+drift", 0.6, 0.6) for k in (5, 6, 7)]  # 6 rows: 2 needed
    assert P.marks(more)["c_needed"] == 2 and P.marks(more)["verdict"] == "FAIL"


def test_marks_say_not_enough_rows_below_two_sections_rows():
    rows = [r for r in _passing() if r["seed"] != 2 and r["seed"] != 3]  # one "sections" row left
    m = P.marks(rows)
    assert m["c_sections_rows"] == [(1, "stage-drift+drift")] and m["verdict"] == "NOT ENOUGH ROWS"
    second = _passing()  # a first look "undecided" whose second look read "sections" is not in S
    for r in second[1:3]:
        r["base"]["looks"] = 2
    assert P.marks(second)["verdict"] == "NOT ENOUGH ROWS"


def test_lanes_split_one_seed_major_list():
    rows = [(s, c) for s in (106, 107, 108) for c in ("a", "b")]
    one, two = P.queue([106, 107, 108], ["a", "b"], "1/2"), P.queue([106, 107, 108], ["a", "b"], "2/2")
    assert one == rows[0::2] and two == rows[1::2] and sorted(one + two) == sorted(rows)
    assert P.queue([1], ["a"]) == [(1, "a")]
    with pytest.raises(SystemExit):
        P.queue([1], ["a"], "3/2")


def test_same_decision():
    assert P.same_decision((False, None), (False, np.ones(2)))  # kept either way: the slope is not used
    assert P.same_decision((True, None), (True, None))
    assert P.same_decision((True, np.array([0.1, 0.2])), (True, np.array([0.1, 0.2])))
    assert not P.same_decision((True, np.array([0.1, 0.2])), (True, np.array([0.1, 0.2000001])))
    assert not P.same_decision((True, None), (True, np.zeros(2)))
    assert not P.same_decision((True, None), (False, None))


def _args(tmp_path, full=False, sections=24):
    return P.argparse.Namespace(sections=sections, shape=(256, 256), pad=40, workers=1, full=full)


def test_the_twin_leaves_the_base_as_a_plain_run_and_runs_a_differing_candidate_in_full(tmp_path):
    """24 sections of 256 x 256, organelle drift 0.4: the defaults detrend ("organelles"); a floor of 10 px
    per section makes every reading "undecided" (kept), so the candidate decides otherwise and runs in full,
    and its recorded reading is the one predicted at the base's decision. The base arm is the plain row's.
    Session 40 (A2): the base arm under the earlier rule (BASE, the defaults up to session 40) records it
    and restores the engine's defaults (0.06, "sections") after the row."""
    data = P.em_stack(24, (256, 256), seed=21, pad=40, **P.mb.CASES["drift04"])
    plain = P.mb.run_mito(data, "mito-default", "bf", P.SimpleNamespace(
        model="homography", reference="auto", workers=1, extra={}))  # fmt: skip
    row = P.run_row(21, "drift04", _args(tmp_path), {"SE_FLOOR": 10.0, "SECOND_LOOK": "undecided"})
    assert row["base"]["dice_ref"] == plain["dice_ref"] and row["base"]["drift_auto"]["applied"] == "detrend"
    assert row["cand_from"] == "full" and row["prediction_matches"] is True
    assert row["cand"]["drift_auto"]["applied"] == "none" and row["predicted"] == [[False, None]]
    assert row["cand"]["dice_ref"] < row["base"]["dice_ref"] - 0.1  # the drift kept
    assert P.bgm.SE_FLOOR == 0.06 and P.bgm.SECOND_LOOK == "sections"  # the settings restored
    # a candidate deciding alike shares the base's alignment, and equals the same candidate run in full
    same = {"SE_FLOOR": 0.06, "SECOND_LOOK": "sections"}
    shared = P.run_row(21, "drift04", _args(tmp_path), same, P.BASE)
    assert (
        shared["base_settings"] == P.BASE and shared["base"]["drift_auto"]["background"]["se_floor"] == 0.02
    )
    assert P.bgm.SE_FLOOR == 0.06 and P.bgm.SECOND_LOOK == "sections"
    full = P.run_row(21, "drift04", _args(tmp_path, full=True), same, P.BASE)
    assert shared["cand_from"] == "shared" and full["cand_from"] == "full"
    for key in ("dice_ref", "dice_fit", "frame_fit"):
        assert shared["cand"][key] == full["cand"][key]
    assert shared["cand"]["drift_auto"]["background"] == full["cand"]["drift_auto"]["background"]


def test_a_full_candidate_matches_its_prediction_within_1e_6_not_more():
    """Two runs of one stack read a slope alike to about 1e-9 (stage-drift+drift 112: 0.21655324968 predicted,
    0.21655325047 in full): that matches; another decision or a slope off by 1e-5 does not."""
    row = {
        "predicted": [[True, [0.21655324967937886, -0.2717]]],
        "cand": {
            "drift_auto": {
                "applied": "detrend-slope",
                "background": {"slope": [0.21655325047261298, -0.2717]},
            }
        },
    }
    assert P.prediction_matches(row) is True
    row["cand"]["drift_auto"]["background"]["slope"][1] += 1e-5
    assert P.prediction_matches(row) is False
    row["cand"]["drift_auto"]["applied"] = "none"
    assert P.prediction_matches(row) is False
    assert P.prediction_matches({"predicted": [[False, None]], "cand": {"drift_auto": {"applied": "none"}}})
    assert P.prediction_matches({"predicted": [[True, None]], "cand": {"drift_auto": {"applied": "detrend"}}})
    assert P.prediction_matches({"predicted": [], "cand": {}}) is None


def test_the_base_is_the_earlier_rule_unless_named():
    """Session 40 (A2): the defaults moved to the candidate (0.06, "sections"), so the base arm is named: the
    earlier rule by default, another pair or ``found`` (the engine's as found) by the two options."""
    assert P.BASE == {"SE_FLOOR": 0.02, "SECOND_LOOK": "undecided"}
    assert P.CANDIDATE == {"SE_FLOOR": P.bgm.SE_FLOOR, "SECOND_LOOK": P.bgm.SECOND_LOOK}  # the defaults now
    assert P.base_settings("0.02", "undecided") == P.BASE
    assert P.base_settings("found", "found") == {}
    assert P.base_settings("0.06", "found") == {"SE_FLOOR": 0.06}
    with pytest.raises(SystemExit, match="base-se-floor"):
        P.base_settings("low", "undecided")


def test_an_options_arm_reaches_align_stack_in_arm_b_only(monkeypatch, tmp_path):
    """Session 42: ``--arm-b-options '{"mask_dilation": 0}'`` reaches ``align_stack`` in the candidate's run
    only; the base's run is the plain row's (the engine's default 12 px), both decide under the engine's
    settings as found, and the row records the options. 12 sections of 256 x 256, stage-drift+drift."""
    calls = []
    plain_align = P.mb.align_stack

    def spy(stack, **kw):
        calls.append(kw)
        return plain_align(stack, **kw)

    monkeypatch.setattr(P.mb, "align_stack", spy)
    data = P.em_stack(12, (256, 256), seed=21, pad=40, **P.mb.CASES["stage-drift+drift"])
    plain = P.mb.run_mito(data, "mito-default", "bf", P._bench(1))
    cand, base = P.arm_settings(_settings_args(), {"mask_dilation": 0})
    assert cand == {} and base == {}  # the engine's settings as found in both arms
    monkeypatch.setattr(P, "first_arm", lambda seed, case: "base")
    row = P.run_row(21, "stage-drift+drift", _args(tmp_path, sections=12), cand, base, {"mask_dilation": 0})
    assert len(calls) == 3 and "mask_dilation" not in calls[0] and "mask_dilation" not in calls[1]
    assert calls[2]["mask_dilation"] == 0 and {k: v for k, v in calls[2].items() if k != "mask_dilation"} == {
        k: v for k, v in calls[1].items()
    }
    assert row["base"]["dice_ref"] == plain["dice_ref"] and row["base"]["inliers"] == plain["inliers"]
    assert row["cand"]["inliers"] < row["base"]["inliers"]  # no ring of tissue: fewer inliers per pair
    assert row["base_options"] == {} and row["cand_options"] == {"mask_dilation": 0}
    assert row["cand_from"] == "full" and row["predicted"] == [] and row["prediction_matches"] is None
    found = {"SE_FLOOR": P.bgm.SE_FLOOR, "SECOND_LOOK": P.bgm.SECOND_LOOK}
    assert row["base_settings"] == found and row["cand_settings"] == found


def _settings_args(**named):
    keys = ("se_floor", "second_look", "base_se_floor", "base_second_look")
    return P.argparse.Namespace(**{k: named.get(k) for k in keys})


def test_without_options_a_row_is_as_before(tmp_path):
    """Session 42: without options (None or {}) the row has session 41's keys and the same values (every key
    but the CPU seconds), and the arms' settings default to CANDIDATE / BASE as before."""
    assert P.arm_settings(_settings_args(), {}) == (P.CANDIDATE, P.BASE)
    assert P.arm_settings(_settings_args(base_se_floor="found", second_look="undecided"), {}) == (
        {**P.CANDIDATE, "SECOND_LOOK": "undecided"},
        {"SECOND_LOOK": P.BASE["SECOND_LOOK"]},
    )
    assert P.arm_settings(_settings_args(se_floor=0.1), {"mask_dilation": 3}) == ({"SE_FLOOR": 0.1}, {})
    rows = [P.run_row(21, "drift04", _args(tmp_path), P.CANDIDATE, P.BASE, options) for options in (None, {})]
    keys = {
        "seed", "case", "sections", "base_settings", "cand_settings", "base", "decisions", "code", "cpu_s",
        "cand", "cand_from", "prediction_matches", "predicted",
    }  # fmt: skip
    assert set(rows[0]) == keys and set(rows[1]) == keys
    # the values session 41's script (ccab1dc) recorded for this row (review 1: the plain path itself)
    assert rows[0]["base"]["dice_ref"] == pytest.approx(0.9724870762228793, abs=1e-9)
    assert rows[0]["base"]["dice_fit"] == pytest.approx(0.9724275088830456, abs=1e-9)
    assert rows[0]["base"]["drift_auto"]["applied"] == "detrend" and rows[0]["decisions"] == 1
    for r in rows:
        r.pop("cpu_s")
        for arm in ("base", "cand"):
            for k in ("mp_s", "mp_cpu_s", "load", "seconds", "warp_s"):
                r[arm].pop(k)
    assert rows[0] == rows[1] and rows[0]["cand_from"] == "shared"


def test_arm_options_are_checked_at_the_start():
    assert P.arm_options(None) == {} and P.arm_options("") == {}
    assert P.arm_options('{"mask_dilation": 3, "smooth": 1.5}') == {"mask_dilation": 3, "smooth": 1.5}
    with pytest.raises(SystemExit, match="mask_dilatation not an align_stack option"):
        P.arm_options('{"mask_dilatation": 3}')
    with pytest.raises(SystemExit, match="masks, workers not an align_stack option the arm may set"):
        P.arm_options('{"workers": 1, "masks": null}')
    with pytest.raises(SystemExit, match="a JSON object"):
        P.arm_options("[3]")
    with pytest.raises(SystemExit, match="not JSON"):
        P.arm_options("mask_dilation=3")


def test_marks_can_target_every_stage_drift_drift_row_the_base_keeps():
    """Session 42's rule (``read --targets kept``): (c) reads the stage-drift+drift rows whose base keeps the
    background, whatever its looks; a row the base detrends is not targeted."""
    rows = _passing()
    rows[1]["base"]["looks"] = 2  # kept after two looks: targeted by "kept", not by "one-look"
    m = P.marks(rows, targets="kept")
    assert m["c_sections_rows"] == [
        (1, "stage-drift+drift"),
        (2, "stage-drift+drift"),
        (3, "stage-drift+drift"),
    ]
    assert P.marks(rows)["c_sections_rows"] == [(1, "stage-drift+drift"), (3, "stage-drift+drift")]
    assert m["verdict"] == "PASS" and m["c_gained"] == [(1, "stage-drift+drift")]
    rows[0]["cand"]["dice_ref"] = 0.61  # the one gain gone: 0 of the 3 targeted rows gain 0.02
    assert P.marks(rows, targets="kept")["verdict"] == "FAIL"


def test_an_options_row_alternates_its_first_arm_and_the_order_moves_no_value(monkeypatch, tmp_path):
    """Review 1 of session 42 (paired CPU alternates): the arm run first follows the row (seed + the case's
    position, even: the base), is recorded, and either order gives the same arms (12 sections)."""
    assert P.first_arm(120, "stage-drift+drift") != P.first_arm(121, "stage-drift+drift")
    assert P.first_arm(120, "stage-drift+drift") != P.first_arm(120, "stage-drift")
    assert P.first_arm(120, "default") == "base"
    rows = {}
    for first in ("base", "cand"):
        monkeypatch.setattr(P, "first_arm", lambda seed, case, f=first: f)
        rows[first] = P.run_row(21, "stage-drift", _args(tmp_path, sections=12), {}, {}, {"mask_dilation": 0})
        assert rows[first]["first_arm"] == first and list(rows[first]["cpu_s"])[0] == first
    for arm in ("base", "cand"):
        for k in ("dice_ref", "dice_fit", "inliers", "frame_fit"):
            assert rows["base"][arm][k] == rows["cand"][arm][k]
    assert rows["base"]["cand"]["inliers"] != rows["base"]["base"]["inliers"]


def test_mark_d_says_incomplete_where_a_required_case_has_no_row():
    """Session 42's mark (d) (``read --require-cases``): a required case without a row makes a passing read
    INCOMPLETE; a failing one stays FAIL."""
    rows = _passing()
    assert P.marks(rows, require_cases=("stage-drift", "stage-drift+drift"))["verdict"] == "PASS"
    m = P.marks(rows, require_cases=("stage-drift", "jitter"))
    assert m["verdict"] == "INCOMPLETE" and m["d_missing_cases"] == ["jitter"]
    rows[2]["cand"]["dice_ref"] = 0.6049
    assert P.marks(rows, require_cases=("jitter",))["verdict"] == "FAIL"


def test_a_reading_option_is_judged_by_the_twin_and_a_shared_row_is_the_full_run(tmp_path):
    """Session 43: ``background_mask_dilation`` acts only on the background reading, so the twin judges it:
    at the keypoints' own 12 px the candidate is the base; at 0 px on drift04 (24 sections of 256 x 256) the
    decision is the base's ("organelles": the whole trend, no slope), so the row is shared, and it equals the
    candidate run in full with the option, its reading included (the twin reads the masks as the option
    does); a row the twin cannot share runs in full. Any other option still runs both arms in full."""
    assert P.READING_OPTIONS == ("background_mask_dilation", "kept_reading")  # session 45: kept_reading too
    assert P.DECISION_OPTIONS == ("kept_reading",)
    same = P.run_row(21, "drift04", _args(tmp_path), {}, {}, {"background_mask_dilation": 12.0})
    assert same["cand_from"] == "shared" and same["decisions"] == 1
    assert same["cand"] == same["base"] and same["cand_options"] == {"background_mask_dilation": 12.0}
    rows = {
        full: P.run_row(21, "drift04", _args(tmp_path, full=full), {}, {}, {"background_mask_dilation": 0})
        for full in (False, True)
    }
    shared, full = rows[False], rows[True]
    assert shared["cand_from"] == "shared" and full["cand_from"] == "full" and full["prediction_matches"]
    for key in ("dice_ref", "dice_fit", "frame_fit", "inliers"):
        assert shared["cand"][key] == full["cand"][key] == shared["base"][key]
    read, base_read = shared["cand"]["drift_auto"]["background"], shared["base"]["drift_auto"]["background"]
    assert read == full["cand"]["drift_auto"]["background"] and read["slope"] != base_read["slope"]
    assert P.align.background_motion is P.bgm.background_motion  # restored after the twin's call
    with pytest.raises(ValueError, match="not a reading option"):
        with P.read_as({"mask_dilation": 0}):
            pass


def test_placement_records_the_decisions_input_and_the_returned_placement(tmp_path):
    """Session 44 (``--placement``): each arm records the placement given to the drift correction and, as
    ``placement_out``, the one it returned (review 1 of session 44, A1). On a stage-drift stack the decision
    keeps, so ``track_shift="decision"`` hands it a placement moved by a straight line (another lag, the same
    jitter) and returns the base's: the returned records are equal, the given ones are not."""
    args = P.argparse.Namespace(sections=24, shape=(256, 256), pad=40, workers=1, full=False, placement=True)
    row = P.run_row(21, "stage-drift", args, {}, None, {"track_shift": "decision"})
    b, c = row["base"], row["cand"]
    assert row["truth"]["stage_step"] != [0.0, 0.0] and c["drift_auto"]["applied"] == "none"
    assert b["placement_out"] == c["placement_out"] and b["dice_ref"] == c["dice_ref"]
    assert b["placement"]["lag"] != c["placement"]["lag"]
    np.testing.assert_allclose(c["placement"]["jitter_rms"], b["placement"]["jitter_rms"], atol=0.01)
    assert b["placement"]["lag_along_drift"] is None  # no organelle drift: no direction to read along


def test_until_is_a_time_not_a_string_across_midnight():
    """Session 44: ``--until 23:58`` compared "HH:MM" strings, so a row at 00:03 ("00:03" < "23:58") was
    started. ``past_until`` takes the bound nearest the time (within 12 h): 00:03 is past 23:58 of the day
    before, 23:30 is not, and 00:03 is not past 00:10."""
    utc = P.datetime.timezone.utc
    at = P.datetime.datetime
    assert P.past_until("23:58", at(2026, 12, 8, 0, 3, tzinfo=utc))
    assert not P.past_until("23:58", at(2026, 12, 7, 23, 30, tzinfo=utc))
    assert P.past_until("23:58", at(2026, 12, 7, 23, 58, tzinfo=utc))
    assert not P.past_until("00:10", at(2026, 12, 8, 0, 3, tzinfo=utc))
    assert P.past_until("00:10", at(2026, 12, 8, 0, 10, tzinfo=utc))
    with pytest.raises(SystemExit, match="--until"):
        P.past_until("25:00", at(2026, 12, 8, 0, 3, tzinfo=utc))
