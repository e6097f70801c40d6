"""Dice of atlas labels carried onto sections by ``AtlasLookup.register`` given the true plate.

Queries of two atlases (``brain_phantom`` and ``toy_atlas``), four kinds each: straight (no tilt,
whole, atlas stain), oblique (tilt up to 10 degrees), partial and fluorescence-like contrast, all
rotated in-plane up to 10 degrees and rescaled. A second set of ``toy_atlas`` cuts with known
atlas coordinates gives the oracle (the plate's labels read at every pixel's true in-plane
position, the best a 2D map can do).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/atlas_register_study.py [--per-kind 5]
        [--methods affine,nephi] [--nephi-every 2] [--atlases phantom,toy] [--module path/to/register.py]

Nephi rows give the affine map's Dice on the same queries and how many deformable maps the
registration kept (it drops those that do not raise the edge agreement or that fold).

Measured 2026-12-03 (load 2-12 on 2 shared cores; ``--per-kind 5 --oracle 6``; before = commit
4f64c68's register.py, after = d522afd's: the plate in the section's contrast, affine stages that
lower the edge agreement dropped, the deformable map kept only when it raises it by 0.02 and does
not fold). Mean Dice (min) of the affine map over 20 queries per atlas:

| seed | phantom before | phantom after | toy before | toy after | toy oracle cuts before / after (2D bound) |
|---|---|---|---|---|---|
| 11 | 0.590 (0.350) | 0.605 (0.357) | 0.670 (0.444) | 0.692 (0.495) | 0.804 / 0.801 (0.836) |
| 12 | 0.535 (0.035) | 0.578 (0.245) | 0.657 (0.016) | 0.677 (0.272) | 0.675 / 0.677 (0.739) |

Fluorescence-like sections gain most (phantom 0.598 -> 0.636 and 0.487 -> 0.610). ``nephi``
(every 2nd query, 10 per atlas) against the affine map on the same queries: phantom seed 11
before 0.637 / 0.584, after 0.649 / 0.598; seed 12 before 0.615 / 0.605, after 0.632 / 0.611;
toy seed 11 before 0.693 / 0.698, after 0.724 / 0.715 (oblique 0.460 -> 0.600; straight still
below the affine map, 0.835 / 0.872; oracle cuts 0.884 -> 0.869: all three deformable maps
dropped); toy seed 12 before 0.748 / 0.696, after 0.748 / 0.708 (straight 0.819 / 0.845).
NePhi still loses on partial phantom sections (0.468 / 0.478, 0.583 / 0.611) and on straight toy
sections, where the affine map is already close to the 2D bound.

``--module`` runs another version of ``engines/atlas/register.py`` (e.g. the previous commit's,
from ``git show HEAD~1:src/napari_nephi/engines/atlas/register.py > /tmp/old_register.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_nephi import AtlasLookup
from napari_nephi.synthetic.atlas import atlas_queries, brain_phantom, section_from_atlas, toy_atlas

KINDS = {
    "straight": {"max_tilt": 0.0, "partial": 0.0, "contrast": "nissl", "tears": 0.0},
    "oblique": {"max_tilt": 10.0, "partial": 0.0, "contrast": "nissl"},
    "partial": {"max_tilt": 5.0, "partial": 1.0, "contrast": "nissl"},
    "contrast": {"max_tilt": 5.0, "partial": 0.0, "contrast": "fluorescence"},
}
NEPHI_FAST = {"iterations": 50, "coarse_iterations": 50}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the region values (> 0) present in ``truth``."""
    out = []
    for v in np.unique(truth):
        if v > 0:
            a, b = pred == v, truth == v
            out.append(2.0 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(out)) if out else float("nan")


def load_register(path: str | None):
    """``register_plate`` of this checkout, or of the file ``path`` (loaded inside the package)."""
    if path is None:
        from napari_nephi.engines.atlas.register import register_plate

        return register_plate
    name = "napari_nephi.engines.atlas._study_register"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.register_plate


def queries(reference, labels, per_kind: int, seed: int) -> list[dict]:
    out = []
    for k, (kind, opts) in enumerate(KINDS.items()):
        for q in atlas_queries(reference, labels, per_kind, seed=seed + k, noise=0.03, **opts):
            out.append({**q, "kind": kind})
    return out


def oracle_cuts(reference, labels, n: int, seed: int) -> list[dict]:
    """Toy cuts with known coordinates, rotated in-plane by a known angle (up to 12 degrees)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        index = rng.uniform(8, reference.shape[0] - 8)
        tilt = tuple(rng.uniform(-6, 6, 2))
        crop = (rng.uniform(0, 0.3), 0.0, 0.0, 0.0) if rng.uniform() < 0.5 else None
        image, lab, coords = section_from_atlas((reference, labels), index, tilt, crop, return_coords=True)
        angle = float(rng.uniform(-12, 12))
        image = ndi.rotate(image, angle, order=1, reshape=True)
        lab = ndi.rotate(lab, angle, order=0, reshape=True)
        coords = np.stack([ndi.rotate(c, angle, order=1, reshape=True, cval=-1e3) for c in coords])
        plate = int(np.clip(round(index), 0, reference.shape[0] - 1))
        yy = np.clip(np.round(coords[1]).astype(int), 0, labels.shape[1] - 1)
        xx = np.clip(np.round(coords[2]).astype(int), 0, labels.shape[2] - 1)
        oracle = dice(np.where(lab > 0, labels[plate][yy, xx], 0), lab)
        out.append({"image": image, "labels": lab, "plate": plate, "kind": "oracle", "oracle": oracle})
    return out


def run(lk, qs, register_plate, method: str, every: int, affine: dict) -> list[dict]:
    """One row per registered query; nephi rows also hold the affine map's Dice on the same query."""
    rows = []
    for i, q in enumerate(qs):
        if i % every:
            continue
        opts = {**NEPHI_FAST, "affine_options": affine} if method == "nephi" else affine
        t = time.perf_counter()
        reg = register_plate(lk, q["image"], q["plate"], method, device="cpu", **opts)
        row = {
            "kind": q["kind"],
            "dice": dice(np.asarray(reg.metrics["labels"]), q["labels"]),
            "oracle": q.get("oracle", np.nan),
            "seconds": time.perf_counter() - t,
            "affine": np.nan,
            "kept": bool(reg.metrics.get(method, {}).get("kept", True)),
        }
        if method != "affine":
            aff = register_plate(lk, q["image"], q["plate"], "affine", device="cpu", **affine)
            row["affine"] = dice(np.asarray(aff.metrics["labels"]), q["labels"])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-kind", type=int, default=5)
    ap.add_argument("--oracle", type=int, default=10)
    ap.add_argument("--methods", default="affine,nephi", help="comma-separated: affine, nephi")
    ap.add_argument("--nephi-every", type=int, default=2, help="nephi on every n-th query")
    ap.add_argument("--module", default=None)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--atlases", default="phantom,toy", help="comma-separated: phantom, toy")
    ap.add_argument(
        "--affine", default="{}", help='options of the affine step as JSON, e.g. {"similarity": "nmi"}'
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    register_plate = load_register(args.module)
    makers = {
        "phantom": lambda: brain_phantom((66, 64, 72), seed=0),
        "toy": lambda: toy_atlas((40, 64, 64), seed=0),
    }
    atlases = {name: makers[name]() for name in args.atlases.split(",")}
    print(
        "| atlas | kind | method | n | mean Dice | min Dice | affine on same | deformable kept | oracle "
        "| s/section |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (ref, lab) in atlases.items():
        lk = AtlasLookup.train(ref, lab, device="cpu", steps=1, seed=0)
        qs = queries(ref, lab, args.per_kind, args.seed)
        if name == "toy":
            qs += oracle_cuts(ref, lab, args.oracle, args.seed)
        every = {"affine": 1, "nephi": args.nephi_every}
        methods = [(m, every[m]) for m in args.methods.split(",")]
        for method, every in methods:
            rows = run(lk, qs, register_plate, method, every, json.loads(args.affine))
            for kind in [*KINDS, "oracle", "all"]:
                sel = [
                    r for r in rows if kind in ("all", r["kind"]) and (kind != "all" or r["kind"] != "oracle")
                ]
                if not sel:
                    continue
                d = np.array([r["dice"] for r in sel])
                o = np.nanmean([r["oracle"] for r in sel]) if kind == "oracle" else np.nan
                s = np.mean([r["seconds"] for r in sel])
                a = np.mean([r["affine"] for r in sel])
                kept = "" if method == "affine" else f"{sum(r['kept'] for r in sel)}/{len(sel)}"
                print(
                    f"| {name} | {kind} | {method} | {len(sel)} | {d.mean():.3f} | {d.min():.3f} | "
                    f"{'' if np.isnan(a) else f'{a:.3f}'} | {kept} | "
                    f"{'' if np.isnan(o) else f'{o:.3f}'} | {s:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
