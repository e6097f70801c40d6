"""Per-query diagnosis of the atlas pose search: search miss or similarity miss?

For each benchmark section (:mod:`atlas_lookup`'s cases and query seeds) the pose search runs
twice on the same index:

* ``default``: the embedding's order and the given re-ranking options (what ``lookup`` does);
* ``oracle``: only the true plate and its ``--reach`` neighbours searched (no sweep).

``--simulate-offset K`` replaces the embedding by a first stage whose best plate is the truth
plus a random offset of up to K plates (the cost and accuracy of a seeded search, given a first
stage that good); ``--no-oracle`` skips the oracle search.

If the oracle's best pose scores higher than the default's best, the default search never
proposed the true region (a search miss); if it scores lower, the similarity prefers a wrong
place (a similarity miss). One line per section: case, truth (plate, tilt, rotation, scale),
rank of the truth, the default's best pose, the oracle's best pose and the verdict.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/atlas_rerank_diagnosis.py \
        --index-dir IDX --query-seed 1 [--cases combined] [--rerank-options JSON]

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
from napari_nephi.engines.atlas.rerank import PoseSearch, check_rerank_options  # noqa: E402
from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom  # noqa: E402


def best_pose(result):
    """The highest-scoring pose of a search result (None when nothing was scored)."""
    return max(result.poses.values(), key=lambda p: p.score, default=None)


def describe(pose) -> str:
    if pose is None:
        return "none"
    return (
        f"z {pose.z:6.1f} s {pose.score:.3f} tilt {pose.tilt[0]:+5.1f},{pose.tilt[1]:+5.1f} "
        f"rot {pose.rotation:+5.1f} sc {pose.scale:.2f}"
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index-dir", required=True, help="folder holding ours/ (atlas_lookup --index-dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-seed", type=int, default=0)
    p.add_argument("--per-case", type=int, default=12)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--reach", type=int, default=3, help="plates either side of the truth for the oracle")
    p.add_argument("--rerank-options", default="{}")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--simulate-offset",
        type=int,
        default=None,
        help="replace the embedding by a simulated first stage whose best plate is the truth plus a "
        "uniform integer offset in [-K, K] (plates ordered by distance to it): the seeded mode's curve",
    )
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle search (timing runs)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(12345)
    torch.set_num_threads(1)
    ref, labels = brain_phantom((132, 96, 112), seed=args.seed)
    lk = AtlasLookup.load(os.path.join(args.index_dir, "ours"), device="cpu")
    search = PoseSearch(lk.plates)
    opts = check_rerank_options(json.loads(args.rerank_options))
    oracle_opts = {**opts, "shortlist": 1, "neighbours": args.reach, "sweep_step": 0}
    rows = []
    for i, case in enumerate(c for c in args.cases.split(",") if c):
        seed = args.query_seed * 1000 + 101 + list(CASES).index(case)
        del i
        for j, q in enumerate(atlas_queries(ref, labels, args.per_case, seed=seed, **CASES[case])):
            order = lk.lookup(q["image"], top=None, rerank=False)
            if args.simulate_offset is not None:
                centre = q["plate"] + int(rng.integers(-args.simulate_offset, args.simulate_offset + 1))
                emb = {pl: k for k, (pl, _) in enumerate(order)}
                ranked = sorted(range(lk.n_plates), key=lambda pl: (abs(pl - centre), emb[pl]))
                order = [(pl, abs(pl - centre) / lk.n_plates) for pl in ranked]
            t0 = time.process_time()
            found = search.search(q["image"], order, opts)
            cpu = time.process_time() - t0
            truth = q["plate"]
            rank = [pl for pl, _ in found.ranking].index(truth)
            forced = [(truth, 0.0)] + [(pl, d) for pl, d in order if pl != truth]
            oracle = found if args.no_oracle else search.search(q["image"], forced, oracle_opts)
            a, b = best_pose(found), best_pose(oracle)
            verdict = "ok" if rank == 0 else ("search" if b.score > a.score + 1e-6 else "similarity")
            verdict = "miss" if args.no_oracle and rank else verdict
            row = {"case": case, "query": j, "truth": truth, "tilt": q["tilt"], "rotation": q["rotation"]}
            row.update(scale=q["scale"], part=q["part"], contrast=q["contrast"], rank=rank, verdict=verdict)
            row.update(emb_rank=[pl for pl, _ in order].index(truth), found=describe(a), oracle=describe(b))
            row["cpu_ms"] = 1000 * cpu
            rows.append(row)
            print(
                f"{case:9s} {j:2d} truth {truth:3d} tilt {q['tilt'][0]:+5.1f},{q['tilt'][1]:+5.1f} "
                f"rot {q['rotation']:+5.1f} sc {q['scale']:.2f} {str(q['part'])[:6]:6s} "
                f"{q['contrast'][:5]} | emb {row['emb_rank']:3d} rank {rank:3d} | found {describe(a)} | "
                f"oracle {describe(b)} | {verdict}",
                flush=True,
            )
    ranks = np.array([r["rank"] for r in rows], dtype=float)
    print(
        f"mean rank {ranks.mean():.2f}  Top-1/3/5 {100 * (ranks < 1).mean():.0f}/"
        f"{100 * (ranks < 3).mean():.0f}/{100 * (ranks < 5).mean():.0f} %  "
        f"search misses {sum(r['verdict'] == 'search' for r in rows)}  "
        f"similarity misses {sum(r['verdict'] == 'similarity' for r in rows)}  "
        f"CPU ms median {np.median([r['cpu_ms'] for r in rows]):.0f}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
