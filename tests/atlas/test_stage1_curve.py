"""``benchmarks/atlas_stage1_curve.py`` (session 43): the table of a sweep run, by hand."""

from __future__ import annotations

from .._bench import import_benchmark

CURVE = import_benchmark("atlas_stage1_curve")


def _row(ranks_cpu_pairs):
    return {
        name: {"rank": r, "top": 0, "cpu": c, "s1": s1, "s2": 100, "pairs": s1 + 100}
        for name, (r, c, s1) in ranks_cpu_pairs.items()
    }


def test_the_table_reads_ranks_capped_pairs_and_paired_cpu_by_hand():
    rows = [
        _row({"default": (0, 100.0, 700), "fewer": (12, 80.0, 400)}),  # b worse (12, capped at 10)
        _row({"default": (3, 200.0, 800), "fewer": (1, 200.0, 500)}),  # b better
        _row({"default": (1, 100.0, 600), "fewer": (1, 90.0, 300)}),
    ]
    data = {
        "configs": {"default": {}, "fewer": {"sweep_step": 0}},
        "rows": rows,
        "load_start": 1.0,
        "load_end": 2.0,
    }
    lines = CURVE.table(data).splitlines()
    assert lines[0] == "3 sections; load 1.0 -> 2.0"
    # default: mean (0 + 3 + 1) / 3; fewer: (12 + 1 + 1) / 3, capped (10 + 1 + 1) / 3; CPU ratios 0.8, 1, 0.9
    assert lines[3] == "| default | 1.333 (1.333) | 1 / 3 | 700 | 100 | 100 | 1.000 | 0 / 0 |"
    assert lines[4] == "| fewer | 4.667 (4.000) | 0 / 2 | 400 | 100 | 90 | 0.900 | 1 / 1 |"
    assert CURVE.CONFIGS["default"] == {} and list(CURVE.CONFIGS)[0] == "default"
