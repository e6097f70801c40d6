"""Trained ablations of the histology local-affine network, on image parts no network was trained on.

    cd benchmarks
    OMP_NUM_THREADS=1 nice python histology_ablation.py --nets MASN=M.pt SASN=S.pt --seeds 0 1
    OMP_NUM_THREADS=1 nice python histology_ablation.py --nets MASN=M.pt --parts full --full MASN

Networks: local-affine networks made by ``scripts/make_histology_weights.py --kind affine`` (the
two-magnification MASN, and with ``--magnifications 1`` the single-magnification SASN, the same
data, seed and steps), which never see the held-out rows (``HOLDOUT_ROW`` of that script: the IHC
image from row 256 on, the svs level 0 from row 2327 on, its half resolution from row 1163 on).

Parts (``--parts``), every one on the held-out rows only, for each of ``--seeds``:

- ``patch``: the networks alone on pairs drawn as the training pairs are (a region against its
  re-stained copy moved by a known small affine plus a gentle smooth warp, ``WARPS["affine"]``),
  ``--pairs`` per source and seed (pair generator seeded with ``(EVAL_SEED + seed, source index, i)``).
  Rows: no network, SASN and MASN with k = 1, 2, 3 iterations (the paper's MASN(k)). Error: the
  distance between the predicted and the true field on the fixed tissue.
- ``engine``: ``register(method="histology")`` on held-out slide pairs (``slide_pair``: re-stained
  to H-DAB, rotated, shifted, smooth warp of 1.2 % of the longer side) with the rigid stage alone
  against rigid + local-affine network (SASN and MASN, k = 1, 2, 3). Errors on a dense tissue grid.
- ``full``: the whole pipeline (rigid, affine with the network ``--full`` names, non-rigid with
  the shipped non-rigid network, refinement) with and without the affine stage, same pairs.
- ``fast``: the same without the refinement (rigid, affine, non-rigid: the choice when time
  matters) with and without the affine stage.

``--cases`` picks the engine cases, ``--sources`` the held-out images of the engine parts.

rTRE is the error over the image diagonal (%, the ANHIR metric). The engine keeps a network stage
only if it raises the NCC on the tissue; a skipped stage is counted as run (its notes are printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from histology_accuracy import WARP, fetch_svs, grid_points, run_engine, score

from napari_nephi.core.similarity import metric
from napari_nephi.engines.histology.networks import load_model, read_record, shipped_path
from napari_nephi.engines.histology.predict import compose, predict_field, warp
from napari_nephi.synthetic.histology import slide_pair

ROOT = Path(__file__).resolve().parents[1]
#: Engine cases: (rotation in degrees, mirrored, shift in px).
ENGINE_CASES = {"small 4": (4.0, False, (6.0, -5.0)), "mirror rot 65": (65.0, True, (0.0, 0.0))}
#: The svs held-out rows are cut to the columns with tissue and halved for the engine parts.
SVS_COLUMNS, SVS_STEP = slice(300, 2100), 2
UM = {"ihc": 0.5, "svs": 0.499 * SVS_STEP}


def weights_script():
    """``scripts/make_histology_weights.py`` as a module (its data, pairs and held-out rows)."""
    path = ROOT / "scripts" / "make_histology_weights.py"
    spec = importlib.util.spec_from_file_location("make_histology_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def field_errors(field: np.ndarray, truth: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Distance in pixels between two ``(2, H, W)`` fields at the tissue pixels."""
    return np.sqrt(((field - truth) ** 2).sum(0))[tissue]


def patch_part(mk, held_out: dict, nets: dict, seeds, n_pairs: int) -> list[dict]:
    """The networks alone on held-out training-like pairs; one row per (source, seed, method)."""
    rows = []
    for index, source in enumerate(("ihc", "he", "he_half")):
        for seed in seeds:
            per_method: dict[str, list] = {}
            for i in range(n_pairs):
                rng = np.random.default_rng([mk.EVAL_SEED + seed, index, i])
                fixed, moving, truth, tissue = mk.make_pair(held_out[source], rng, mk.WARPS["affine"])
                diag = float(np.hypot(*fixed.shape))
                results = {"none": (np.zeros_like(truth), 0.0)}
                for label, net in nets.items():
                    field, seconds = np.zeros_like(truth), 0.0
                    for k in (1, 2, 3):  # MASN(k) as predict_field(iterations=k) does it, step by step
                        start = time.perf_counter()
                        current = warp(moving, field) if k > 1 else moving
                        delta = predict_field(fixed, current, net, mask=tissue)
                        field = compose(delta, field) if k > 1 else delta
                        seconds += time.perf_counter() - start
                        results[f"{label} k={k}"] = (field, seconds)
                for name, (field, seconds) in results.items():
                    err = field_errors(field, truth, tissue)
                    per_method.setdefault(name, []).append(
                        (
                            float(err.mean()),
                            100 * float(np.median(err)) / diag,
                            metric("ncc", fixed, warp(moving, field), mask=tissue),
                            seconds,
                        )
                    )
            for name, vals in per_method.items():
                v = np.array(vals)
                row = {"part": "patch", "source": source, "seed": seed, "method": name, "pairs": len(v)}
                row.update(
                    mean_error_px=float(v[:, 0].mean()),
                    rtre_median_pct=float(np.median(v[:, 1])),
                    ncc=float(v[:, 2].mean()),
                    seconds=float(v[:, 3].mean()),
                    improved=int(np.sum(v[:, 0] < np.array(per_method["none"])[:, 0])),
                )
                rows.append(row)
                print(
                    f"| patch | {source} | {seed} | {name} | {row['mean_error_px']:.3f} | "
                    f"{row['rtre_median_pct']:.3f} | {row['ncc']:.3f} | {row['improved']}/{len(v)} | "
                    f"{row['seconds']:.1f} |",
                    flush=True,
                )
    return rows


def engine_sources(mk, held_out: dict) -> dict[str, np.ndarray]:
    """Held-out RGB images for the engine parts: IHC rows 256:, svs rows 2327: (tissue columns, /2)."""
    svs = held_out["he"][:, SVS_COLUMNS][::SVS_STEP, ::SVS_STEP]
    return {"ihc": np.ascontiguousarray(held_out["ihc"]), "svs": np.ascontiguousarray(svs)}


def engine_methods(parts, paths: dict, full: str) -> dict[str, dict]:
    """Method name -> engine options."""
    out: dict[str, dict] = {}
    if "engine" in parts:
        out["rigid only"] = {"stages": ("rigid",)}
        for label, path in paths.items():
            mags = int(read_record(path)["config"]["magnifications"])
            for k in (1, 2, 3):
                out[f"rigid+{label} k={k}"] = {
                    "stages": ("rigid", "affine"),
                    "weights": [path],
                    "affine_iterations": k,
                    "magnifications": mags,
                }
    nonrigid = shipped_path("nonrigid")
    for part, refine in (("full", ("refine",)), ("fast", ())):
        if part in parts:
            out[f"{part} without affine"] = {"stages": ("rigid", "nonrigid", *refine), "weights": [nonrigid]}
            out[f"{part} with {full} k=2"] = {
                "stages": ("rigid", "affine", "nonrigid", *refine),
                "weights": [paths[full], nonrigid],
            }
    return out


def engine_part(images: dict, cases: dict, methods: dict, seeds) -> list[dict]:
    """Every method on every held-out slide pair; one row each."""
    rows = []
    for source, img in images.items():
        for case, (rotation, flip, shift) in cases.items():
            for seed in seeds:
                pair = slide_pair(
                    img,
                    seed=seed,
                    rotation=rotation,
                    flip=flip,
                    shift=shift,
                    warp=round(WARP * max(img.shape[:2]), 1),
                )
                pts = grid_points(pair, 64)
                for name, options in methods.items():
                    start = time.perf_counter()
                    found, info = run_engine(pair, UM[source], pts, seed=seed, **options)
                    row = score(pair, pts, found, UM[source], {"rotation": rotation, "flip": flip})
                    row.update(
                        part="engine",
                        source=source,
                        case=case,
                        seed=seed,
                        method=name,
                        seconds=time.perf_counter() - start,
                        notes=info["notes"],
                    )
                    rows.append(row)
                    skipped = "; skipped a stage" if any("skipped" in n for n in info["notes"]) else ""
                    print(
                        f"| engine | {source} | {case} | {seed} | {name} | {row['rtre_median_pct']:.3f} | "
                        f"{row['tre_median_um']:.2f} | {row['tre_p90_um']:.2f} | {row['robustness']:.2f} | "
                        f"{row['found']} | {row['seconds']:.0f}{skipped} |",
                        flush=True,
                    )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", required=True, help="LABEL=FILE local-affine network files")
    ap.add_argument("--full", help="LABEL of the network the parts full and fast use")
    ap.add_argument("--cases", nargs="+", choices=tuple(ENGINE_CASES), default=list(ENGINE_CASES))
    ap.add_argument(
        "--parts", nargs="+", choices=("patch", "engine", "full", "fast"), default=["patch", "engine"]
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--pairs", type=int, default=4, help="held-out pairs per source and seed (patch part)")
    ap.add_argument("--sources", nargs="+", choices=("ihc", "svs"), default=["ihc", "svs"])
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mk = weights_script()
    held_out = mk.split_sources(mk.load_sources(str(fetch_svs())))[1]
    paths = dict((label, Path(path)) for label, path in (n.split("=", 1) for n in args.nets))
    if {"full", "fast"} & set(args.parts) and args.full not in paths:
        ap.error("parts full and fast need --full LABEL, one of the --nets labels")
    for label, path in paths.items():
        prov = read_record(path).get("extra", {}).get("provenance", {})
        print(
            f"# {label}: {path}, {prov.get('steps')} steps, {prov.get('seconds')} s, seed {prov.get('seed')}"
        )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    rows = []
    if "patch" in args.parts:
        print("| part | source | seed | method | mean field error px | median rTRE % | NCC | better | s |")
        nets = {label: load_model(path) for label, path in paths.items()}
        rows += patch_part(mk, held_out, nets, args.seeds, args.pairs)
    methods = engine_methods(args.parts, paths, args.full)
    if methods:
        print(
            "| part | source | case | seed | method | median rTRE % | median TRE um | p90 um | robust "
            "| found | s |"
        )
        images = {k: v for k, v in engine_sources(mk, held_out).items() if k in args.sources}
        cases = {k: v for k, v in ENGINE_CASES.items() if k in args.cases}
        rows += engine_part(images, cases, methods, args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
