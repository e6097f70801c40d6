"""Where the CPU of a plate lookup goes, and how much of it an index could store ahead.

The pose search (:mod:`napari_nephi.engines.atlas.rerank`) re-ranks the embedding's plates for each
section. This profiles it on benchmark sections (:mod:`atlas_lookup`'s cases and query seeds, from
the order ``AtlasLookup.lookup`` starts from) by phase, exclusive CPU per section (1 thread), and
marks each phase by what it depends on:

* ``atlas``: the same for every section, so it could be built with the index: the downsampled
  atlases (once per loaded index) and stage 1's untilted plate cuts (plate, canvas and plate pixels
  per canvas pixel from a fixed grid; cached in memory across sections, :data:`.pose_grid.CUT_CACHE_BYTES`);
* ``section``: needs the section or its pose: the section's own variants, stage 2's cuts (centred on
  the plate pixel stage 1 found under the section's tissue centre, at the section's scale, the edge
  field normalised over that window), the volume sampling of the oblique cuts, every correlation.

The first pass over the sections fills the cut cache as a long session would. Then the cache is
enlarged and filled by an untimed pass, and a second timed pass finds every stage-1 cut cached: what
storing those cuts in the index would give at best; it must give the same rankings and distances.
The first section of the first pass is also timed alone (a cold lookup: one section per process, as
``napari-nephi atlas-lookup`` with one file).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/atlas_lookup_profile.py \
        --index-dir IDX --query-seeds 0,1 [--per-case 4] [--rerank-options JSON] [--json OUT]

Not part of the test run. Timings depend on the machine's load (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from atlas_lookup import CASES  # noqa: E402

from napari_nephi import AtlasLookup  # noqa: E402
from napari_nephi.engines.atlas import pose_grid, rerank  # noqa: E402
from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom  # noqa: E402

#: Phases, what each depends on (see the module docstring).
KIND = {
    "atlas grids (once per index)": "atlas",
    "stage-1 plate cuts": "atlas",
    "stage-2 plate cuts": "section",
    "oblique cuts: volume sampling": "section",
    "oblique cuts: fields and FFTs": "section",
    "section variants": "section",
    "prepare section": "section",
    "stage-1 correlations": "section",
    "stage-2 correlations": "section",
    "ranking and the rest": "section",
}


class PhaseClock:
    """Exclusive CPU per phase of methods wrapped while :meth:`wrapped` is active."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self._stack: list[float] = []

    def _wrap(self, cls, name: str, label):
        original = cls.__dict__[name]
        func = original.__func__ if isinstance(original, staticmethod) else original

        def timed(*a, **k):
            lab = label(*a, **k) if callable(label) else label
            t0 = time.process_time()
            self._stack.append(0.0)
            try:
                return func(*a, **k)
            finally:
                dt = time.process_time() - t0
                inner = self._stack.pop()
                self.acc[lab] = self.acc.get(lab, 0.0) + dt - inner
                if self._stack:
                    self._stack[-1] += dt

        setattr(cls, name, staticmethod(timed) if isinstance(original, staticmethod) else timed)
        return cls, name, original

    @contextmanager
    def wrapped(self):
        def cut(_grid, _atlas, _z, _scale, pivot=None):
            return "stage-1 plate cuts" if pivot is None else "stage-2 plate cuts"

        def correlations(grid, *_a, **_k):
            return "stage-1 correlations" if grid.corr.reach is None else "stage-2 correlations"

        patches = [
            self._wrap(pose_grid.AtlasGrid, "__init__", "atlas grids (once per index)"),
            self._wrap(pose_grid.AtlasGrid, "sample_planes", "oblique cuts: volume sampling"),
            self._wrap(pose_grid.SectionGrid, "plate_cut", cut),
            self._wrap(pose_grid.SectionGrid, "oblique_cuts", "oblique cuts: fields and FFTs"),
            self._wrap(pose_grid.SectionGrid, "variant", "section variants"),
            self._wrap(pose_grid.SectionGrid, "score", correlations),
            self._wrap(rerank.PoseSearch, "prepare", "prepare section"),
            self._wrap(rerank.PoseSearch, "search", "ranking and the rest"),
        ]
        try:
            yield self
        finally:
            for cls, name, original in reversed(patches):
                setattr(cls, name, original)


def table(title: str, acc: dict[str, float], count: int) -> float:
    """Print ``acc`` (seconds over ``count`` sections) as ms per section; returns the total ms."""
    total = 1000 * sum(acc.values()) / count
    print(f"\n{title}: {total:.0f} ms CPU per section over {count}")
    for key in sorted(acc, key=lambda k: -acc[k]):
        ms = 1000 * acc[key] / count
        print(f"  {key:32s} {KIND[key]:8s} {ms:7.1f} ms {100 * ms / max(total, 1e-9):5.1f} %")
    atlas = 1000 * sum(v for k, v in acc.items() if KIND[k] == "atlas") / count
    print(f"  {'atlas-only work':32s} {'':8s} {atlas:7.1f} ms {100 * atlas / max(total, 1e-9):5.1f} %")
    return total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index-dir", required=True, help="folder holding ours/ (atlas_lookup --index-dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-seeds", default="0")
    p.add_argument("--per-case", type=int, default=4)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rerank-options", default="{}", help="JSON options of the re-ranking (rerank.DEFAULTS)")
    p.add_argument("--json", default=None, help="write the phases (ms per section) here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ref, labels = brain_phantom((132, 96, 112), seed=args.seed)
    lk = AtlasLookup.load(os.path.join(args.index_dir, "ours"), device="cpu")
    sections = []
    for qs in (int(s) for s in args.query_seeds.split(",")):
        for case in (c for c in args.cases.split(",") if c):
            seed = qs * 1000 + 101 + list(CASES).index(case)
            for q in atlas_queries(ref, labels, args.per_case, seed=seed, **CASES[case]):
                # the order the pose search starts from (AtlasLookup.search_order)
                sections.append((q["image"], lk.search_order(q["image"]), q["plate"]))
    if len(sections) < 2:
        p.error("profiling needs at least 2 sections (--per-case, --cases, --query-seeds)")
    options = rerank.check_rerank_options(json.loads(args.rerank_options))
    load0 = os.getloadavg()[0]
    clock = PhaseClock()
    with clock.wrapped():
        search = rerank.PoseSearch(lk.plates)
        t0 = time.process_time()
        search.atlas(options["coarse_size"])
        search.atlas(options["work_size"])
        first = search.search(sections[0][0], sections[0][1], options)
        cold_ms = 1000 * (time.process_time() - t0)
        cold = dict(clock.acc)
        clock.acc.clear()
        rankings, pairs = [first.ranking], []
        for image, order, _ in sections[1:]:
            res = search.search(image, order, options)
            rankings.append(res.ranking)
            pairs.append(res.pairs)
        first_pass = dict(clock.acc)
        clock.acc.clear()
        saved = pose_grid.CUT_CACHE_BYTES
        pose_grid.CUT_CACHE_BYTES = 2**31  # every stage-1 cut kept for the second pass
        try:
            for image, order, _ in sections:
                search.search(image, order, options)
            clock.acc.clear()
            # every plate and distance as in the first pass (a cached cut is the cut built before)
            same = all(
                [
                    search.search(image, order, options).ranking == ranking
                    for (image, order, _), ranking in zip(sections, rankings, strict=True)
                ]
            )
        finally:
            pose_grid.CUT_CACHE_BYTES = saved
        warm = dict(clock.acc)
    n = len(sections)
    ranks = [[p for p, _ in r].index(truth) for r, (_, _, truth) in zip(rankings, sections, strict=True)]
    print(f"{n} sections, query seeds {args.query_seeds}, mean rank {np.mean(ranks):.2f}, load {load0:.1f}")
    print(f"cold lookup (a fresh search, atlas grids built, cut cache empty): {cold_ms:.0f} ms CPU")
    for key in sorted(cold, key=lambda k: -cold[k]):
        print(f"  {key:32s} {KIND[key]:8s} {1000 * cold[key]:7.1f} ms")
    t1 = table("first pass (the cut cache filling as sections come)", first_pass, n - 1)
    t2 = table("second pass (every stage-1 cut cached)", warm, n)
    print(f"\nsecond pass gives the same rankings and distances as the first: {same}")
    print(f"pairs correlated per section (median): {np.median(pairs):.0f}; load now {os.getloadavg()[0]:.1f}")
    out = {
        "sections": n,
        "options": options,
        "load": load0,
        "same_ranks": same,
        "cold_ms": cold_ms,
        "first_pass_ms": t1,
        "cached_ms": t2,
        "phases_ms": {
            "cold": {k: 1000 * v for k, v in cold.items()},
            "first_pass": {k: 1000 * v / (n - 1) for k, v in first_pass.items()},
            "cached": {k: 1000 * v / n for k, v in warm.items()},
        },
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
