"""The judge of ``benchmarks/atlas_paired.py`` (session 39) on a hand-made table: its counts, the paired
mean difference and its standard error, and session 38's marks, each read by hand. Then (C2) the judge's
pooling of several files, the arms' order in a run, ``train``'s atlas and summary, and ``sys.path``, on
fakes (no lookup is run)."""

import json
import sys
from pathlib import Path

import pytest

from .._bench import BENCH as _BENCH
from .._bench import import_benchmark

AP = import_benchmark("atlas_paired")


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


# --- C2, session 39: review 1's findings (the judge's pooling, the run's order, train, sys.path) ---


def _run_file(rows, arm_b=None, index="/x/idx", stain="labels"):
    return {
        "index_a": index,
        "index_b": index + "/ours",  # DIR and DIR/ours name the same index
        "ensemble_b": None,
        "arm_a": {},
        "arm_b": {"prior_margin": 0.458} if arm_b is None else arm_b,
        "compartments": stain,
        "rows": rows,
    }


def _sections(pairs, seed=5, start=0):
    return [
        dict(seed=seed, case="straight", query=k, section=start + k, rank_a=a, rank_b=b, contrast="nissl")
        for k, (a, b) in enumerate(pairs)
    ]


def test_judge_prints_each_files_setup_and_refuses_files_that_differ_unless_mix(tmp_path, capsys):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps(_run_file(_sections([(3, 1), (5, 3)]))))
    for other in (
        _run_file(_sections([(4, 2)], seed=6), arm_b={"prior_margin": 0.3}),  # another candidate
        _run_file(_sections([(4, 2)], seed=6), index="/x/idx_s1"),  # another index
        _run_file(_sections([(4, 2)], seed=6), stain="marker"),  # another stain
    ):
        two.write_text(json.dumps(other))
        with pytest.raises(SystemExit) as exit_info:
            AP.main(["judge", str(one), str(two)])
        assert exit_info.value.code == 2 and "--mix" in capsys.readouterr().err
    assert AP.main(["judge", str(one), str(two), "--mix"]) == 0
    out = capsys.readouterr().out
    assert "3 sections from" in out
    assert 'stain labels; index a /x/idx, b /x/idx; arm a defaults, arm b {"prior_margin": 0.458}' in out
    assert "stain marker" in out


def test_judge_drops_rows_repeated_across_files(tmp_path, capsys):
    # seed 5 run twice (the second file repeats section 1, with another rank) and seed 6 once
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps(_run_file(_sections([(3, 1), (5, 3)]))))
    two.write_text(json.dumps(_run_file(_sections([(5, 4)], start=1) + _sections([(2, 2)], seed=6))))
    assert AP.main(["judge", str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "3 sections from" in out and "| pooled | 3 | 3.333 -> 2.000 |" in out
    assert "dropped 1 rows repeated across files" in out and "seed 5 section 1" in out and "kept 5 / 3" in out
    rows, _ = AP.pool([("one", json.loads(one.read_text())), ("two", json.loads(two.read_text()))])
    assert [(r["seed"], r["section"]) for r in rows] == [(5, 0), (5, 1), (6, 0)]


class _FakeLookup:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def search_poses(self, image, options):
        from types import SimpleNamespace

        self.calls.append(self.name)
        # poses on plates 3 (the winner, 0.5) and 6 (0.25), none on the truth's plate 4
        poses = {3: SimpleNamespace(score=0.5), 6: SimpleNamespace(score=0.25)}
        return SimpleNamespace(ranking=[(3, 0.0), (4, 1.0), (6, 1.5)], prior_weight=0.02, poses=poses)

    def search_order(self, image):
        return [(6, 0.1), (4, 0.2), (3, 0.3)] if self.name == "A" else [(4, 0.1), (3, 0.2), (6, 0.3)]


def _fake_run(monkeypatch, tmp_path, argv):
    calls = []
    monkeypatch.setattr(AP, "_load", lambda path: _FakeLookup(path, calls))
    q = {"image": None, "contrast": "nissl", "plate": 4}
    monkeypatch.setattr(AP, "sections_of", lambda seed, stain: [("straight", k, q) for k in range(60)])
    out = tmp_path / "run.json"
    assert AP.main(["run", str(out), "--index", "A", "--index-b", "B", *argv]) == 0
    return calls[2:], json.loads(out.read_text())["rows"]  # calls[:2]: the untimed warm-up


def _one_row(monkeypatch, tmp_path, lookup, case: str, contrast: str, section: int) -> dict:
    """The row of a run of the fake lookup class ``lookup`` (arms "A" and "B") on one section."""
    calls = []
    monkeypatch.setattr(AP, "_load", lambda path: lookup(path, calls))
    q = {"image": None, "contrast": contrast, "plate": 4}
    monkeypatch.setattr(AP, "sections_of", lambda seed, stain: [(case, k, q) for k in range(60)])
    out = tmp_path / "one.json"
    argv = ["run", str(out), "--index", "A", "--index-b", "B", "--seeds", "5", "--sections", str(section)]
    assert AP.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    return row


def test_run_alternates_the_arms_on_the_place_in_the_run(monkeypatch, tmp_path):
    # even flat indexes only: the order alternates all the same (it was a first on each, review 1)
    calls, rows = _fake_run(monkeypatch, tmp_path, ["--seeds", "5", "--sections", "0,2,4,6"])
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [r["first_arm"] for r in rows] == ["a", "b", "a", "b"]
    assert {(r["rank_a"], r["rank_b"]) for r in rows} == {(1, 1)}
    # a full run of two seeds: as before, arm a first on even flat indexes
    calls, rows = _fake_run(monkeypatch, tmp_path, ["--seeds", "5,6"])
    assert calls == ["A", "B", "B", "A"] * 60
    assert all(r["first_arm"] == ("a" if r["section"] % 2 == 0 else "b") for r in rows)


def _atlas_lookup_module(monkeypatch):
    """``benchmarks/atlas_lookup.py``, the module atlas_paired imports (``sys.path`` restored after)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.path.insert(0, _BENCH)
    import atlas_lookup

    sys.path.remove(_BENCH)
    return atlas_lookup


def test_train_takes_the_atlas_from_atlas_lookup_and_prints_steps_done(monkeypatch, tmp_path, capsys):
    import argparse

    import napari_nephi
    import napari_nephi.synthetic.atlas as synthetic_atlas

    atlas_lookup = _atlas_lookup_module(monkeypatch)
    monkeypatch.setattr(atlas_lookup, "parse", lambda argv: argparse.Namespace(shape=(66, 64, 72), seed=4))
    phantoms, trained = [], []
    monkeypatch.setattr(
        synthetic_atlas, "brain_phantom", lambda shape, seed: phantoms.append((shape, seed)) or ("ref", "lab")
    )

    class Trained:
        settings = {"steps_done": 3500, "best_step": 2500, "val_mean_rank": 5.234}

        def save(self, folder):
            trained.append(folder)

    def fake_train(ref, labels, device, seed, **options):
        trained.append((ref, labels, seed, options))
        return Trained()

    monkeypatch.setattr(napari_nephi.AtlasLookup, "train", staticmethod(fake_train))
    AP.main(["train", str(tmp_path / "idx"), "--train-seed", "1", "--train-options", '{"prefetch": true}'])
    assert phantoms == [((66, 64, 72), 4)]
    assert trained == [("ref", "lab", 1, {"prefetch": True}), str(tmp_path / "idx" / "ours")]
    assert "steps 3500, best step 2500, validation mean rank 5.234" in capsys.readouterr().out


def test_sections_of_puts_the_benchmarks_folder_on_sys_path_once(monkeypatch):
    import napari_nephi.synthetic.atlas as synthetic_atlas

    atlas_lookup = _atlas_lookup_module(monkeypatch)
    here = str(Path(AP.__file__).resolve().parent)
    before = sys.path.count(here)
    monkeypatch.setattr(synthetic_atlas, "brain_phantom", lambda shape, seed: (None, None))
    monkeypatch.setattr(atlas_lookup, "make_queries", lambda ref, labels, args: {"straight": [{"plate": 1}]})
    for seed in (5, 6, 7):
        assert AP.sections_of(seed, "labels") == [("straight", 0, {"plate": 1})]
    assert sys.path.count(here) == max(before, 1)


def test_run_stages_records_where_the_truth_was_lost_and_judge_lists_it(monkeypatch, tmp_path, capsys):
    # the truth (plate 4) is 2nd in A's first stage and 1st in B's; no pose on it, the nearest 1 plate off
    calls, rows = _fake_run(monkeypatch, tmp_path, ["--seeds", "5", "--sections", "7", "--stages"])
    assert calls == ["A", "B"]  # the run's first section: arm a first (its flat index 7 is odd)
    (row,) = rows
    assert (row["first_rank_a"], row["first_rank_b"]) == (1, 0)
    assert (row["pose_gap_a"], row["truth_score_a"], row["winner_score_a"]) == (1, None, 0.5)
    _, plain = _fake_run(monkeypatch, tmp_path, ["--seeds", "5", "--sections", "7"])
    assert "first_rank_a" not in plain[0]  # only with --stages
    path = tmp_path / "staged.json"
    row["rank_a"] = row["rank_b"] = 5  # a far miss
    path.write_text(json.dumps({"rows": [row]}))
    assert AP.main(["judge", str(path), "--list"]) == 0
    assert (
        "5 straight 7 (7, plate 4): 1 -> 5, 3, 1, none / 0.500; 0 -> 5, 3, 1, none / 0.500"
        in capsys.readouterr().out
    )


def test_run_records_the_plates_the_section_spans_and_judge_lists_them(monkeypatch, tmp_path, capsys):
    # session 40: the plates the section's tissue spans (the generator's plate_range), where a query has them
    calls = []
    monkeypatch.setattr(AP, "_load", lambda path: _FakeLookup(path, calls))
    q = {"image": None, "contrast": "nissl", "plate": 4, "plate_range": (2, 7)}
    monkeypatch.setattr(AP, "sections_of", lambda seed, stain: [("straight", k, q) for k in range(60)])
    out = tmp_path / "run.json"
    assert AP.main(["run", str(out), "--index", "A", "--seeds", "5", "--sections", "7", "--stages"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["plate_range"] == [2, 7]
    row["rank_a"] = row["rank_b"] = 5  # a far miss
    path = tmp_path / "staged.json"
    path.write_text(json.dumps({"rows": [row]}))
    assert AP.main(["judge", str(path), "--list"]) == 0
    assert "5 straight 7 (7, plate 4, its tissue on plates 2-7): 1 -> 5, 3, 1" in capsys.readouterr().out
    _, plain = _fake_run(monkeypatch, tmp_path, ["--seeds", "5", "--sections", "7"])
    assert "plate_range" not in plain[0]  # a query without it: nothing recorded


def test_in_span_counts_the_top_plates_within_the_sections_plate_span():
    rows = [
        {"plate_range": [10, 14], "top10_a": [9, 10], "top10_b": [12, 9]},  # a just outside, b inside
        {"plate_range": [20, 20], "top10_a": [20], "top10_b": [21]},
        {"top10_a": [5], "top10_b": [5]},  # a run before session 40: not counted
    ]
    assert AP.in_span(rows) == (2, 1, 1)
    assert AP.in_span(rows[2:]) is None
    text, _ = AP.report([dict(r, rank_a=0, rank_b=1, case="straight", seed=5) for r in rows[:2]])
    assert "top plate within the section's own plate span (plate_range): a 1 / 2, b 1 / 2" in text


def test_run_records_the_quarter_gates_reading_where_an_arm_has_it(monkeypatch, tmp_path):
    # session 41: an arm with quarter_gate records its stain reading and whether the gate opened
    from types import SimpleNamespace

    class Gated(_FakeLookup):
        def search_poses(self, image, options):
            found = super().search_poses(image, options)
            if self.name == "B":
                return SimpleNamespace(**vars(found), quarter_reading=-0.4, quarter_open=False)
            return SimpleNamespace(**vars(found), quarter_reading=None, quarter_open=None)

    row = _one_row(monkeypatch, tmp_path, Gated, "contrast", "fluorescence", 3)
    assert (row["quarter_reading_b"], row["quarter_open_b"]) == (-0.4, False)
    assert "quarter_reading_a" not in row and "quarter_open_a" not in row


def test_identical_and_cpu_ratio_marks_by_hand(monkeypatch, tmp_path):
    """Session 42: a speed-up is judged by the rankings it keeps (every plate and distance) and by the
    paired CPU ratio (the median over sections of b / a)."""
    rows = _rows([(0, 0), (1, 1), (2, 2), (0, 0)])
    for r, same, (ca, cb) in zip(
        rows, (True, True, True, False), ((100, 80), (200, 180), (100, 70), (50, 60))
    ):
        r.update(identical=same, same_poses=same, cpu_ms_a=ca, cpu_ms_b=cb)
    assert AP.cpu_ratio(rows) == pytest.approx((0.8 + 0.9) / 2)  # ratios 0.8, 0.9, 0.7, 1.2
    got = {n: (ok, what) for n, ok, what in AP.apply_marks(rows, {"identical": 0.75, "cpu_ratio": 0.85})}
    assert got["rankings identical on at least 75%"] == (True, "3 / 4")
    assert got["CPU per lookup, per section b / a, median at most 0.85"] == (False, "0.850")
    got = {n: ok for n, ok, _ in AP.apply_marks(rows, {"identical": 1.0, "cpu_ratio": 0.86})}
    assert got == {
        "rankings identical on at least 100%": False,
        "CPU per lookup, per section b / a, median at most 0.86": True,
    }
    text, _ = AP.report(rows)
    assert "rankings identical (every plate and distance): 3 / 4" in text
    # a run records whether the arms' rankings are the same, distances included
    _, same = _fake_run(monkeypatch, tmp_path, ["--seeds", "5", "--sections", "0,1"])
    assert [r["identical"] for r in same] == [True, True] and all(r["same_poses"] for r in same)

    class _Other(_FakeLookup):
        def search_poses(self, image, options):
            found = super().search_poses(image, options)
            if self.name == "B":
                found.ranking = [(3, 0.0), (4, 1.0), (6, 1.25)]  # the same plates, another distance
            return found

    calls = []
    monkeypatch.setattr(AP, "_load", lambda path: _Other(path, calls))
    out = tmp_path / "other.json"
    assert (
        AP.main(["run", str(out), "--index", "A", "--index-b", "B", "--seeds", "5", "--sections", "0"]) == 0
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["identical"] is False and row["rank_a"] == row["rank_b"]


def test_identical_counted_once_and_pairs_recorded(monkeypatch, tmp_path):
    """Session 43: one count of the identical rankings for the marks and the table (rows without the
    key not counted as known; a mark needs every row known), and a run records each arm's pairs, all
    and stage 1's, whose medians the table prints."""
    rows = _rows([(0, 0), (1, 1), (2, 2)])
    rows[0].update(identical=True, same_poses=True)
    rows[1].update(identical=True, same_poses=False)
    assert AP.identical_counts(rows) == (2, 2, 1)
    got = {n: (ok, what) for n, ok, what in AP.apply_marks(rows, {"identical": 0.5})}
    assert got["rankings identical on at least 50%"] == (False, "2 / 3")  # a row does not record it
    text, _ = AP.report(rows)
    assert (
        "rankings identical (every plate and distance): 2 / 2; the same poses and pair count: 1 / 2" in text
    )
    assert AP.pair_medians(rows) is None and "pairs per lookup" not in text
    for r, (pa, pb) in zip(rows, ((900, 600), (1000, 700), (1100, 500)), strict=True):
        r.update(pairs_a=pa, pairs_b=pb, stage1_pairs_a=pa // 2, stage1_pairs_b=pb // 4)
    assert AP.pair_medians(rows) == {
        "pairs_a": 1000,
        "pairs_b": 600,
        "stage1_pairs_a": 500,
        "stage1_pairs_b": 150,
    }
    assert "pairs per lookup, median: a 1000 (stage 1 500), b 600 (stage 1 150)" in AP.report(rows)[0]

    class _Counted(_FakeLookup):
        def search_poses(self, image, options):
            found = super().search_poses(image, options)
            found.pairs, found.stage1_pairs = (900, 600) if self.name == "A" else (700, 400)
            return found

    row = _one_row(monkeypatch, tmp_path, _Counted, "straight", "nissl", 0)
    assert (row["pairs_a"], row["stage1_pairs_a"], row["pairs_b"], row["stage1_pairs_b"]) == (
        900,
        600,
        700,
        400,
    )


def test_margin_marks_allow_a_stated_loss_by_hand():
    """Session 43: a cheaper search judged with a stated allowance: mean rank at most a's plus the
    margin, Top-5 at most that many sections lower."""
    rows = _rows([(0, 0), (1, 1), (4, 5), (3, 6), (2, 2)])  # mean 2.0 -> 2.8; Top-5 5 -> 3
    got = {n: ok for n, ok, _ in AP.apply_marks(rows, {"mean_rank_margin": 0.8, "top5_margin": 2})}
    assert got == {
        "pooled mean rank not higher by more than 0.8": True,
        "Top-5 not lower by more than 2 sections": True,
    }
    got = {n: ok for n, ok, _ in AP.apply_marks(rows, {"mean_rank_margin": 0.79, "top5_margin": 1})}
    assert got == {
        "pooled mean rank not higher by more than 0.79": False,
        "Top-5 not lower by more than 1 sections": False,
    }
    with pytest.raises(ValueError, match="top5_margin"):
        AP.check_marks({"top5_margin": -1})
