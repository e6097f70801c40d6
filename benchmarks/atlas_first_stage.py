"""How close do cheap first stages place a section? Candidate recall for a fast pose search.

The pose search (:mod:`napari_nephi.engines.atlas.rerank`) costs ~0.35 s of CPU per section; its
seeded mode (``rerank.SEEDED``, ~70 ms) is enough only when a first stage puts the section within
about 2 plates of the truth. For each benchmark section (:mod:`atlas_lookup`'s cases and query
seeds) this measures, with the order the pose search starts from (``AtlasLookup.lookup``'s: the
embedding's ranking of the centred section interleaved with that of its pooled framings):

* ``emb K``: the first K plates of that order at least 3 plates apart (free: the embedding runs anyway);
* ``grid K``: the K best plates (3 apart) of an exhaustive correlation of the section with every
  untilted plate (``--size`` pixels, rotations every ``--rotation-step`` degrees within the search's
  ``max_rotation``, scales ``--scale-step`` apart), the score of stage 1 of the pose search;
* ``emb A + grid B``: both sets together (their sizes add up, less overlaps).

A candidate set "holds" a section when one of its plates lies within 2 plates of the truth. Also
printed: how often the order's first plate and the grid's best agree within 2 plates, and how often
that first plate lies within 2 plates of the truth when they agree (a gate for the seeded
search), and the CPU of the exhaustive correlation per section.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/atlas_first_stage.py \
        --index-dir IDX --query-seeds 0,1 [--size 16 --rotation-step 15 --scale-step 1.2]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from atlas_lookup import CASES  # noqa: E402

from napari_nephi import AtlasLookup  # noqa: E402
from napari_nephi.engines.atlas import rerank  # noqa: E402
from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom  # noqa: E402

EMB = (1, 2, 4, 8)
GRID = (1, 2, 4, 6)
BOTH = ((1, 2), (2, 2), (2, 4), (3, 4))


def peaks(value: np.ndarray, k: int, gap: int = 3) -> list[int]:
    """The ``k`` plates of highest ``value``, each at least ``gap`` plates from those before it."""
    out: list[int] = []
    for z in np.argsort(-value, kind="stable"):
        if len(out) >= k:
            break
        if all(abs(int(z) - c) >= gap for c in out):
            out.append(int(z))
    return out


def grid_profile(search: rerank.PoseSearch, section, size: int, rot_step: float, scale_step: float):
    """Best stage-1 score of ``section`` on every untilted plate (-2 where none): (scores, pairs)."""
    o = rerank.DEFAULTS
    grey, mask, _ = search.prepare(section, rerank.SECTION_FACTOR * o["work_size"])
    atlas = search.atlas(size)
    # the search's stage-1 score (the outside band since session 21; session 18's numbers were without)
    grid = rerank.coarse_grid(grey, mask, size, o["edge_blur"], o["outside_weight"])
    # every plate, each at the scales near its own extent ratio: stage 1's pairs
    pairs = rerank.stage1_pairs(
        grid, atlas, mask, list(range(search.n)), scale_step, o["max_rotation"], rot_step
    )
    scores = np.full(search.n, -2.0)
    for pose in grid.score(pairs, search.n, best_per_cut_z=True):
        scores[pose.plate] = max(scores[pose.plate], pose.score)
    return scores, len(pairs)


def near(plates, truth: int) -> bool:
    return min(abs(p - truth) for p in plates) <= 2


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index-dir", required=True, help="folder holding ours/ (atlas_lookup --index-dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-seeds", default="0")
    p.add_argument("--per-case", type=int, default=12)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--size", type=int, default=16, help="plate pixels of the exhaustive correlation")
    p.add_argument("--rotation-step", type=float, default=15.0)
    p.add_argument("--scale-step", type=float, default=1.2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ref, labels = brain_phantom((132, 96, 112), seed=args.seed)
    lk = AtlasLookup.load(os.path.join(args.index_dir, "ours"), device="cpu")
    search = rerank.PoseSearch(lk.plates)
    rows = []
    for qs in (int(s) for s in args.query_seeds.split(",")):
        for case in (c for c in args.cases.split(",") if c):
            seed = qs * 1000 + 101 + list(CASES).index(case)
            for q in atlas_queries(ref, labels, args.per_case, seed=seed, **CASES[case]):
                # the order the pose search starts from (the centred framing's ranking interleaved with
                # the pooled framings'; AtlasLookup.search_order, public since session 40)
                order = lk.search_order(q["image"])
                emb = np.zeros(search.n)
                for i, (plate, _) in enumerate(order):
                    emb[plate] = -i  # a plate's value: its place in that order
                t0 = time.process_time()
                grid, pairs = grid_profile(search, q["image"], args.size, args.rotation_step, args.scale_step)
                cpu = time.process_time() - t0
                t, e1, g1 = q["plate"], int(order[0][0]), int(np.argmax(grid))
                row = {"seed": qs, "case": case, "contrast": q["contrast"], "truth": t, "cpu_ms": 1000 * cpu}
                row.update({f"emb {k}": near(peaks(emb, k), t) for k in EMB})
                row.update({f"grid {k}": near(peaks(grid, k), t) for k in GRID})
                for a, b in BOTH:
                    row[f"emb {a} + grid {b}"] = near(peaks(emb, a) + peaks(grid, b), t)
                row.update(agree=abs(e1 - g1) <= 2, emb_near=abs(e1 - t) <= 2, pairs=pairs)
                rows.append(row)
        print(f"query seed {qs} done", flush=True)
    keys = [k for k in rows[0] if k.startswith(("emb ", "grid "))]
    print(f"{'sections':24s} {'n':>4s} " + " ".join(f"{k:>14s}" for k in keys))
    for group in ["all", *CASES, "nissl", "fluorescence"]:
        sel = [r for r in rows if group in ("all", r["case"], r["contrast"])]
        if sel:
            held = " ".join(f"{100 * np.mean([r[k] for r in sel]):13.1f}%" for k in keys)
            print(f"{group:24s} {len(sel):4d} {held}")
    agree = np.array([r["agree"] for r in rows])
    good = np.array([r["emb_near"] for r in rows])
    print(
        f"best plates agree (within 2): {100 * agree.mean():.0f} %; the order's first plate within 2 of "
        f"the truth then {100 * good[agree].mean() if agree.any() else 0:.0f} %, otherwise "
        f"{100 * good[~agree].mean() if (~agree).any() else 0:.0f} %"
    )
    print(
        f"exhaustive correlation: {np.median([r['pairs'] for r in rows]):.0f} pairs, CPU ms median "
        f"{np.median([r['cpu_ms'] for r in rows]):.0f} (load {os.getloadavg()[0]:.1f})"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
