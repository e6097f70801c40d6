"""The clause check of ``benchmarks/mito_drift_gate.py`` (session 39: session 38 A3's simulation gate,
committed): C1-C4 of a candidate rule against ``TODAY`` on a small hand-made table."""

import json

import numpy as np
import pytest

from .._bench import import_benchmark

G = import_benchmark("mito_drift_gate")


def _cell(detrended, rms=0.1):
    return {"detrended": detrended, "both": 0, "whole": detrended, "rms": rms, "second_looks": 0}


def _table():
    """One cell per kind (se 0.1, no bias) where the candidate X sits exactly on every bound (N 2000)."""
    t = {
        ("null", 0.1, 0.0): (50, 60),  # C1: +10 allowed
        ("stage", 0.1, 0.0): (100, 120),  # C2: +20 allowed
        ("organelles", 0.1, 0.0): (1900, 1880),  # C3: -20 allowed
        ("stage+organelles", 0.1, 0.0): (1500, 1501),  # C4b: must rise (TODAY < 1980)
        ("stage+organelles", 0.05, 0.0): (1990, 1970),  # C4b: -20 allowed (TODAY >= 1980)
    }
    table = {}
    for (kind, se, bias), (today, x) in t.items():
        table[(kind, se, bias, "TODAY")] = _cell(today, 0.2004)
        table[(kind, se, bias, "X")] = _cell(x, 0.2001)  # rms 0.200 at 3 decimals: equal, not grown
    return table


def test_a_rule_on_every_bound_passes_and_one_past_each_fails():
    table = _table()
    assert G.clause_failures(table, "X", 2000) == []
    for key, clause in (
        (("null", 0.1, 0.0, "X"), "C1"),
        (("stage", 0.1, 0.0, "X"), "C2"),
        (("organelles", 0.1, 0.0, "X"), "C3"),
        (("stage+organelles", 0.1, 0.0, "X"), "C4b"),
        (("stage+organelles", 0.05, 0.0, "X"), "C4b"),
    ):
        bad = _table()
        step = -1 if clause in ("C3", "C4b") else 1
        bad[key] = _cell(bad[key]["detrended"] + step, 0.2001)
        fails = G.clause_failures(bad, "X", 2000)
        assert [(f[0], f[1], f[3]) for f in fails] == [(key[0], key[1], clause)], (clause, fails)
    grown = _table()
    grown[("stage+organelles", 0.1, 0.0, "X")]["rms"] = 0.2006  # 0.201 against 0.200
    assert [f[3] for f in G.clause_failures(grown, "X", 2000)] == ["C4a"]
    # bounds scale with N: at 200 stacks C2 allows +2 (100 -> 120 fails) and C4b -2 from 198
    assert sorted(f[3] for f in G.clause_failures(table, "X", 200)) == ["C1", "C2", "C3", "C4b"]


def _full(rules=("TODAY", "X")):
    """Run's JSON cells: all 32 cells (kinds x se x bias) for each of ``rules``, every rule equal to TODAY
    (stage+organelles TODAY 1990, so that C4b allows a drop of 20 and an equal count passes)."""
    out = []
    for kind in G.KINDS:
        d = 1990 if kind == "stage+organelles" else 100
        for se in G.SES:
            for b in G.BIASES:
                out += [{"kind": kind, "se": se, "bias": b, "rule": r, **_cell(d, 0.2)} for r in rules]
    return out


def _write(path, cells):
    path.write_text(json.dumps({"n": 2000, "cells": cells}))
    return str(path)


def test_check_prints_the_table_and_fails_on_a_gated_rule(tmp_path, capsys):
    cells = _full()
    path = _write(tmp_path / "a.json", cells)
    assert G.check([path]) == 0 and "X: PASS" in capsys.readouterr().out
    null = next(c for c in cells if c["kind"] == "null" and c["rule"] == "X")
    null["detrended"] += 11  # 111 > 100 + 10
    assert G.check([_write(tmp_path / "a.json", cells)]) == 1
    out = capsys.readouterr().out
    assert (
        "X: 1 failed" in out and f"C1 null se {null['se']:g} bias {null['bias']:g}: TODAY 100 -> 111" in out
    )


def test_check_says_incomplete_below_32_cells(tmp_path, capsys):
    """Review 1 of session 39: a gated rule with cells missing (a run over some kinds only) printed PASS.
    Now: INCOMPLETE (n of 32) and exit status 3; 1 (a clause fails) stays 1; the files together pass."""
    cells = _full()
    half = [c for c in cells if c["kind"] in ("null", "organelles")]  # run --kinds 0 3
    rest = [c for c in cells if c["kind"] not in ("null", "organelles")]
    a, b = _write(tmp_path / "a.json", half), _write(tmp_path / "b.json", rest)
    assert G.check([a]) == G.INCOMPLETE == 3
    out = capsys.readouterr().out
    assert "X: INCOMPLETE (16 of 32)" in out and "PASS" not in out
    assert G.check([a, b]) == 0 and "X: PASS" in capsys.readouterr().out
    # a TODAY cell missing counts too (the rule's cell has no partner)
    assert G.check([_write(tmp_path / "c.json", cells[1:])]) == 3 and "(31 of 32)" in capsys.readouterr().out
    half[1]["detrended"] += 11  # X's null cell fails C1 on the half: a failure is a failure
    assert G.check([_write(tmp_path / "a.json", half)]) == 1
    assert "X: 1 failed, INCOMPLETE (16 of 32)" in capsys.readouterr().out
    # a gated rule that is not in the files at all
    assert G.check([b, a], gated=["Y"]) == 3 and "Y: INCOMPLETE (0 of 32)" in capsys.readouterr().out


def test_check_gates_the_rules_named(tmp_path, capsys):
    """``--gated``: by default every rule but TODAY and F; the others print as reference and leave the exit
    status alone (review 1: S+P, reported but not gated, turned it to 1)."""
    cells = _full(("TODAY", "F", "X", "S+P"))
    for c in cells:
        if c["kind"] == "stage" and c["rule"] in ("F", "S+P"):
            c["detrended"] += 21  # C2 fails in all 8 stage cells
    path = _write(tmp_path / "a.json", cells)
    assert G.check([path]) == 1  # S+P gated by default
    out = capsys.readouterr().out
    assert "F (reference, not gated): 8 failed" in out and "S+P: 8 failed" in out
    assert G.check([path], gated=["X"]) == 0
    out = capsys.readouterr().out
    assert "X: PASS" in out and "S+P (reference, not gated): 8 failed" in out
    assert G.main(["check", path, "--gated", "X"]) == 0 and G.main(["check", path, "--gated", "F"]) == 1
    capsys.readouterr()


def test_rules_parse_and_the_background_is_paired():
    assert G.parse_rule("S+F", 2.0) == G.Rule("S+F", G.FLOOR, 2.0)
    assert G.parse_rule("F", 2.0).c0 is None and G.parse_rule("TODAY", 2.0).floor == 0.02
    # session 40 (A2): the engine's defaults moved to L+F; TODAY stays the earlier rule, and every rule but L
    # decides with SECOND_LOOK "undecided" whatever the defaults
    assert G.parse_rule("TODAY", 2.0) == G.Rule("TODAY", 0.02, None, (), "undecided")
    assert G.parse_rule("S", 2.0).floor == 0.02 and G.parse_rule("F", 2.0).look == "undecided"
    assert G.parse_rule("L+F", 2.0).look == "sections"
    with G.in_force(G.parse_rule("TODAY", 2.0)):
        assert (G.bgm.SE_FLOOR, G.bgm.SECOND_LOOK) == (0.02, "undecided")
    assert (G.bgm.SE_FLOOR, G.bgm.SECOND_LOOK) == (0.06, "sections")  # restored: the defaults
    with pytest.raises(SystemExit, match="tokens"):
        G.parse_rule("S+Q", 2.0)
    with pytest.raises(SystemExit, match="L needs F"):  # the engine refuses "sections" under the floor
        G.parse_rule("L", 2.0)
    a = G.simulated_background(7, [0.3, 0.0], 0.1, 0.055)
    b = G.simulated_background(7, [0.3, 0.0], 0.1, 0.055)
    first, again = a(None, None), b(None, None)
    assert first == again and len(first["runs"]) == 8 and first["pairs"] == 64
    assert len(a(None, None, True)["runs"]) == 7
    assert np.allclose(np.mean(first["runs"], 0), first["slope"])


def test_the_engine_switch_decides_as_the_gate_s_wrapper():
    """Session 39's build (``background.SECOND_LOOK = "sections"``, rule ``L+F``) decides every simulated
    stack as the gate's wrapper of ``align.classify`` (rule ``S+F+A``) did: the same detrend, slope and second
    look (still background and stage + organelle drift, se 0.05 / 0.10 / 0.135 with the per-look bias)."""
    rng = np.random.default_rng(39)
    wrapper, built = G.parse_rule("S+F+A", 2.0), G.parse_rule("L+F", 2.0)
    reached = 0
    for kind in ("stage", "stage+organelles"):
        for _ in range(150):
            positions, truth, _ = G.draw_stack(rng, kind)
            test = {"p": 1e-12, "slope": list(np.polyfit(np.arange(G.SECTIONS), positions, 1)[0])}
            for se in (0.05, 0.10, 0.135):
                seed = int(rng.integers(1 << 62))
                a = G.decide(test, G.simulated_background(seed, truth, se, 0.055), wrapper)
                b = G.decide(test, G.simulated_background(seed, truth, se, 0.055), built)
                assert a[:2] == b[:2] and np.allclose(a[2], b[2]) and a[3] == b[3]
                today = G.decide(test, G.simulated_background(seed, truth, se, 0.055), G.parse_rule("F", 2.0))
                reached += a[3] and not today[3]
    assert reached >= 50  # stacks where the "sections" second look ran


def test_check_refuses_files_of_other_seeds_or_c0_and_repeated_cells(tmp_path, capsys):
    """Review 2 of session 39: ``check`` compared only N, so two kinds of the fresh seed and two of the
    development seed printed PASS on 32 cells. Now each file's seed, c0, N, rules and kinds are printed;
    files of another seed or c0 are refused (exit status 2) unless ``mix``; a cell (kind, se, bias, rule)
    given twice is refused (2) always; the seed is printed beside each rule's verdict."""
    cells = _full(("TODAY", "S+F+A"))
    half = [c for c in cells if c["kind"] in ("null", "stage+organelles")]  # run --kinds 0 2
    rest = [c for c in cells if c["kind"] not in ("null", "stage+organelles")]

    def write(name, part, seed, c0=2.0):
        path = tmp_path / name
        path.write_text(
            json.dumps({"n": 2000, "seed": seed, "c0": c0, "rules": ["TODAY", "S+F+A"], "cells": part})
        )
        return str(path)

    a, b = write("a.json", half, [3939, 39]), write("b.json", rest, [3939, 39])
    assert G.check([a, b], gated=["S+F+A"]) == 0
    out = capsys.readouterr().out
    assert f"{a}: seed [3939, 39], c0 2.0, N 2000, rules TODAY S+F+A, kinds null stage+organelles" in out
    assert "S+F+A: PASS (seed [3939, 39])" in out
    dev = write("dev.json", rest, [3838, 38])
    assert G.check([a, dev], gated=["S+F+A"]) == 2
    out = capsys.readouterr().out
    assert "different seeds" in out and "--mix" in out and "PASS" not in out
    assert G.check([a, dev], gated=["S+F+A"], mix=True) == 0
    assert "S+F+A: PASS (seeds [3939, 39] [3838, 38], mixed)" in capsys.readouterr().out
    assert G.check([a, write("c1.json", rest, [3939, 39], c0=3.0)]) == 2
    assert "different c0" in capsys.readouterr().out
    assert G.check([a, write("a2.json", half[:1], [3939, 39])]) == 2  # a cell twice, even of one seed
    out = capsys.readouterr().out
    assert "given twice" in out and "null se 0.05 bias 0 TODAY" in out and "PASS" not in out
    assert G.check([a, write("a3.json", half[:1], [3838, 38])], mix=True) == 2  # --mix does not allow it
    capsys.readouterr()
    assert G.main(["check", a, dev, "--gated", "S+F+A"]) == 2
    assert G.main(["check", a, dev, "--gated", "S+F+A", "--mix"]) == 0
    capsys.readouterr()


def test_gate_w_also_passes_a_first_look_against_the_trend_far_from_0():
    """Session 41 (item 2, measurement only): ``W`` is ``A``, or a first look whose chi-square from 0 (at the
    floor) reaches the rule's ``c0_against`` whatever its direction; the bound is the rule's own (review 1: no
    module setting changed by a run), and ``S+F+W`` parses with it."""
    trend = [0.3, 0.0]
    against = {"slope": [-0.1, 0.0], "se": [0.06, 0.06]}  # chi-square from 0: (0.1 / 0.06)^2 = 2.78
    assert not G.GATES["A"](trend, against, 0.06)
    strict, loose = G.parse_rule("S+F+W", 2.0, 2.8), G.parse_rule("S+F+W", 2.0, 2.7)
    assert strict.gates == ("W",) and strict.floor == 0.06 and strict.c0 == 2.0 and strict.c0_against == 2.8
    assert not G.GATES["W"](trend, against, 0.06, strict)
    assert G.GATES["W"](trend, against, 0.06, loose)
    along = {"slope": [0.01, 0.0], "se": [0.06, 0.06]}  # along the trend: A's, whatever the distance
    assert G.GATES["W"](trend, along, 0.06, G.parse_rule("S+F+W", 2.0, 100.0))
    assert G.parse_rule("S+F+W", 2.0).c0_against == G.C0_AGAINST == 5.0


def test_every_gate_takes_the_rule_and_no_name_is_special():
    """Session 42 (session 41's reread): the gates are called alike, ``gate(trend, motion, floor, rule)``;
    ``W`` reads its bound from the rule it is given (and :data:`C0_AGAINST` without one), ``P`` / ``A`` ignore
    it; the wrapped classify passes each rule's own bound (two rules, two bounds, one module)."""
    import inspect

    assert not hasattr(G, "_gate") and not hasattr(G, "functools")
    for gate in G.GATES.values():
        assert list(inspect.signature(gate).parameters) == ["trend_slope", "motion", "floor", "rule"]
    trend, against = [0.3, 0.0], {"slope": [-0.1, 0.0], "se": [0.06, 0.06]}  # chi-square from 0: 2.78
    assert G.GATES["W"](trend, against, 0.06) is False  # C0_AGAINST 5
    assert G.GATES["W"](trend, against, 0.06, G.parse_rule("S+F+W", 2.0, 2.7)) is True
    assert G.GATES["A"](trend, against, 0.06, G.parse_rule("S+F+W", 2.0, 2.7)) is False

    def classify(trend_slope, motion, floor=None):
        return "sections", -0.3

    loose, strict = (G._wrapped(classify, G.parse_rule("S+F+W", 2.0, c)) for c in (2.7, 2.8))
    assert loose(trend, against, 0.06)[0] == "undecided" and strict(trend, against, 0.06)[0] == "sections"
