"""Atlas lookup: the final ranking against the size of stage 1's sweep (session 43, issue 12).

Each configuration of ``rerank_options`` runs on every section of the benchmark's query seeds
(``atlas_paired.sections_of``: 60 sections per seed, today's stain by default), all configurations per
section in one process, their order rotating from section to section so that their CPU times are paired
under the same load. Per section and configuration it records the true plate's rank (0-based), the top
plate, the CPU ms of the whole lookup (``search_poses``: the first stage and the pose search) and the
pairs scored by stage 1 (the grid that searches every shift) and stage 2 (the grids that search near a
pose), counted at :meth:`SectionGrid.score`. ``read`` prints per configuration the mean rank (and capped
at 10), Top-1 / 5, the median pairs of each stage, the median CPU and the per-section CPU ratio to the
first configuration, and better / worse against it.

Commands::

    cd benchmarks
    OMP_NUM_THREADS=1 nice -n 5 ../.venv/bin/python atlas_stage1_curve.py run /tmp/curve_i0.json \\
        --index /tmp/c13/idx --seeds 157 [--configs '{"default": {}, "sweep12": {"sweep_step": 12}}']
    ../.venv/bin/python atlas_stage1_curve.py read /tmp/curve_i0.json

Without ``--configs`` it runs session 43's list (:data:`CONFIGS`). Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

#: Session 43's sweep: the defaults, then one stage-1 knob each (the first is the reference of ``read``).
CONFIGS = {
    "default": {},
    "shortlist8": {"shortlist": 8},
    "shortlist6_n2": {"shortlist": 6, "neighbours": 2},
    "neighbours2": {"neighbours": 2},
    "sweep12": {"sweep_step": 12},
    "sweep0": {"sweep_step": 0},
    "rot15": {"rotation_step": 15.0},
    "scale1.2": {"scale_step": 1.2},
    "coarse24": {"coarse_size": 24},
    "prune0.02": {"stage1_prune": 0.02},
}


def _paired():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import atlas_paired

    return atlas_paired


def run(args) -> None:
    import torch

    from napari_nephi.engines.atlas import pose_grid
    from napari_nephi.engines.atlas.rerank import check_rerank_options

    torch.set_num_threads(1)
    ap = _paired()
    configs = json.loads(args.configs) if args.configs else CONFIGS
    opts = {k: check_rerank_options(v) for k, v in configs.items()}
    counts = {"s1": 0, "s2": 0}
    plain = pose_grid.SectionGrid.score

    def counted(self, pairs, n, best_per_cut_z=False):  # stage 1's grid searches every shift (no reach)
        counts["s1" if self.corr.reach is None else "s2"] += len(pairs)
        return plain(self, pairs, n, best_per_cut_z)

    pose_grid.SectionGrid.score = counted
    lk = ap._load(args.index)
    names = list(configs)
    out = {"command": " ".join(sys.argv), "index": args.index, "configs": configs, "rows": []}
    out["load_start"] = os.getloadavg()[0]
    place = 0
    for seed in [int(s) for s in args.seeds.split(",")]:
        for case, j, q in ap.sections_of(seed, args.compartments):
            if place == 0:  # one untimed lookup: the first call's set-up is no configuration's CPU
                lk.search_poses(q["image"], opts[names[0]])
            row = {"seed": seed, "case": case, "query": j, "plate": q["plate"]}
            k = place % len(names)
            for name in names[k:] + names[:k]:
                counts.update(s1=0, s2=0)
                c0 = time.process_time()
                found = lk.search_poses(q["image"], opts[name])
                cpu = 1000 * (time.process_time() - c0)
                order = [p for p, _ in found.ranking]
                row[name] = {
                    "rank": order.index(q["plate"]),
                    "top": order[0],
                    "cpu": cpu,
                    "s1": counts["s1"],
                    "s2": counts["s2"],
                    "pairs": found.pairs,
                }
            out["rows"].append(row)
            place += 1
            out["load_end"] = os.getloadavg()[0]
            ap._write(args.out, out)
            print(
                seed,
                case,
                j,
                {n: (row[n]["rank"], row[n]["s1"], round(row[n]["cpu"])) for n in names},
                flush=True,
            )


def table(data: dict) -> str:
    """``read``'s table of a run's JSON."""
    rows, names = data["rows"], list(data["configs"])
    ref = names[0]
    lines = [
        f"{len(rows)} sections; load {data.get('load_start', float('nan')):.1f} -> "
        f"{data.get('load_end', float('nan')):.1f}",
        "| config | mean rank (capped at 10) | Top-1 / 5 | stage-1 pairs | stage-2 pairs | CPU ms | "
        f"CPU / {ref} (per section) | better / worse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    r0 = np.array([row[ref]["rank"] for row in rows])
    for n in names:
        r = np.array([row[n]["rank"] for row in rows])
        s1, s2 = (np.median([row[n][k] for row in rows]) for k in ("s1", "s2"))
        cpu = np.median([row[n]["cpu"] for row in rows])
        ratio = np.median([row[n]["cpu"] / row[ref]["cpu"] for row in rows])
        lines.append(
            f"| {n} | {r.mean():.3f} ({np.minimum(r, 10).mean():.3f}) | {(r < 1).sum()} / {(r < 5).sum()} | "
            f"{s1:.0f} | {s2:.0f} | {cpu:.0f} | {ratio:.3f} | {(r < r0).sum()} / {(r > r0).sum()} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", help="JSON written after every section")
    r.add_argument("--index", required=True, help="index folder (or a folder holding it as 'ours')")
    r.add_argument("--seeds", required=True, help="comma-separated query seeds")
    r.add_argument("--compartments", default="labels")
    r.add_argument("--configs", default=None, help="JSON {name: rerank_options} (default: CONFIGS)")
    d = sub.add_parser("read")
    d.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        for path in args.files:
            with open(path) as fh:
                print(path)
                print(table(json.load(fh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
