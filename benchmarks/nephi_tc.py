"""Triangles-and-Circles: Dice and folds of NePhi's predict, predict+refine and optimize modes.

Held-out generated pairs (seeds above the training range of the shipped model), 128 x 128 as the
sample data. Dice is the mean over body, circle and triangle of the moving labels carried onto
the fixed ones; folds are voxels with det J <= 0.

    python benchmarks/nephi_tc.py --pairs 10
    python benchmarks/nephi_tc.py --pairs 10 --weights my_model.pt --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import napari_nephi
from napari_nephi.engines.nephi.train import VALIDATION_SEED, dice
from napari_nephi.synthetic import tc_pair

MODES = {
    "identity": None,
    "predict": {"mode": "predict"},
    "predict+refine": {"mode": "predict+refine", "iterations": 100},
    "optimize (fast)": {"mode": "optimize"},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--weights", default="tc")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = {name: {"dice": [], "folds": [], "seconds": []} for name in MODES}
    for i in range(args.pairs):
        fixed, moving, fl, ml = tc_pair(seed=VALIDATION_SEED + 10_000 + i, size=args.size)
        for name, opts in MODES.items():
            if opts is None:
                rows[name]["dice"].append(dice(ml, fl))
                rows[name]["folds"].append(0.0)
                rows[name]["seconds"].append(0.0)
                continue
            if opts["mode"] != "optimize":
                opts = {**opts, "weights": args.weights}
            t0 = time.perf_counter()
            reg = napari_nephi.register(fixed, moving, method="nephi", device=args.device, **opts)
            seconds = time.perf_counter() - t0
            rows[name]["dice"].append(dice(reg.transform.warp_labels(ml), fl))
            rows[name]["folds"].append(reg.metrics["fold_percent"])
            rows[name]["seconds"].append(seconds)
    print(
        f"{args.pairs} held-out pairs, {args.size} x {args.size}, device {args.device}, "
        f"torch {torch.__version__}"
    )
    print("| mode | Dice mean | Dice min | % folds (mean) | s per pair |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for name, r in rows.items():
        summary[name] = {k: float(np.mean(v)) for k, v in r.items()} | {"dice_min": float(np.min(r["dice"]))}
        print(
            f"| {name} | {np.mean(r['dice']):.3f} | {np.min(r['dice']):.3f} | {np.mean(r['folds']):.3f} "
            f"| {np.mean(r['seconds']):.2f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
