"""Where stage 2 of the plate lookup's pose search spends its CPU, step by step (session 44, issue 12).

:mod:`atlas_lookup_profile` splits a lookup by kind of work (cuts, fields, correlations); this splits
stage 2 (:class:`napari_nephi.engines.atlas.rerank._Refine`) by the step that asks for the work: the
untilted step (plates near each hypothesis at three scales), the joint tilt grid (every pitch x yaw at
``tilt_step``), the finer grid around its best, rotation and scale at the tilt, the second tilt round,
the scan along the plate axis. Per step: exclusive CPU of the oblique cuts (volume sampling, fields,
FFTs), the plate cuts, the correlations (:meth:`SectionGrid._scores`) and the section variants, the
pairs scored, the calls, the oblique cuts made and asked (a memoised cut is asked but not made), the
plate cuts. Stage 1 (everything before stage 2's grid) is one row. The sections are the benchmark's
(``atlas_paired.sections_of``: query seed ``S`` gives 60 sections, 12 per case); the first stage's order
(``AtlasLookup.search_order``) is timed apart. 1 thread; timings depend on the machine's load (printed).

Session 45: ``--arm-b JSON`` runs a second arm of options on every section in the same process (arm a:
``--rerank-options``), the arms' order alternating section by section as :mod:`atlas_paired`'s (arm a
first on the 1st, 3rd, ... section), so their CPU is paired under the same load: a table per arm, then the
whole lookup (the first stage's order and the pose search) per arm, median, and per section b / a, median.

Usage::

    cd benchmarks
    OMP_NUM_THREADS=1 nice -n 5 ../.venv/bin/python atlas_stage2_steps.py --index /tmp/c13/idx \\
        --seeds 167,168 --compartments labels --per-case 4 [--rerank-options JSON] [--arm-b JSON] \\
        [--json OUT]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atlas_paired  # noqa: E402

from napari_nephi.engines.atlas import pose_grid, rerank  # noqa: E402

#: Steps in the order a hypothesis runs them ("stage 1": all before stage 2's grid is built).
STEPS = ("stage 1", "untilted", "joint grid", "finer grid", "rotation and scale", "second round", "z scan")
#: Kinds of work timed within each step (exclusive CPU).
KINDS = ("oblique cuts", "plate cuts", "correlations", "section variants")


class StepClock:
    """Exclusive CPU per (step, kind) and counts per step, of the methods patched by :meth:`patch`."""

    def __init__(self):
        self.step = "stage 1"
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)
        self.count: dict[tuple[str, str], int] = defaultdict(int)
        self._saved: list[tuple[type, str, object]] = []

    def _set(self, cls, name: str, make) -> None:
        original = cls.__dict__[name]
        self._saved.append((cls, name, original))
        setattr(cls, name, make(original))

    def _in_step(self, step: str):
        def make(original):
            def run(obj, *a, **k):
                before, self.step = self.step, step
                try:
                    return original(obj, *a, **k)
                finally:
                    self.step = before

            return run

        return make

    def _timed(self, kind: str, counted=None):
        def make(original):
            def run(obj, *a, **k):
                made = len(obj._cut_memo) if counted else 0
                t0 = time.process_time()
                try:
                    return original(obj, *a, **k)
                finally:
                    self.cpu[(self.step, kind)] += time.process_time() - t0
                    if counted:
                        counted(obj, a, made)

            return run

        return make

    def patch(self) -> None:
        clock = self

        def oblique(obj, args, made):
            clock.count[(clock.step, "oblique made")] += len(obj._cut_memo) - made
            clock.count[(clock.step, "oblique asked")] += len(args[1])

        def plate(obj, args, made):
            clock.count[(clock.step, "plate cuts")] += 1

        def init(original):
            def run(obj, *a, **k):
                clock.step = "stage 2 set-up"
                return original(obj, *a, **k)

            return run

        def tilted(original):
            def run(obj, *a, **k):
                before, clock.step = clock.step, "joint grid"
                try:
                    return original(obj, *a, **k)
                finally:
                    clock.step = before

            return run

        def finer(original):  # the first finer grid of a tilt search, then the second round's
            def run(obj, *a, **k):
                if clock.step == "joint grid":
                    clock.step = "finer grid"
                elif clock.step == "after rotation and scale":
                    clock.step = "second round"
                return original(obj, *a, **k)

            return run

        def turn(original):
            def run(obj, *a, **k):
                clock.step = "rotation and scale"
                try:
                    return original(obj, *a, **k)
                finally:
                    clock.step = "after rotation and scale"

            return run

        def score(original):
            def run(obj, pairs, *a, **k):
                clock.count[(clock.step, "pairs")] += len(pairs)
                clock.count[(clock.step, "calls")] += 1
                return original(obj, pairs, *a, **k)

            return run

        refine = rerank._Refine
        self._set(refine, "__init__", init)
        self._set(refine, "untilted", self._in_step("untilted"))
        self._set(refine, "tilted", tilted)
        self._set(refine, "_finer_tilts", finer)
        self._set(refine, "_turn_and_scale", turn)
        self._set(refine, "z_scan", self._in_step("z scan"))
        self._set(refine, "_score", score)
        grid = pose_grid.SectionGrid
        self._set(grid, "oblique_cuts", self._timed("oblique cuts", oblique))
        self._set(grid, "plate_cut", self._timed("plate cuts", plate))
        self._set(grid, "_scores", self._timed("correlations"))
        self._set(grid, "variant", self._timed("section variants"))

    def unpatch(self) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()


def _step_of(step: str) -> str:
    """A clock state as its row (the state after rotation and scale adds to the second round)."""
    return {"after rotation and scale": "second round", "stage 2 set-up": "untilted"}.get(step, step)


def table(rows: list[dict]) -> str:
    """Mean ms per section of each (step, kind) and mean counts per step, as text."""
    n = len(rows)
    cpu, count = defaultdict(float), defaultdict(float)
    for r in rows:
        for key, v in r["cpu_ms"].items():
            step, kind = key.split("|")
            cpu[(_step_of(step), kind)] += v / n
        for key, v in r["count"].items():
            step, kind = key.split("|")
            count[(_step_of(step), kind)] += v / n
    head = ["step", *KINDS, "pairs", "calls", "oblique made", "oblique asked", "plate cuts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in STEPS:
        cells = [f"{cpu[(step, k)]:.1f}" for k in KINDS]
        cells += [f"{count[(step, k)]:.1f}" for k in head[len(KINDS) + 1 :]]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    stage2 = sum(v for (s, _), v in cpu.items() if s != "stage 1")
    lines.append(
        f"stage 2 timed: {stage2:.1f} ms; stage 1 timed: {sum(cpu[('stage 1', k)] for k in KINDS):.1f} ms"
    )
    search = [r["search_ms"] for r in rows]
    order = [r["order_ms"] for r in rows]
    ranks = [r["rank"] for r in rows]
    lines.append(
        f"search (both stages) median {np.median(search):.0f} ms, mean {np.mean(search):.0f} ms; "
        f"first stage's order mean {np.mean(order):.1f} ms; mean rank {np.mean(ranks):.3f} over {n} sections"
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="index folder (or a folder holding it as 'ours')")
    p.add_argument("--seeds", required=True, help="comma-separated query seeds")
    p.add_argument("--compartments", default="labels", help="labels, foreign, independent or marker")
    p.add_argument("--per-case", type=int, default=4, help="sections per case and seed (at most 12)")
    p.add_argument("--rerank-options", default="{}", help="JSON options of the re-ranking (rerank.DEFAULTS)")
    p.add_argument("--json", default=None, help="write every section's steps here")
    p.add_argument("--arm-b", default=None, help="JSON options of a second arm, paired per section")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    arms = {"a": rerank.check_rerank_options(json.loads(args.rerank_options))}
    if args.arm_b is not None:
        arms["b"] = rerank.check_rerank_options(json.loads(args.arm_b))
    lk = atlas_paired._load(args.index)
    load0 = os.getloadavg()[0]
    clock, rows, warm = StepClock(), {arm: [] for arm in arms}, False
    clock.patch()
    try:
        place = 0
        for seed in [int(s) for s in args.seeds.split(",")]:
            for case, j, q in atlas_paired.sections_of(seed, args.compartments):
                if j >= args.per_case:
                    continue
                if not warm:  # the first call's set-up (atlas grids) is no section's
                    for options in arms.values():
                        lk.search_poses(q["image"], options)
                    warm = True
                order = list(arms) if place % 2 == 0 else list(arms)[::-1]  # alternating (atlas_paired)
                place += 1
                for arm in order:
                    row = _one_section(lk, clock, q, arms[arm])
                    rows[arm].append({"seed": seed, "case": case, "query": j, "first_arm": order[0], **row})
    finally:
        clock.unpatch()
    print(f"index {args.index}, seeds {args.seeds}, {args.compartments}")
    print(f"load {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    for arm in arms:
        name = args.rerank_options if arm == "a" else args.arm_b
        print(f"\narm {arm}, options {name}")
        print(table(rows[arm]))
    if "b" in arms:
        print()
        print(paired(rows["a"], rows["b"]))
    out = {"command": " ".join(sys.argv), "load": [load0, os.getloadavg()[0]], "rows": rows["a"]}
    if "b" in arms:
        out["rows_b"] = rows["b"]
    if args.json:
        atlas_paired._write(args.json, out)  # atomically
    return out


def _one_section(lk, clock: StepClock, q: dict, options: dict) -> dict:
    """One lookup of ``q``'s section, timed (the first stage's order, then the pose search by step)."""
    clock.cpu.clear()
    clock.count.clear()
    t0 = time.process_time()
    order = lk.search_order(q["image"])
    t1 = time.process_time()
    clock.step = "stage 1"
    found = lk._pose_search.search(q["image"], order, options)
    t2 = time.process_time()
    ranking = [p for p, _ in found.ranking]
    return {
        "rank": ranking.index(q["plate"]),
        "order_ms": 1000 * (t1 - t0),
        "search_ms": 1000 * (t2 - t1),
        "pairs": found.pairs,
        "cpu_ms": {f"{s}|{k}": 1000 * v for (s, k), v in clock.cpu.items()},
        "count": {f"{s}|{k}": v for (s, k), v in clock.count.items()},
    }


def paired(a: list[dict], b: list[dict]) -> str:
    """The whole lookup (order + search) of two arms on the same sections: medians and per-section b / a."""
    whole_a = np.array([r["order_ms"] + r["search_ms"] for r in a])
    whole_b = np.array([r["order_ms"] + r["search_ms"] for r in b])
    return (
        f"whole lookup (order + search), median: a {np.median(whole_a):.0f} ms, "
        f"b {np.median(whole_b):.0f} ms; "
        f"per section b / a, median {np.median(whole_b / whole_a):.3f} over {len(a)} sections; "
        f"mean rank a {np.mean([r['rank'] for r in a]):.3f}, b {np.mean([r['rank'] for r in b]):.3f}"
    )


if __name__ == "__main__":
    main()
