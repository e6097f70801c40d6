"""The judge of ``benchmarks/atlas_paired.py`` (session 39) on a hand-made table: its counts, the paired
mean difference and its standard error, and session 38's marks, each read by hand."""

import json
import sys
from pathlib import Path

import pytest

_BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")
sys.path.insert(0, _BENCH)
try:
    import atlas_paired as AP  # noqa: E402
finally:
    sys.path.remove(_BENCH)


def _rows(pairs, case="straight", seed=5):
    return [dict(seed=seed, case=case, rank_a=a, rank_b=b, contrast="nissl") for a, b in pairs]


def test_compare_counts_and_paired_difference_by_hand():
    # differences b - a: -2, 0, +1, -1, -3 -> mean -1, sd sqrt(2.5), se sqrt(2.5 / 5) = sqrt(0.5)
    rows = _rows([(2, 0), (0, 0), (4, 5), (1, 0), (12, 9)])
    c = AP.compare(rows)
    assert c["a"]["mean_rank"] == pytest.approx(19 / 5)
    assert c["b"]["mean_rank"] == pytest.approx(14 / 5)
    assert (c["a"]["top1"], c["a"]["top3"], c["a"]["top5"], c["a"]["top10"]) == (1, 3, 4, 4)
    assert (c["b"]["top1"], c["b"]["top3"], c["b"]["top5"], c["b"]["top10"]) == (3, 3, 3, 5)
    assert (c["better"], c["worse"]) == (3, 1)
    assert c["diff"] == pytest.approx(-1.0)
    assert c["se"] == pytest.approx(0.5**0.5)


def test_today_marks_fail_on_the_top5_and_on_a_case_worse_beyond_the_bound():
    # pooled mean rank lower and the difference below zero, but Top-5 falls (4 -> 3 above) and the
    # case "partial" is worse by 0.5 > 0.15
    rows = _rows([(2, 0), (0, 0), (4, 5), (1, 0), (12, 9)]) + _rows([(0, 1), (3, 3)], case="partial")
    marks = {n: ok for n, ok, _ in AP.apply_marks(rows, "today")}
    assert marks["pooled mean rank not_higher"]
    assert not marks["Top-5 not lower"]
    assert marks["mean difference not above zero by more than its SE"]
    assert not marks["no case worse by more than 0.15"]
    text, passed = AP.report(rows, "today")
    assert not passed and "FAIL: Top-5 not lower" in text and "case partial" in text


def test_offlabel_marks_need_the_difference_below_minus_its_se():
    # b - a: -1, -1, +1, 0 -> mean -0.25, se = sd / 2 = 0.957 / 2: lower, 2 better / 1 worse, but
    # not below zero by more than its SE
    rows = _rows([(3, 2), (5, 4), (1, 2), (0, 0)])
    got = {n: ok for n, ok, _ in AP.apply_marks(rows, "offlabel")}
    assert got == {
        "pooled mean rank lower": True,
        "more better than worse": True,
        "mean difference below zero by more than its SE": False,
        "no case worse by more than 0.3": True,
    }
    # a clear gain passes every mark
    rows = _rows([(3, 1), (5, 3), (4, 2), (0, 0)])
    _, passed = AP.report(rows, "offlabel")
    assert passed


def test_marks_refuse_unknown_names_and_values():
    with pytest.raises(ValueError, match="unknown mark"):
        AP.check_marks({"mean": "lower"})
    with pytest.raises(ValueError, match="diff_se"):
        AP.check_marks('{"diff_se": "above"}')
    with pytest.raises(ValueError, match="case_bound"):
        AP.check_marks({"case_bound": -1})
    assert AP.check_marks("today")["case_bound"] == 0.15


def test_cap_counts_a_far_miss_as_the_cap():
    # b - a: +50 (a far miss moved further) and -1, -1: uncapped +16, capped at 10: (10 - 4) - 2 -> +4 / 3
    rows = _rows([(4, 54), (2, 1), (3, 2)])
    assert AP.compare(rows)["diff"] == pytest.approx(16.0)
    capped = AP.capped(rows, 10)
    assert [(r["rank_a"], r["rank_b"]) for r in capped] == [(4, 10), (2, 1), (3, 2)]
    assert AP.compare(capped)["diff"] == pytest.approx(4 / 3)
    assert rows[0]["rank_b"] == 54  # the input rows are not modified


def test_judge_command_exit_status(tmp_path, capsys):
    # 1 when a mark fails, 0 when all pass, 2 with a message (no traceback) for a bad --marks
    path = tmp_path / "pair.json"
    rows = _rows([(3, 1), (5, 3), (4, 2), (0, 0)])
    path.write_text(json.dumps({"rows": rows}))
    assert AP.main(["judge", str(path), "--marks", "offlabel"]) == 0
    assert AP.main(["judge", str(path), "--marks", '{"mean_rank": "not_higher", "top5": "not_lower"}']) == 0
    assert AP.main(["judge", str(path), "--marks", "today", "--cap", "2"]) == 0
    rows[0]["rank_b"] = 9
    path.write_text(json.dumps({"rows": rows}))
    assert AP.main(["judge", str(path), "--marks", "today"]) == 1
    with pytest.raises(SystemExit) as exit_info:
        AP.main(["judge", str(path), "--marks", '{"x": 1}'])
    assert exit_info.value.code == 2 and "unknown mark 'x'" in capsys.readouterr().err
