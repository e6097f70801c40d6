"""``benchmarks/nephi_capture_judge.py`` (session 42): the rule's marks on hand-made rows."""

import json

import pytest

from .._bench import import_benchmark

CJ = import_benchmark("nephi_capture_judge")
NL = import_benchmark("nephi_large")


def _row(case, tool, epe, tex=None, flat=float("nan"), cpu=10.0, peak=90.0, **extra):
    tex = epe if tex is None else tex
    return dict(
        case=case,
        tool=tool,
        epe=epe,
        epe_textured=tex,
        epe_textureless=flat,
        folds_pct=0.0,
        cpu_seconds=cpu,
        peak_mib=peak,
        **extra,
    )


def _judge(rows, gain=" 4 %"):
    entries = CJ.pairs([("g", rows)], "NePhi fast", "NePhi cap16")
    return CJ.judge(entries, gain)


def test_a_gain_at_4_percent_within_the_bounds_elsewhere_passes():
    rows = [
        _row("ihc 4 %", "NePhi fast", 0.225, peak=200.0),  # the first case: its peak is not judged
        _row("ihc 4 %", "NePhi cap16", 0.027, peak=90.0),
        _row("camera 1 %", "NePhi fast", 0.459, 0.088, 1.117),
        _row("camera 1 %", "NePhi cap16", 0.480, 0.100, 1.160),  # +0.021 whole, +0.043 sky: inside
    ]
    fails, marks = _judge(rows)
    assert fails == [] and marks["M6"] is None  # no rigid rows: no case, not a pass
    assert all(ok for m, ok in marks.items() if m != "M6")
    assert CJ.cpu_ratio_without_first(CJ.pairs([("g", rows)], "NePhi fast", "NePhi cap16")) == 1.0


@pytest.mark.parametrize(
    "after, mark",
    [
        (dict(epe=0.100), "M1"),  # 0.07 -> 0.100: above 0.07 + 0.025
        (dict(epe=0.07, tex=0.100), "M2"),
        (dict(epe=0.07, flat=2.3), "M3"),  # 2.0 -> 2.3: above 10 %
        (dict(epe=0.07, cpu=13.5), "M7"),  # one case above 1.3x
        (dict(epe=0.07, peak=101.0), "M8"),  # not the first case: judged
    ],
)
def test_each_mark_fails_where_its_bound_is_crossed(after, mark):
    base = dict(epe=0.07, tex=0.07, flat=2.0, cpu=10.0, peak=90.0)
    rows = [
        _row("ihc 4 %", "NePhi fast", 1.0),
        _row("ihc 4 %", "NePhi cap16", 0.5),
        _row("disc 2 %", "NePhi fast", **base),
        _row("disc 2 %", "NePhi cap16", **{**base, **after}),
    ]
    fails, marks = _judge(rows)
    assert marks[mark] is False and all(ok for m, ok in marks.items() if m not in (mark, "M6")), fails


def test_no_gain_at_4_percent_fails_m4_and_folds_fail_m5():
    rows = [_row("ihc 4 %", "NePhi fast", 0.2), _row("ihc 4 %", "NePhi cap16", 0.19)]
    assert _judge(rows)[1]["M4"] is False  # 5 % lower, not 10 %
    assert _judge(rows, gain=" 8 %")[1]["M4"] is None  # no gain case: no case, not a pass
    rows[1]["folds_pct"] = 0.01
    assert _judge(rows)[1]["M5"] is False


def test_rigid_rows_are_judged_by_epe_det_j_and_ic(tmp_path):
    rigid = dict(jac_min=0.98, jac_max=1.02, ic_max=0.004)
    rows = [
        _row("camera rigid 79.0 shift", "NePhi fast", 0.010, **rigid),
        _row("camera rigid 79.0 shift", "NePhi cap16", 0.012, **{**rigid, "jac_max": 1.035}),
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    entries = CJ.pairs(CJ.load_groups([str(path)]), "NePhi fast", "NePhi cap16")
    fails, marks = CJ.judge(entries)
    assert (
        marks["M6"] is False
        and marks["M4"] is None
        and fails == ["M6 " + str(path) + " / camera rigid 79.0 shift: |det J - 1| max 0.0200 -> 0.0350"]
    )


def test_a_case_without_both_arms_is_an_error():
    with pytest.raises(SystemExit, match="lacks"):
        CJ.pairs([("g", [_row("ihc 4 %", "NePhi fast", 0.2)])], "NePhi fast", "NePhi cap16")


def test_nephi_large_alternates_nephi_arms_only_when_asked():
    runs = ["fast", "cap16", "elastix", "ants"]
    assert [NL.arm_order(runs, 2, i, False) for i in (0, 1)] == [runs, runs]  # the default: as before
    assert NL.arm_order(runs, 2, 0, True) == runs
    assert NL.arm_order(runs, 2, 1, True) == ["cap16", "fast", "elastix", "ants"]  # peers keep their place
    assert NL.arm_order(runs, 1, 1, True) == runs


def test_m9_holds_the_candidates_det_j_to_the_target_and_skipped_marks_are_left_out():
    """Session 43: ``detj_target`` adds M9 (after's det J within 1 +- T on every rigid case); ``skip`` drops a
    mark not in the rule from the failures and the verdicts."""
    rigid = dict(jac_min=0.874, jac_max=1.090, ic_max=0.014)
    rows = [
        _row("camera rigid 79.0 shift", "NePhi fast", 0.051, **rigid),
        _row(
            "camera rigid 79.0 shift", "NePhi cap16", 0.047, **{**rigid, "jac_min": 0.985, "jac_max": 1.012}
        ),
        _row("camera rigid 79.1 rotation", "NePhi fast", 0.035, **rigid),
        _row(
            "camera rigid 79.1 rotation",
            "NePhi cap16",
            0.035,
            **{**rigid, "jac_min": 0.960, "jac_max": 1.051},
        ),
        _row("ihc 4 %", "NePhi fast", 0.2),
        _row("ihc 4 %", "NePhi cap16", 0.2),  # no 4 % gain: M4 fails unless skipped
    ]
    entries = CJ.pairs([("g", rows)], "NePhi fast", "NePhi cap16")
    fails, marks = CJ.judge(entries, detj_target=0.05)
    assert marks["M9"] is False and marks["M4"] is False and marks["M6"] is True
    assert [f for f in fails if f.startswith("M9")] == [
        "M9 g / camera rigid 79.1 rotation: det J 0.9600..1.0510 outside 1 +- 0.05"
    ]
    fails, marks = CJ.judge(entries, detj_target=0.06, skip=("M4",))
    assert "M4" not in marks and marks["M9"] is True and fails == [] and all(marks.values())
    assert "M9" not in CJ.judge(entries)[1]  # not asked: no M9


def test_m8_median_bounds_the_median_rise_not_each_case():
    """Session 44: with ``m8_median`` one case +50 MiB (the harness's spread) passes where the median rise is
    under +10 MiB, and fails per case without it; a median rise of +12 MiB fails."""

    def rows(rises):
        out = []
        for i, rise in enumerate(rises):
            out.append(_row(f"ihc {i} %", "NePhi fast", 0.2, peak=100.0))
            out.append(_row(f"ihc {i} %", "NePhi cap16", 0.2, peak=100.0 + rise))
        return CJ.pairs([("g", out)], "NePhi fast", "NePhi cap16")

    spread = rows([0, 50, 0, 2, -30])  # the first case is left out either way
    assert CJ.judge(spread, skip=("M4",))[1]["M8"] is False
    fails, marks = CJ.judge(spread, skip=("M4",), m8_median=True)
    assert marks["M8"] is True and fails == []
    fails, marks = CJ.judge(rows([0, 12, 12, 13, 0]), skip=("M4",), m8_median=True)
    assert marks["M8"] is False and fails == ["M8: median peak rise +12.0 MiB over 4 cases"]
    assert CJ.peak_rises(spread) == dict(n=4, median=1.0, largest=50.0, over=1)  # the tail, printed beside it
