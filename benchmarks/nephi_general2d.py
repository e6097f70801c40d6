# ruff: noqa: E501  (table-printing lines)
"""The general 2D NePhi model: predict and predict+refine against optimize, on known smooth warps.

    python benchmarks/nephi_general2d.py                       # every image, 1 %, 2 %, 4 %
    python benchmarks/nephi_general2d.py --images camera retina --amplitudes 0.02 --size 256
    python benchmarks/nephi_general2d.py --weights my_model.pt --json out.json
    python benchmarks/nephi_general2d.py --modes predict+refine        # one mode (e.g. another tree's)

Images: the ones held out from the model's training (``shipped_pairs.HELD_OUT``: camera, cell,
coins) and ones it saw (retina, immunohistochemistry, astronaut), grey, resized to ``--size``
squared; ``--images`` also takes any other 2D image of ``skimage.data`` (e.g. ``lily``, ``human_mitosis``:
never seen in training). Each is the fixed image; the moving image is it pulled back through the inverse of a
random smooth diffeomorphism (:func:`napari_nephi.synthetic.random_smooth_displacement`) whose
largest vector is the amplitude times the size and whose smoothness is drawn in 3-6 % of the size
(larger where that amplitude would fold), seeds 100 + case index (+ ``--seed``): not the fields
of training. The true pull-back displacement ``u`` (fixed voxel -> moving voxel) is known exactly.

Modes as the engine defines them: ``predict`` (one pass, the field sampled on the model's 128^2
grid), ``predict+refine`` (the prediction low-passed, then the coarse B-spline stage from it on grids
twice as coarse as optimize's with optimize's knots, 50 steps a level, no neural steps in 2D; since
session 28 the stage starts from the prediction as a velocity and samples the moving image once; since
session 29 its flat fill's texture threshold is halved at 512 px, ``predict.refine_flat_gradient``; since
session 31 the model predicts twice, the second time from the moving image resampled through its first
prediction, ``predict.REFINE_PREDICT_TWICE``, on images of 512 px and more),
``optimize`` (the engine's default: rigid global stage, coarse stage, neural steps skipped at 512 px).

Per mode: mean endpoint error ``|u_est - u_true|`` (pixels, whole image), NCC of the warped moving
image with the fixed one, % of pixels with ``det J <= 0``, and CPU seconds of the process during
the call (torch on ``--threads`` threads, default 1). The last lines compare predict+refine with
optimize: the issue's target is an endpoint error at most optimize's in at most a third of its
CPU time. An optimize row whose default global stage's basin guard judged the map (session 24) says which
map it kept (``initial_basin`` in ``--json``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import napari_nephi
from napari_nephi.core.errors import InputError
from napari_nephi.core.inputs import normalize_intensity
from napari_nephi.core.jacobian import jacobian_determinant
from napari_nephi.core.transform import DisplacementTransform
from napari_nephi.engines.nephi.shipped_pairs import HELD_OUT, TRAINING, shipped_image
from napari_nephi.synthetic import random_smooth_displacement

IMAGES = ("camera", "cell", "coins", "retina", "immunohistochemistry", "astronaut")
AMPLITUDES = (0.01, 0.02, 0.04)
MODES = {
    "identity": None,
    "predict": {"mode": "predict"},
    "predict+refine": {"mode": "predict+refine"},
    "optimize": {"mode": "optimize"},
}


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def benchmark_image(name: str) -> np.ndarray:
    """A shipped image (:func:`shipped_image`), or any other 2D image of ``skimage.data`` (e.g. ``lily``,
    ``human_mitosis``: never seen in training), grey and scaled to [0, 1] by the same ``normalize_intensity`` as the
    shipped ones. An image with channels is made grey from its first three by luminance (``rgb2gray``): for
    ``lily``, four fluorescence channels, the fourth is dropped."""
    if name in TRAINING or name in HELD_OUT:
        return shipped_image(name)
    from skimage import data
    from skimage.color import rgb2gray

    loader = getattr(data, name, None)
    if loader is None:
        raise InputError(f"Unknown image {name!r}: neither a shipped image nor one of skimage.data.")
    try:
        img = np.asarray(loader())
    except Exception as exc:  # not in the package and not cached: pooch downloads it
        raise InputError(
            f"skimage.data.{name} could not be loaded (not cached and no network?): {exc}"
        ) from exc
    if img.ndim == 3 and img.shape[-1] in (3, 4):  # colour (or lily's four channels): not a volume
        img = rgb2gray(img[..., :3])
    if img.ndim != 2:
        raise InputError(f"skimage.data.{name} is not a 2D image.")
    return normalize_intensity(img.astype(np.float32))


def make_case(name: str, amplitude: float, size: int, seed: int) -> dict:
    """Fixed image, moving image and the true pull-back displacement."""
    from skimage.transform import resize

    img = benchmark_image(name)
    fixed = resize(img, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    rng = np.random.default_rng(seed)
    smooth = float(rng.uniform(0.03, 0.06)) * size
    for _ in range(8):
        try:
            u, u_inv = random_smooth_displacement(
                fixed.shape, amplitude * size, smooth, seed=seed, return_inverse=True
            )
            break
        except InputError:  # this amplitude would fold at this smoothness: smoother
            smooth *= 1.15
    assert np.all(jacobian_determinant(u) > 0)
    moving = DisplacementTransform(u_inv).warp(fixed)
    return {"fixed": fixed, "moving": np.ascontiguousarray(moving, np.float32), "truth": u, "smooth": smooth}


def run(case: dict, options: dict | None, weights: str) -> dict:
    fixed, moving, truth = case["fixed"], case["moving"], case["truth"]
    if options is None:
        u, warped, cpu, wall = np.zeros_like(truth), moving, 0.0, 0.0
    else:
        if options["mode"] != "optimize":
            options = {**options, "weights": weights}
        c0, w0 = time.process_time(), time.perf_counter()
        reg = napari_nephi.register(fixed, moving, method="nephi", device="cpu", **options)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        u, warped = reg.transform.displacement(fixed.shape), reg.warped
    det = jacobian_determinant(u)
    return {
        "epe": float(np.sqrt(((u - truth) ** 2).sum(0)).mean()),
        "ncc": ncc(np.asarray(warped, np.float64), fixed.astype(np.float64)),
        "folds": float((det <= 0).mean() * 100),
        "cpu": cpu,
        "wall": wall,
        # optimize's default global stage: whether its basin guard judged the map, and which it kept
        "initial_basin": None if options is None else reg.metrics.get("initial_basin"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=list(IMAGES))
    p.add_argument("--amplitudes", nargs="+", type=float, default=list(AMPLITUDES))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--weights", default="general2d")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every row here")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="run only these modes (e.g. predict+refine alone to compare two trees; the group table needs optimize)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"{args.size} x {args.size}, weights {args.weights}, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print("| image | seen in training | amplitude | mode | EPE px | NCC | % folds | CPU s |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    rows = []
    for i, name in enumerate(args.images):
        for j, amp in enumerate(args.amplitudes):
            case = make_case(name, amp, args.size, 100 + 10 * i + j + args.seed)
            seen = "yes" if name in TRAINING else "no"
            for mode, options in MODES.items():
                if mode not in args.modes:
                    continue
                r = run(case, options, args.weights) | {
                    "image": name,
                    "seen": seen,
                    "amplitude": amp,
                    "mode": mode,
                }
                rows.append(r)
                judged = r["initial_basin"] and r["initial_basin"]["judged"]
                print(
                    f"| {name} | {seen} | {amp:.0%} | {mode} | {r['epe']:.3f} | {r['ncc']:.4f} | {r['folds']:.3f} | {r['cpu']:.1f} |"
                    + (f" basin judged: {r['initial_basin']['kept']} kept" if judged else ""),
                    flush=True,
                )
    print("\nMeans per group (EPE px, CPU s); ratio = predict+refine / optimize")
    print("| seen | amplitude | predict EPE | predict+refine EPE | optimize EPE | EPE ratio | CPU ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for seen in ("no", "yes"):
        for amp in args.amplitudes:
            sel = {
                m: [r for r in rows if r["seen"] == seen and r["amplitude"] == amp and r["mode"] == m]
                for m in MODES
            }
            if not all(sel[m] for m in ("predict", "predict+refine", "optimize")):
                continue
            mean = {
                m: (np.mean([r["epe"] for r in v]), np.mean([r["cpu"] for r in v])) for m, v in sel.items()
            }
            print(
                f"| {seen} | {amp:.0%} | {mean['predict'][0]:.3f} | {mean['predict+refine'][0]:.3f} | {mean['optimize'][0]:.3f} "
                f"| {mean['predict+refine'][0] / mean['optimize'][0]:.2f} | {mean['predict+refine'][1] / mean['optimize'][1]:.2f} |"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
