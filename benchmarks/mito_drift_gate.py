"""MITO drift decision: the simulation gate for a change of ``drift_correction="auto"`` (issue 15).

Session 38 A3's gate (``/tmp/s38/A3/sim_gate2.py``, lost with /tmp), committed in session 39 so that
the next session does not rebuild it. It simulates only the generator's model; it can reject a
candidate rule, it cannot make one a default (that needs stack runs, docs/mito.md).

**Model.** Per stack: 160 sections whose positions scatter by 3.5 px per axis and wander by a walk
of 0.3 px per section per axis, plus a straight trend. Four kinds (index in the seed):

* 0 ``null``: no trend, the background still;
* 1 ``stage``: the sections drift 0.5 px per section in a random direction, the background still
  (the right answer is to keep the trend);
* 2 ``stage+organelles``: that stage drift plus an organelle drift of U(0.33, 0.35) px per section
  (as the generator draws stage-drift+drift) in an independent random direction; the background moves
  by the organelle drift alone (the right answer is "both", removing the organelles' slope);
* 3 ``organelles``: the organelle drift alone, the background moves with it (remove the trend).

:func:`napari_nephi.engines.mito.detrend.trend_test` reads the positions once per stack. The background
is simulated as in ``tests/mito/test_background.py``: each look is 8 run means (7 on the second look)
drawn around the truth with a spread of ``se * sqrt(8)`` per axis, plus (bias cells) a bias N(0,
0.055^2) per axis drawn anew for each look (the tissue's own apparent motion read with the generator's
true matrices, docs/mito.md session 37 A2). ``align._auto_decision`` runs at HEAD on it. Cells: per-look
se 0.05 / 0.06 / 0.10 / 0.135, bias none / 0.055.

**Rules** (``--rules``), paired: the same positions, trend test and background draws (a seed per stack
and cell) for every rule.

* ``TODAY``: the earlier rule, ``background.SE_FLOOR`` 0.02 and ``SECOND_LOOK`` "undecided" (the
  engine's defaults up to session 40, which moved them to ``L+F``; the name kept so that the gate's
  files and commands read as before). Every rule but ``L`` decides with ``SECOND_LOOK`` "undecided" and
  every rule without ``F`` with the floor 0.02 (:data:`EARLIER_FLOOR`), whatever the engine's defaults;
* ``F``: ``SE_FLOOR`` 0.06 (reference only, not gated);
* ``S``: a first look that reads "sections" with a chi-square from 0, ``sum((b / max(se, floor))^2)``,
  of at least ``--c0`` (2) is taken as "undecided", so it gets the second look and both looks' runs
  decide, no ``FAVOUR`` (``align.classify`` wrapped for the first call of each decision);
* ``S+F``: both; further gates on S's first look can be added as ``+`` tokens (see :data:`GATES`):
  ``P`` (session 39), the first look's slope ``b`` projects positively on the trend ``s`` (``b . s > 0``);
  ``A`` (session 39), ``P`` or the first look's se under the floor on an axis;
  ``W`` (session 41, a diagnosis of organelles drifting against the stage, not a candidate): ``A`` or a
  chi-square from 0 of at least ``--c0-against`` (5; recorded as ``c0_against``) whatever the direction;
  every gate is called with the rule it serves (session 42: ``W`` reads its bound there, no name special);
* ``L``: the engine's own ``background.SECOND_LOOK = "sections"`` (session 39's build of ``S+A``, no
  wrapper; ``L+F`` decides as ``S+F+A``). Only with ``F``: the engine refuses "sections" under the floor
  0.06 (``background.SECTIONS_MIN_FLOOR``), since ``S+P`` failed C2 on the development seed.

**Clauses** (``check``; session 38 A3's, written before its output, ``/tmp/s38/A3/prereg.txt``), for
each gated rule against ``TODAY`` in every cell, counts of ``N`` (bounds scaled from 2000 to ``N``):
C1 nulls detrended <= TODAY + 10; C2 stage detrended <= TODAY + 20; C3 organelles detrended >= TODAY
- 20; C4 stage+organelles: (a) the rms error of the removed slope against the organelle drift does not
grow at 3 decimals, (b) detrended rises where TODAY < 1980, falls by at most 20 where TODAY >= 1980.

A gated rule passes only with all 32 cells (4 kinds x 4 se x 2 biases) beside ``TODAY``'s; with fewer
``check`` prints ``INCOMPLETE (n of 32)``. Gated (``--gated``): by default every rule but ``TODAY`` and
``F``; the others are printed as reference. ``check`` prints each file's seed, c0, N, rules and kinds,
and the seed beside each verdict; it refuses (exit status 2, a message) files whose N differ, files whose
seed or c0 differ (unless ``--mix``: a gate reads one seed) and a cell (kind, se, bias, rule) given twice
(session 39, review 2). Exit status otherwise: 1 where a gated rule fails a clause (in the cells there
are), else 3 where one is incomplete, else 0. ``run`` checks its own file, so a run over fewer than 4
kinds ends INCOMPLETE (status 3): check the files together.

Cells print as: detrended / removed the background's slope ("both") / removed the whole trend / rms
error of the removed slope (px per section; against 0 for null and stage, kept stacks remove 0) /
stacks given a second look.

Commands (``OMP_NUM_THREADS=1 nice -n 5``; ``--n`` 2000 by default; session 39's fresh gate ran ``S+F+P``
too). Run time at N 2000 with 4 rules: 74-82 CPU s per kind (session 39's ten runs: 152-156 CPU s per 2
kinds, 74-82 per kind alone; ``cpu_s`` in the JSON), 5-10 min of wall per 2-kind process at load 5-7 on
2 cores::

    python benchmarks/mito_drift_gate.py run --seed 3939 39 --kinds 0 2 --rules TODAY S+F S+F+A --json a.json
    python benchmarks/mito_drift_gate.py run --seed 3939 39 --kinds 1 3 --rules TODAY S+F S+F+A --json b.json
    python benchmarks/mito_drift_gate.py check a.json b.json --gated S+F+A

``--gated S+F+A`` judges the one preregistered candidate (exit 0: it passes all 32 cells of the
seed; 1: a clause fails; 3: INCOMPLETE, fewer than 32 cells); without it S+F is gated too (it fails C2
on the development seed).

The kind's index is appended to ``--seed`` (session 38 A3: ``[3838, 38, kind]``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from napari_nephi.engines.mito import align
from napari_nephi.engines.mito import background as bgm
from napari_nephi.engines.mito.detrend import trend_test

KINDS = ("null", "stage", "stage+organelles", "organelles")
SES = (0.05, 0.06, 0.10, 0.135)
BIASES = (0.0, 0.055)
SECTIONS, SCATTER, WALK = 160, 3.5, 0.3
STAGE, ORGANELLES = 0.5, (0.33, 0.35)
RUNS, RUNS_SECOND = 8, 7
FLOOR = 0.06
#: Session 40 (A2): the floor of the rules without ``F`` (the engine's default up to session 40).
EARLIER_FLOOR = 0.02


def _along_trend(trend_slope, motion, floor, rule=None) -> bool:
    """Session 39's gate ``P``: the first look's slope projects positively on the trend (share > 0). Every
    gate takes the rule it serves (session 42: ``W`` reads its bound there; the others need none)."""
    return float(np.dot(motion["slope"], trend_slope)) > 0


def _along_or_floored(trend_slope, motion, floor, rule=None) -> bool:
    """Session 39's gate ``A``: ``P``, or the floor raised the first look's se on an axis (there the floor,
    not the runs' noise, may have made the "sections", and a still background's pooled look is read at the
    floor)."""
    return _along_trend(trend_slope, motion, floor) or float(np.min(motion["se"])) < floor


#: Session 41 (item 2, a diagnosis): the chi-square from 0 from which gate ``W`` also lets a first look that
#: points against the trend through (``--c0-against``; recorded in the run's JSON as ``c0_against``).
C0_AGAINST = 5.0


def _along_floored_or_far(trend_slope, motion, floor, rule=None) -> bool:
    """Session 41's gate ``W`` (measurement only, not a candidate): ``A``, or the first look lies at least
    the rule's ``c0_against`` (:data:`C0_AGAINST` unless ``--c0-against``; without a rule
    :data:`C0_AGAINST`) in chi-square from 0 whatever its direction (stage-drift+drift 111 / 114, whose
    organelles drift against the stage: first looks 5.66 / 8.64 against the trend; the 12 stage-drift rows of
    seeds 106-117: at most 3.70; docs/mito.md, session 41)."""
    c0_against = C0_AGAINST if rule is None else rule.c0_against
    return _along_or_floored(trend_slope, motion, floor) or chi_from_0(motion, floor) >= c0_against


#: Gates on S's first look (tokens of a rule's name besides ``S`` and ``F``), session 39: ``P``, the first
#: look's slope points along the trend (:func:`_along_trend`); ``A``, ``P`` or a se under the floor
#: (:func:`_along_or_floored`); session 41: ``W``, ``A`` or far from 0 (:func:`_along_floored_or_far`).
#: Each is called ``gate(trend_slope, motion, floor, rule)`` (session 42: no name special-cased).
GATES: dict = {"P": _along_trend, "A": _along_or_floored, "W": _along_floored_or_far}
#: Clause bounds in stacks of 2000 (scaled to N).
C1, C2, C3, C4_HIGH, C4_DROP = 10, 20, 20, 1980, 20


@dataclass(frozen=True)
class Rule:
    name: str
    floor: float
    c0: float | None  # None: no second look on "sections"
    gates: tuple = ()
    look: str = "undecided"  # background.SECOND_LOOK while deciding (session 40: never as found)
    c0_against: float = C0_AGAINST  # gate W's bound (session 41), bound into the rule as c0 is


def parse_rule(name: str, c0: float, c0_against: float = C0_AGAINST) -> Rule:
    """``TODAY``, or ``+``-joined tokens: ``F`` (the floor), ``S`` (second look on "sections" at ``c0``),
    the names of :data:`GATES`, ``L`` (the engine's ``SECOND_LOOK`` "sections")."""
    if name == "TODAY":  # session 40 (A2): the earlier rule, not the engine's defaults as found
        return Rule(name, EARLIER_FLOOR, None)
    tokens = name.split("+")
    unknown = [t for t in tokens if t not in ("F", "S", "L", *GATES)]
    if unknown or len(set(tokens)) != len(tokens):
        raise SystemExit(f"rule {name!r}: tokens are F, S, L, {', '.join(GATES)}, each once")
    gates = tuple(t for t in tokens if t in GATES)
    if (gates and "S" not in tokens) or ("S" in tokens and "L" in tokens):
        raise SystemExit(f"rule {name!r}: a gate needs S, and L is not combined with S")
    if "L" in tokens and "F" not in tokens:
        raise SystemExit(f"rule {name!r}: L needs F (the engine refuses 'sections' under the floor 0.06)")
    floor = FLOOR if "F" in tokens else EARLIER_FLOOR
    look = "sections" if "L" in tokens else "undecided"
    return Rule(name, floor, c0 if "S" in tokens else None, gates, look=look, c0_against=c0_against)


def chi_from_0(motion: dict, floor: float) -> float:
    b, se = np.asarray(motion["slope"], np.float64), np.maximum(np.asarray(motion["se"], np.float64), floor)
    return float(((b / se) ** 2).sum())


def _wrapped(classify, rule: Rule):
    """``align.classify`` with S's first-look "sections" turned into "undecided" (first call only)."""
    calls = [0]

    def wrapped(trend_slope, motion, floor=None):
        decision, share = classify(trend_slope, motion, floor=floor)
        floor = rule.floor if floor is None else floor
        calls[0] += 1
        if calls[0] == 1 and decision == "sections" and chi_from_0(motion, floor) >= rule.c0:
            if all(GATES[g](trend_slope, motion, floor, rule) for g in rule.gates):
                return "undecided", share
        return decision, share

    return wrapped


@contextlib.contextmanager
def in_force(rule: Rule):
    saved = bgm.SE_FLOOR, align.classify, bgm.SECOND_LOOK
    bgm.SE_FLOOR = rule.floor
    if rule.c0 is not None:
        align.classify = _wrapped(saved[1], rule)
    bgm.SECOND_LOOK = rule.look
    try:
        yield
    finally:
        bgm.SE_FLOOR, align.classify, bgm.SECOND_LOOK = saved


def simulated_background(seed: int, truth, se: float, bias: float):
    """A look: ``RUNS`` run means (``RUNS_SECOND`` on the second) around ``truth`` + a per-look bias."""
    rng = np.random.default_rng(seed)

    def background(matrices, use, second=False, **_):
        k = RUNS_SECOND if second else RUNS
        shift = rng.normal(0.0, bias, 2)
        means = rng.normal(np.asarray(truth) + shift, se * math.sqrt(RUNS), (k, 2))
        sd = means.std(0, ddof=1) / math.sqrt(k)
        return {"slope": list(means.mean(0)), "se": list(sd), "pairs": 8 * k, "runs": means.tolist()}

    return background


def draw_stack(rng, kind: str):
    """``(positions, background truth, organelle drift)`` of one stack (every draw made for every kind)."""
    a_stage, a_org = rng.uniform(0, 2 * math.pi, 2)
    size = rng.uniform(*ORGANELLES)
    noise = rng.normal(0, SCATTER, (SECTIONS, 2)) + np.cumsum(rng.normal(0, WALK, (SECTIONS, 2)), axis=0)
    stage = STAGE * np.array([math.cos(a_stage), math.sin(a_stage)])
    org = size * np.array([math.cos(a_org), math.sin(a_org)])
    stage = stage if kind in ("stage", "stage+organelles") else 0 * stage
    org = org if kind in ("organelles", "stage+organelles") else 0 * org
    return noise + np.outer(np.arange(SECTIONS), stage + org), org, org


def decide(test: dict, background, rule: Rule):
    """``(detrended, how, removed slope, second look?)`` of one stack under ``rule``."""
    t = dict(test)
    with in_force(rule):
        detrend, slope = align._auto_decision(t, None, np.ones(SECTIONS, bool), background)
    second = "first_look" in t.get("background", {})
    if not detrend:
        return False, "kept", np.zeros(2), second
    if slope is None:
        return True, "whole", np.asarray(test["slope"], np.float64), second
    return True, "both", np.asarray(slope, np.float64), second


def run(n: int, seed: list[int], kinds: list[int], rules: list[Rule], log=sys.stderr) -> dict:
    cells = {}
    for ki in kinds:
        kind = KINDS[ki]
        rng = np.random.default_rng([*seed, ki])
        t0 = time.process_time()
        for i in range(n):
            positions, truth, target = draw_stack(rng, kind)
            seeds = rng.integers(1 << 62, size=len(SES) * len(BIASES))
            test = trend_test(positions, np.ones(SECTIONS, bool))
            for c, (se, bias) in enumerate((se, b) for se in SES for b in BIASES):
                for rule in rules:
                    bg = simulated_background(int(seeds[c]), truth, se, bias)
                    detrended, how, removed, second = decide(test, bg, rule)
                    cell = cells.setdefault(
                        (kind, se, bias, rule.name),
                        {"detrended": 0, "both": 0, "whole": 0, "sq": 0.0, "second_looks": 0},
                    )
                    cell["detrended"] += detrended
                    cell["both"] += how == "both"
                    cell["whole"] += how == "whole"
                    cell["sq"] += float(((removed - target) ** 2).sum())
                    cell["second_looks"] += second
            if (i + 1) % 250 == 0:
                print(f"{kind}: {i + 1}/{n} ({time.process_time() - t0:.0f} CPU s)", file=log, flush=True)
    out = []
    for (kind, se, bias, name), c in cells.items():
        rms = math.sqrt(c.pop("sq") / n)
        out.append({"kind": kind, "se": se, "bias": bias, "rule": name, **c, "rms": rms})
    return {"n": n, "seed": seed, "kinds": [KINDS[k] for k in kinds], "cells": out}


def clause_failures(table: dict, rule: str, n: int) -> list[tuple]:
    """``[(kind, se, bias, clause, TODAY's value, the rule's)]``: the clauses ``rule`` fails against
    ``TODAY`` in ``table`` (``{(kind, se, bias, rule): {"detrended", "rms"}}``), bounds scaled to ``n``."""
    k = n / 2000
    out = []
    for (kind, se, bias, name), cell in sorted(table.items()):
        if name != rule or (kind, se, bias, "TODAY") not in table:
            continue
        today = table[(kind, se, bias, "TODAY")]
        d, t = cell["detrended"], today["detrended"]
        if kind == "null" and d > t + C1 * k:
            out.append((kind, se, bias, "C1", t, d))
        if kind == "stage" and d > t + C2 * k:
            out.append((kind, se, bias, "C2", t, d))
        if kind == "organelles" and d < t - C3 * k:
            out.append((kind, se, bias, "C3", t, d))
        if kind == "stage+organelles":
            if round(cell["rms"], 3) > round(today["rms"], 3):
                out.append((kind, se, bias, "C4a", round(today["rms"], 3), round(cell["rms"], 3)))
            if (t < C4_HIGH * k and d <= t) or (t >= C4_HIGH * k and d < t - C4_DROP * k):
                out.append((kind, se, bias, "C4b", t, d))
    return out


CELLS = len(KINDS) * len(SES) * len(BIASES)  # 32: a gated rule passes only with all of them
INCOMPLETE = 3  # check's exit status where a gated rule has fewer cells beside TODAY's (1: a clause fails)


def cells_beside_today(table: dict, rule: str) -> int:
    """How many of the 32 cells (kind, se, bias) ``table`` holds for both ``rule`` and ``TODAY``."""
    return sum(
        (kind, se, bias, rule) in table and (kind, se, bias, "TODAY") in table
        for kind in KINDS
        for se in SES
        for bias in BIASES
    )


REFUSED = 2  # check's exit status where the files do not belong together (seed, c0, N) or repeat a cell


def _seed_text(seed) -> str:
    return "?" if seed is None else f"[{', '.join(str(s) for s in seed)}]"


def check(paths: list[str], out=None, gated: list[str] | None = None, mix: bool = False) -> int:
    """Prints each file's seed, c0, N, rules and kinds, the table and each rule's clause check (the seed
    beside each verdict). ``gated``: the rules judged (default: every rule but ``TODAY`` and ``F``; the
    others are reference). Returns :data:`REFUSED` (2, a message) where the files' N differ, where their
    seed or c0 differ (unless ``mix``) or where a cell (kind, se, bias, rule) is given twice; else 1 where a
    gated rule fails a clause, else :data:`INCOMPLETE` where a gated rule lacks some of the 32 cells beside
    ``TODAY``'s, else 0."""
    out = sys.stdout if out is None else out
    table, rules, files, twice = {}, [], [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        kinds = data.get("kinds") or sorted({c["kind"] for c in data["cells"]}, key=KINDS.index)
        names = data.get("rules") or list(dict.fromkeys(c["rule"] for c in data["cells"]))
        files.append((data.get("seed"), data.get("c0"), data["n"]))
        print(
            f"{path}: seed {_seed_text(data.get('seed'))}, c0 {data.get('c0', '?')}, N {data['n']},"
            f" rules {' '.join(names)}, kinds {' '.join(kinds)}",
            file=out,
        )
        for c in data["cells"]:
            key = (c["kind"], c["se"], c["bias"], c["rule"])
            if key in table:
                twice.append(key)
            table[key] = c
            rules += [c["rule"]] if c["rule"] not in rules else []
    seeds = list(dict.fromkeys(_seed_text(f[0]) for f in files))
    refused = []
    if len({f[2] for f in files}) > 1:
        refused.append("the files have different N (the bounds scale with N)")
    for what, i in (("seeds", 0), ("c0", 1)):
        if not mix and len({json.dumps(f[i]) for f in files}) > 1:
            refused.append(
                f"the files have different {what}: a gate reads one seed and one c0 (--mix pools them)"
            )
    if twice:  # a later file's cell would overwrite an earlier one's
        listed = ", ".join(f"{k} se {se:g} bias {b:g} {r}" for k, se, b, r in twice[:4])
        refused.append(f"{len(twice)} cell(s) given twice: {listed}{', ...' if len(twice) > 4 else ''}")
    if refused:
        print("REFUSED: " + "; ".join(refused), file=out)
        return REFUSED
    n = files[0][2]
    seed = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {' '.join(seeds)}, mixed"
    gated = [r for r in rules if r not in ("TODAY", "F")] if gated is None else list(gated)
    fails = {r: clause_failures(table, r, n) for r in [*rules, *gated] if r != "TODAY"}
    print(f"| kind | se | bias | {' | '.join(rules)} |", file=out)
    print("|---|---|---|" + "---|" * len(rules), file=out)
    for kind in KINDS:
        for se in SES:
            for bias in BIASES:
                row = []
                for r in rules:
                    c = table.get((kind, se, bias, r))
                    if c is None:
                        row.append("")
                        continue
                    mark = [f[3] for f in fails.get(r, []) if f[:3] == (kind, se, bias)]
                    text = " / ".join(str(c[k]) for k in ("detrended", "both", "whole"))
                    text += f" / {c['rms']:.3f} / {c['second_looks']}"
                    row.append(text + (f" **FAIL {','.join(mark)}**" if mark else ""))
                if any(row):
                    print(f"| {kind} | {se:g} | {bias:g} | {' | '.join(row)} |", file=out)
    failed = incomplete = False
    for r, f in fails.items():
        judged, have = r in gated, cells_beside_today(table, r)
        verdict = f"{len(f)} failed" if f else "PASS" if have == CELLS else f"INCOMPLETE ({have} of {CELLS})"
        if f and have < CELLS:
            verdict += f", INCOMPLETE ({have} of {CELLS})"
        print(f"{r}{'' if judged else ' (reference, not gated)'}: {verdict} ({seed})", file=out)
        for kind, se, bias, clause, t, d in f:
            print(f"  {clause} {kind} se {se:g} bias {bias:g}: TODAY {t} -> {d}", file=out)
        failed |= judged and bool(f)
        incomplete |= judged and have < CELLS
    return 1 if failed else INCOMPLETE if incomplete else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="simulate; JSON of the cells")
    r.add_argument("--n", type=int, default=2000)
    r.add_argument("--seed", type=int, nargs="+", default=[3838, 38])
    r.add_argument(
        "--kinds", type=int, nargs="+", default=[0, 1, 2, 3], help="0 null, 1 stage, 2 s+o, 3 org."
    )
    r.add_argument("--rules", nargs="+", default=["TODAY", "F", "S", "S+F"])
    r.add_argument("--c0", type=float, default=2.0)
    r.add_argument(
        "--c0-against", type=float, default=C0_AGAINST, help="gate W's chi-square from 0 (session 41)"
    )
    r.add_argument("--json", required=True)
    c = sub.add_parser("check", help="the table and the clauses C1-C4 from run's JSONs")
    c.add_argument("json", nargs="+")
    c.add_argument("--gated", nargs="+", help="the rules judged (default: every rule but TODAY and F)")
    c.add_argument("--mix", action="store_true", help="pool files of different seeds or c0 (else exit 2)")
    a = p.parse_args(argv)
    if a.cmd == "check":
        return check(a.json, gated=a.gated, mix=a.mix)
    rules = [parse_rule(name, a.c0, a.c0_against) for name in a.rules]
    if rules[0].name != "TODAY":
        rules.insert(0, parse_rule("TODAY", a.c0))
    t0 = time.process_time()
    result = run(a.n, a.seed, a.kinds, rules)
    if any("W" in x.gates for x in rules):
        result["c0_against"] = a.c0_against
    result.update(c0=a.c0, rules=[x.name for x in rules], cpu_s=round(time.process_time() - t0, 1))
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    return check([a.json])


if __name__ == "__main__":
    raise SystemExit(main())
