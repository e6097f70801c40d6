# ruff: noqa: E501  (table-printing lines)
"""NePhi vs elastix B-spline vs ANTs SyN on real images with a known smooth deformation.

    python benchmarks/nephi_accuracy.py [--cases camera retina ihc mri] [--tools nephi elastix ants]
        [--nephi fast] [--nephi "name:preset=fast,iterations=150,levels=4"] [--size2d 512]
        [--json out.json]

Cases: scikit-image's ``camera()`` (512 x 512), ``retina()`` (grey, resized to ``--size2d``) and
``immunohistochemistry()`` (inverted luminance, 512 x 512), and nibabel's anatomical MRI
(25 x 41 x 33, 2 mm voxels, registered in voxel units). Each image is the fixed image; the moving
image is the same image pulled back through the inverse of a random smooth diffeomorphism
(:func:`napari_nephi.synthetic.random_smooth_displacement`, ``det J > 0`` checked), so the true
pull-back displacement ``u`` (fixed voxel -> moving voxel, axes ``(z,) y, x``) is known exactly.

Every tool's answer is turned into the same convention, a pull-back displacement in voxels of
the fixed grid, axes in numpy order, and checked on a pure translation before the benchmark
(``--no-check`` skips it):

* napari-nephi: ``reg.transform.displacement(shape)``.
* elastix (itk-elastix): ``itk.transformix_deformation_field`` gives ``T(x) - x`` in physical
  units on the fixed grid with components in ITK order (x, y, z); images are created with spacing
  1 and origin 0, so reversing the components gives voxel displacements in numpy order.
* ANTs (antspyx): the forward transforms (affine + SyN warp) are applied, with linear
  interpolation, to images whose value is the voxel index along each axis of the moving image
  (padded by 32 voxels, so points mapped slightly outside still get a value); linear
  interpolation reproduces a linear function exactly, so the result is ``phi(x)`` along that
  axis, independent of how ANTs orders axes internally.

Metrics, identical for every tool: mean endpoint error ``|u_est - u_true|`` (voxels) inside a
tissue mask made from intensity; % of all voxels with ``det J <= 0`` (central differences,
:func:`napari_nephi.core.jacobian.jacobian_determinant`); wall seconds; CPU seconds of the whole
process (all threads) during the call; peak resident memory above the level before the call
(:mod:`_measure`). Everything runs in one process on the same arrays; torch, elastix and ANTs
all get ``--threads`` threads (default 1: on a shared, overloaded machine multi-threaded torch spends
most of its time spin-waiting, see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

# Threads for every tool (torch, elastix, ANTs/ITK): set before ITK is imported.
THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _measure import measure  # noqa: E402
from scipy import ndimage  # noqa: E402

import napari_nephi  # noqa: E402
from napari_nephi.core.device import release_free_memory  # noqa: E402
from napari_nephi.core.jacobian import jacobian_determinant  # noqa: E402
from napari_nephi.core.transform import DisplacementTransform  # noqa: E402
from napari_nephi.synthetic import ihc_stains, mri_volume, random_smooth_displacement  # noqa: E402

# --------------------------------------------------------------------------------------------
# cases


def _unit(img) -> np.ndarray:
    img = np.asarray(img, np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


def tissue_mask(img: np.ndarray, whole: bool = False) -> np.ndarray:
    """Foreground from intensity: smoothed image above a fraction of its Otsu level, holes filled."""
    if whole:
        return np.ones(img.shape, bool)
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(img, 2.0 if img.ndim == 2 else 1.0)
    mask = smooth > 0.5 * threshold_otsu(smooth)
    mask = ndimage.binary_opening(mask, iterations=2)
    return ndimage.binary_fill_holes(mask)


def load_image(name: str, size2d: int):
    """``(image, spacing, whole_image_mask, deformation (max, smoothness) in voxels)``."""
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    if name == "camera":
        img = _unit(data.camera())
        # A photograph: no background to exclude, the whole frame is "tissue".
        whole = True
    elif name == "retina":
        img = _unit(rgb2gray(data.retina()))
        whole = False
    elif name == "ihc":
        img = ihc_stains()["gray"]  # inverted luminance: tissue bright, glass dark
        whole = False
    elif name == "mri":
        img, _ = mri_volume()
        return img, (1.0, 1.0, 1.0), False, (3.0, 7.0)  # mri_pair's 6 mm / 14 mm at 2 mm voxels
    else:
        raise SystemExit(f"unknown case {name!r}")
    if img.shape != (size2d, size2d):
        img = resize(img, (size2d, size2d), anti_aliasing=True, preserve_range=True).astype(np.float32)
    scale = size2d / 512
    return img, (1.0, 1.0), whole, (12.0 * scale, 48.0 * scale)


#: Seed of each case's deformation (plus --seed), the same whatever other cases run.
CASE_SEEDS = {"camera": 0, "retina": 1, "ihc": 2, "mri": 3}


def make_case(name: str, size2d: int, seed: int):
    fixed, spacing, whole, (umax, smooth) = load_image(name, size2d)
    u, u_inv = random_smooth_displacement(fixed.shape, umax, smooth, seed=seed, return_inverse=True)
    assert np.all(jacobian_determinant(u) > 0)
    moving = DisplacementTransform(u_inv).warp(fixed)
    return dict(
        name=name,
        fixed=fixed,
        moving=np.ascontiguousarray(moving, np.float32),
        truth=u,
        mask=tissue_mask(fixed, whole),
        umax=umax,
        smooth=smooth,
    )


# --------------------------------------------------------------------------------------------
# tools: each returns the pull-back displacement (D, *shape), voxels, numpy axis order


def run_nephi(fixed, moving, **options):
    """NePhi through the public API; the CPU time of each phase is timed from the ``cancel`` hook,
    which the engine calls once per step (unlike a progress callback it asks for no previews)."""
    marks: list[float] = []

    def mark():
        marks.append(time.process_time())
        return False

    c0 = time.process_time()
    reg = napari_nephi.register(fixed, moving, method="nephi", device="cpu", cancel=mark, **options)
    c1 = time.process_time()
    n_global = int(reg.metrics.get("initial_steps") or 0)  # the affine stage's steps come first
    t_global = marks[n_global - 1] if n_global and len(marks) >= n_global else c0
    n_coarse = n_global + int(reg.metrics.get("coarse_iterations") or 0)
    t_coarse = marks[n_coarse - 1] if n_coarse > n_global and len(marks) >= n_coarse else t_global
    t_opt = marks[-1] if marks else c0
    reg.metrics["cpu_split"] = (t_global - c0, t_coarse - t_global, t_opt - t_coarse, c1 - t_opt)
    return reg.transform.displacement(fixed.shape), reg


def elastix_parameters(ndim: int, metric: str = "mi"):
    """elastix's default B-spline map (itk-elastix), with resolutions and grid for these images."""
    import itk

    po = itk.ParameterObject.New()
    grid = 16.0 if ndim == 2 else 6.0  # voxels; the 2D deformations have sigma 48, the MRI 7
    levels = 4 if ndim == 2 else 3
    pm = po.GetDefaultParameterMap("bspline", levels, grid)
    if metric == "ncc":
        pm["Metric"] = ("AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty")
    pm["MaximumNumberOfIterations"] = ("500",)
    pm["NumberOfSpatialSamples"] = ("4096",)
    pm["WriteResultImage"] = ("false",)
    po.AddParameterMap(pm)
    return po


def run_elastix(fixed, moving, metric: str = "mi"):
    import itk

    f = itk.image_view_from_array(np.ascontiguousarray(fixed, np.float32))
    m = itk.image_view_from_array(np.ascontiguousarray(moving, np.float32))
    po = elastix_parameters(fixed.ndim, metric)
    # number_of_threads > 1 with the multi-metric B-spline map segfaults in itk-elastix 0.25
    # (ITKElastix issue #160); unset, elastix uses every core of the machine.
    threads = {"number_of_threads": THREADS} if THREADS == 1 else {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # transformix writes deformationField.nii into the working directory
        try:
            _, tp = itk.elastix_registration_method(
                f, m, parameter_object=po, log_to_console=False, **threads
            )
            field = itk.transformix_deformation_field(m, tp)
        finally:
            os.chdir(cwd)
    arr = np.asarray(itk.array_from_image(field), np.float32)  # (*shape, D), components x, y[, z]
    return np.ascontiguousarray(np.moveaxis(arr[..., ::-1], -1, 0)), tp


def run_ants(fixed, moving, metric: str = "mattes"):
    import ants

    f = ants.from_numpy(np.ascontiguousarray(fixed, np.float32))
    m = ants.from_numpy(np.ascontiguousarray(moving, np.float32))
    tx = ants.registration(
        f,
        m,
        type_of_transform="SyN",
        syn_metric=metric,
        reg_iterations=(100, 70, 50, 20),
        verbose=False,
    )
    return ants_displacement(f, moving.shape, tx["fwdtransforms"]), tx


def ants_displacement(fixed_img, moving_shape, transforms, pad: int = 32) -> np.ndarray:
    """``phi(x) - x`` from coordinate images of the moving grid, padded by ``pad`` voxels so that
    points mapped just outside the moving image still get their coordinate (no fill values)."""
    import ants

    shape = fixed_img.shape
    d = len(shape)
    padded = tuple(n + 2 * pad for n in moving_shape)
    out = np.empty((d, *shape), np.float32)
    for a in range(d):
        coord = np.indices(padded, dtype=np.float32)[a] - pad  # moving voxel index along axis a
        c = ants.from_numpy(np.ascontiguousarray(coord), origin=(-float(pad),) * d)
        w = ants.apply_transforms(fixed_img, c, transforms, interpolator="linear")
        idx = np.arange(shape[a], dtype=np.float32).reshape([-1 if k == a else 1 for k in range(d)])
        out[a] = w.numpy() - idx
    return out


TOOLS = {
    "elastix": ("elastix B-spline (MI)", lambda f, m: run_elastix(f, m, "mi")),
    "elastix-ncc": ("elastix B-spline (NCC)", lambda f, m: run_elastix(f, m, "ncc")),
    "ants": ("ANTs SyN (MI)", lambda f, m: run_ants(f, m, "mattes")),
    "ants-cc": ("ANTs SyN (CC)", lambda f, m: run_ants(f, m, "CC")),
}

# --------------------------------------------------------------------------------------------
# measurement


def timed(func, *args, **kwargs):
    """``(result, wall s, CPU s of the process, peak extra MiB)``.

    Memory freed by earlier tools stays in glibc's heap and would be reused silently (a peak of
    0 MiB); ``malloc_trim(0)`` hands it back to the system first, so each tool starts from the
    same kind of baseline.
    """
    gc.collect()
    release_free_memory(torch.device("cpu"))  # malloc_trim(0) on glibc
    cpu0 = time.process_time()
    result, wall, mib = measure(func, *args, **kwargs)
    return result, wall, time.process_time() - cpu0, mib


def evaluate(est: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    err = np.sqrt(((est - truth) ** 2).sum(0))
    det = jacobian_determinant(est)
    return dict(
        epe=float(np.nanmean(err[mask])),
        epe_p95=float(np.nanpercentile(err[mask], 95)),
        folds_pct=100.0 * float((det <= 0).mean()),
        det_min=float(det.min()),
    )


def parse_nephi(spec: str) -> tuple[str, dict]:
    """``"fast"`` or ``"name:key=value,key=value"`` -> (label, options)."""
    if ":" not in spec and "=" not in spec:
        return f"NePhi {spec}", {"preset": spec}
    label, _, rest = spec.partition(":") if ":" in spec else (spec, "", spec)
    opts = {}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        if v in ("True", "False", "None"):  # e.g. coarse_match_blur=False
            opts[k] = {"True": True, "False": False, "None": None}[v]
            continue
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        opts[k] = v
    return f"NePhi {label}", opts


def check_translation(tools, nephi_specs) -> None:
    """Every conversion on a pure translation: the recovered mean displacement must match."""
    from skimage import data
    from skimage.transform import resize

    cam = resize(_unit(data.camera()), (128, 128), anti_aliasing=True).astype(np.float32)
    mri, _ = mri_volume()
    for img, t in ((cam, (2.5, -4.0)), (mri, (1.5, -2.0, 1.0))):
        d = img.ndim
        field = np.broadcast_to(np.asarray(t, np.float32).reshape((d,) + (1,) * d), (d, *img.shape))
        # moving(x + t) = fixed(x): moving = fixed pulled back by -t
        moving = DisplacementTransform(np.ascontiguousarray(-field)).warp(img)
        inner = tuple(slice(n // 4, n - n // 4) for n in img.shape)
        runs = [
            (lbl, lambda f, m, o=o: run_nephi(f, m, **{**o, "iterations": 100})) for lbl, o in nephi_specs[:1]
        ]
        runs += [TOOLS[k] for k in tools]
        for label, fn in runs:
            est, _ = fn(img, moving)
            mean = [float(np.nanmean(est[a][inner])) for a in range(d)]
            ok = np.allclose(mean, t, atol=0.5)
            print(
                f"translation check {d}D {label}: true {t}, recovered {np.round(mean, 2).tolist()}",
                "ok" if ok else "FAILED",
            )
            if not ok:
                raise SystemExit("convention check failed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", default=["camera", "retina", "ihc", "mri"])
    p.add_argument("--tools", nargs="*", default=["elastix", "ants"], help=f"peers: {', '.join(TOOLS)}")
    p.add_argument("--nephi", action="append", help="preset, or 'label:key=value,...' (repeatable)")
    p.add_argument("--size2d", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="threads for torch, elastix and ANTs")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    nephi_specs = [parse_nephi(s) for s in (args.nephi or ["fast"])]
    print(
        f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()}"
    )
    if not args.no_check:
        check_translation(args.tools, nephi_specs)

    rows = []
    for name in args.cases:
        case = make_case(name, args.size2d, seed=args.seed + CASE_SEEDS.get(name, 0))
        fixed, moving, truth, mask = case["fixed"], case["moving"], case["truth"], case["mask"]
        shape = "x".join(map(str, fixed.shape))
        before = evaluate(np.zeros_like(truth), truth, mask)
        print(
            f"\n{name} {shape}: deformation max {case['umax']:.1f} vox, sigma {case['smooth']:.1f} vox; "
            f"mask {100 * mask.mean():.0f}% of voxels; EPE before {before['epe']:.3f} (p95 {before['epe_p95']:.3f})"
        )
        runs = [(lbl, lambda f, m, o=o: run_nephi(f, m, **o), o) for lbl, o in nephi_specs]
        runs += [(*TOOLS[t], None) for t in args.tools]
        for label, fn, opts in runs:
            load0 = os.getloadavg()[0]
            (est, extra), wall, cpu, mib = timed(fn, fixed, moving)
            row = dict(case=name, shape=shape, tool=label, options=opts, epe_before=before["epe"])
            row.update(evaluate(est, truth, mask))
            row.update(seconds=wall, cpu_seconds=cpu, peak_mib=mib, load=load0)
            split = ""
            if label.startswith("NePhi"):
                row["nephi_folds_pct"] = extra.metrics.get("fold_percent")
                row["cpu_global"], row["cpu_coarse"], row["cpu_neural"], row["cpu_outputs"] = extra.metrics[
                    "cpu_split"
                ]
                split = " (CPU: global {:.1f}, coarse {:.1f}, neural {:.1f}, outputs {:.1f})".format(
                    *extra.metrics["cpu_split"]
                )
            rows.append(row)
            print(
                f"  {label:32s} EPE {row['epe']:.3f} (p95 {row['epe_p95']:.3f})  folds {row['folds_pct']:.3f}%  "
                f"{wall:7.1f} s  CPU {cpu:7.1f} s  {mib:7.0f} MiB  load {load0:.1f}{split}",
                flush=True,
            )
            del est, extra

    print("\n| case | tool | EPE before | EPE | EPE p95 | folds % | wall s | CPU s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} {r['shape']} | {r['tool']} | {r['epe_before']:.2f} | {r['epe']:.3f} | {r['epe_p95']:.2f} | "
            f"{r['folds_pct']:.2f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_mib']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
