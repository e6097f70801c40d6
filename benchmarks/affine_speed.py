"""Speed and accuracy of the ``affine`` engine side by side with elastix (itk-elastix), same process.

Real images with known transforms: scikit-image's camera, retina and immunohistochemistry (grey,
512 x 512) and, in 3D, nibabel's ``anatomical.nii``, the first volume of nibabel's
``example4d.nii.gz`` and scikit-image's cells3d nuclei when its file is already cached (it is never
downloaded here). Each moving image is the fixed one resampled with scipy (cubic, an interpolation
neither method uses) through a known pull-back map ``phi``: ``moving(phi(x)) = fixed(x)``.

For each case it prints CPU seconds (``time.process_time``) and wall seconds of one call
(``napari_nephi.register`` for ours, ``itk.elastix_registration_method`` for elastix, both
resampling the moving image at the end), and the endpoint error of the recovered map against
``phi`` over every fixed voxel (mean and max, in voxels), then ratios ours / elastix.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/affine_speed.py --threads 1 --seeds 3

``--threads`` sets torch's threads and elastix's ``number_of_threads`` alike. ``--issue-case``
times only ``register(fixed, moving)`` with every default on the camera and a pure shift.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi


def grey_512(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.transform import resize

    g = rgb2gray(image) if image.ndim == 3 else image.astype(np.float64)
    if g.shape != (512, 512):
        g = resize(g, (512, 512), anti_aliasing=True)
    return (g / g.max()).astype(np.float32)


def images_2d() -> dict[str, tuple[np.ndarray, tuple[float, ...], None]]:
    import skimage.data as data

    return {
        name: (grey_512(getattr(data, name)()), (1.0, 1.0), None)
        for name in ("camera", "retina", "immunohistochemistry")
    }


def images_3d() -> dict[str, tuple[np.ndarray, tuple[float, ...], int | None]]:
    """``name: (volume, spacing, thin axis or None)``, padded by :func:`pad_volume`."""
    import nibabel as nib

    folder = Path(nib.__file__).parent / "tests" / "data"
    vols = {}
    anat = nib.load(folder / "anatomical.nii")
    vols["anatomical"] = (anat.dataobj, anat.header.get_zooms())
    ex = nib.load(folder / "example4d.nii.gz")
    vols["example4d[0]"] = (ex.dataobj[..., 0], ex.header.get_zooms()[:3])
    cells = _cached_cells3d()
    if cells is not None:
        vols["cells3d nuclei"] = (cells, (0.29, 0.26, 0.26))
    else:
        print("cells3d: not in the scikit-image cache (no download here); skipped", file=sys.stderr)
    out = {}
    for name, (data, zooms) in vols.items():
        spacing = tuple(float(z) for z in zooms)
        vol, thin = pad_volume(np.ascontiguousarray(data, dtype=np.float32), spacing)
        out[name] = (vol, spacing, thin)
    return out


def pad_volume(vol: np.ndarray, spacing) -> tuple[np.ndarray, int | None]:
    """Pad with the background (1st percentile) so that the transforms keep the whole volume in view.

    A thin slab (one axis under 60 % of the longest, in mm) is only rotated about that axis (see
    :func:`transforms`), so its other axes are padded to the diagonal of their plane and the thin
    axis by 4 voxels for the shifts along it; otherwise every axis is padded to the volume's
    diagonal. Returns the padded volume and the thin axis (or None).
    """
    extent = np.asarray(vol.shape) * np.asarray(spacing)
    thin = int(np.argmin(extent)) if extent.min() < 0.6 * extent.max() else None
    wide = [a for a in range(3) if a != thin]
    diag = float(np.sqrt((extent[wide] ** 2).sum()))
    pads = []
    for a in range(3):
        extra = 4 if a == thin else max(0, int(np.ceil((diag - extent[a]) / spacing[a] / 2)) + 2)
        pads.append((extra, extra))
    return np.pad(vol, pads, constant_values=float(np.percentile(vol, 1))), thin


def _cached_cells3d() -> np.ndarray | None:
    """The cells3d nuclei channel if scikit-image's cache already holds it (never downloaded here)."""
    import pooch
    import skimage

    root = Path(os.environ.get("SKIMAGE_DATADIR") or pooch.os_cache("scikit-image")) / skimage.__version__
    path = root / "data" / "cells3d.tif"
    if not path.exists():
        return None
    import tifffile

    return tifffile.imread(path)[:, 1].astype(np.float32)


def rotation(d: int, axis: int, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` in the plane of the two axes other than ``axis`` (2D: the plane)."""
    th = np.deg2rad(degrees)
    i, j = (0, 1) if d == 2 else [a for a in range(3) if a != axis]
    r = np.eye(d)
    r[i, i] = r[j, j] = np.cos(th)
    r[i, j], r[j, i] = -np.sin(th), np.sin(th)
    return r


def voxel_map(linear: np.ndarray, shift, shape, spacing) -> np.ndarray:
    """Homogeneous voxel map of ``y = A x + t`` in centred physical coordinates (``shift`` in voxels)."""
    d = len(shape)
    sp = np.asarray(spacing, float)
    c = (np.asarray(shape, float) - 1) / 2
    to_phys = np.eye(d + 1)
    to_phys[:d, :d], to_phys[:d, d] = np.diag(sp), -sp * c
    lin = np.eye(d + 1)
    lin[:d, :d], lin[:d, d] = linear, np.asarray(shift, float) * sp
    return np.linalg.inv(to_phys) @ lin @ to_phys


def transforms(
    d: int, rng: np.random.Generator, thin: int | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """``name: (A, shift in voxels, rigid)`` for one seed.

    With ``thin`` (3D), every rotation, scale and shear stays in the plane across that axis and
    shifts along it are at most 2 voxels, as slab acquisitions move: a tilted slab would bring in
    regions that were never imaged (filled with background, which no method should match).
    """

    def shift(lo, hi):
        return rng.uniform(lo, hi, d) * rng.choice([-1, 1], d)

    def sign():
        return float(rng.choice([-1, 1]))

    def main_axis():
        return int(rng.integers(d)) if thin is None else thin

    def mild_affine():
        a = rotation(d, main_axis(), rng.uniform(2, 6) * sign())
        b = np.diag(rng.uniform(0.92, 1.08, d)) + np.triu(rng.uniform(-0.06, 0.06, (d, d)), 1)
        if thin is not None:  # no scale or shear across the slab
            b[thin, :] = b[:, thin] = 0
            b[thin, thin] = 1
        return a @ b

    def shift3(lo, hi):
        t = shift(lo, hi)
        if thin is not None:
            t[thin] = rng.uniform(-2, 2)
        return t

    if d == 2:
        return {
            "shift": (np.eye(2), shift(3, 12), True),
            "rot10+shift": (rotation(2, 0, 10 * sign()), shift(2, 8), True),
            "rot90+shift": (rotation(2, 0, 90 * sign()), shift(2, 8), True),
            "rot170+shift": (rotation(2, 0, 170 * sign()), shift(2, 8), True),
            "mild affine": (mild_affine(), shift(2, 6), False),
        }
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    th = np.deg2rad(rng.uniform(6, 12))
    small = np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * k @ k
    if thin is not None:
        small = rotation(3, thin, np.rad2deg(th) * sign())
    return {
        "rigid 6-12 deg": (small, shift3(1, 4), True),
        "rot 90-150 deg main axis": (
            rotation(3, main_axis(), rng.uniform(90, 150) * sign()),
            shift3(1, 3),
            True,
        ),
        "mild affine": (mild_affine(), shift3(1, 3), False),
    }


def true_displacement(m: np.ndarray, shape) -> np.ndarray:
    idx = np.indices(shape).astype(np.float64).reshape(len(shape), -1)
    return (m[:-1, :-1] @ idx + m[:-1, -1:] - idx).reshape(len(shape), *shape)


def epe(u: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    e = np.linalg.norm(u.astype(np.float64) - truth, axis=0)
    return float(e.mean()), float(e.max())


def run_ours(fixed, moving, spacing, kind):
    import napari_nephi as nn

    c0, t0 = time.process_time(), time.perf_counter()
    reg = nn.register(fixed, moving, method="affine", kind=kind, spacing=spacing, device="cpu")
    c1, t1 = time.process_time(), time.perf_counter()
    return c1 - c0, t1 - t0, reg.transform.displacement(fixed.shape)


def run_elastix(fixed, moving, spacing, kind, threads):
    import itk

    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("rigid" if kind == "rigid" else "affine"))
    f = itk.image_view_from_array(np.ascontiguousarray(fixed))  # a Fortran-ordered array reads transposed
    m = itk.image_view_from_array(np.ascontiguousarray(moving))
    f.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    m.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    c0, t0 = time.process_time(), time.perf_counter()
    _, result = itk.elastix_registration_method(
        f, m, parameter_object=params, log_to_console=False, number_of_threads=threads
    )
    c1, t1 = time.process_time(), time.perf_counter()
    field = itk.array_from_image(itk.transformix_deformation_field(m, result))  # (*shape, D), x first
    u = np.moveaxis(field[..., ::-1], -1, 0) / np.asarray(spacing, float).reshape(-1, *([1] * fixed.ndim))
    return c1 - c0, t1 - t0, u


def make_moving(fixed: np.ndarray, m: np.ndarray, mode: str) -> np.ndarray:
    """``moving(m x) = fixed(x)``, resampled with cubic splines (3D: background outside)."""
    cval = float(np.percentile(fixed, 1)) if mode == "constant" else 0.0
    return ndi.affine_transform(fixed, np.linalg.inv(m), order=3, mode=mode, cval=cval).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch and elastix threads (default 1)")
    ap.add_argument("--seeds", type=int, default=3, help="random transforms per case (default 3)")
    ap.add_argument("--only", choices=("2d", "3d"), help="run only the 2D or the 3D cases")
    ap.add_argument("--no-rigid", action="store_true", help="skip the rigid runs of both methods")
    ap.add_argument("--json", type=Path, help="also write every row to this JSON file")
    ap.add_argument(
        "--issue-case",
        action="store_true",
        help="only time register(fixed, moving) with its defaults on the camera and a pure shift (seed 0)",
    )
    args = ap.parse_args(argv)

    import itk
    import torch

    torch.set_num_threads(args.threads)
    print(
        f"threads: torch {torch.get_num_threads()}, elastix {args.threads}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; itk-elastix {itk.__version__}, "
        f"torch {torch.__version__}"
    )
    if args.issue_case:
        return issue_case()
    sets = []
    if args.only != "3d":
        sets.append((2, images_2d(), "reflect"))
    if args.only != "2d":
        sets.append((3, images_3d(), "constant"))
    rows = []
    warm = True
    if args.json:
        args.json = args.json.resolve()
    workdir = tempfile.TemporaryDirectory()
    os.chdir(workdir.name)  # transformix writes deformationField.nii into the working folder
    for d, images, mode in sets:
        for name, (fixed, spacing, thin) in images.items():
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                for tname, (a, shift, rigid) in transforms(d, rng, thin).items():
                    m = voxel_map(a, shift, fixed.shape, spacing)
                    moving = make_moving(fixed, m, mode)
                    truth = true_displacement(m, fixed.shape)
                    kinds = ["affine"] + (["rigid"] if rigid and not args.no_rigid else [])
                    for kind in kinds:
                        if warm:  # imports and first-call set-up of both, outside the timings
                            run_ours(fixed, moving, spacing, kind)
                            run_elastix(fixed, moving, spacing, kind, args.threads)
                            warm = False
                        for method in ("ours", "elastix"):
                            if method == "ours":
                                cpu, wall, u = run_ours(fixed, moving, spacing, kind)
                            else:
                                cpu, wall, u = run_elastix(fixed, moving, spacing, kind, args.threads)
                            mean, mx = epe(u, truth)
                            row = dict(
                                image=name, transform=tname, seed=seed, kind=kind, method=method,
                                cpu_s=cpu, wall_s=wall, epe_mean=mean, epe_max=mx,
                            )  # fmt: skip
                            rows.append(row)
                            print(
                                f"{d}D {name:21s} {tname:25s} seed {seed} {kind:6s} {method:7s} "
                                f"cpu {cpu:6.3f} s wall {wall:6.3f} s  EPE mean {mean:8.3f} max {mx:8.3f}",
                                flush=True,
                            )
    print()
    print(summary(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def issue_case() -> int:
    """``register(fixed, moving)`` with every default, as a new user calls it, twice after a warm-up."""
    import napari_nephi as nn

    fixed, spacing, _ = images_2d()["camera"]
    a, shift, _ = transforms(2, np.random.default_rng(0))["shift"]
    m = voxel_map(a, shift, fixed.shape, spacing)
    moving = make_moving(fixed, m, "reflect")
    truth = true_displacement(m, fixed.shape)
    nn.register(fixed[::4, ::4], moving[::4, ::4])
    for _ in range(2):
        c0, t0 = time.process_time(), time.perf_counter()
        reg = nn.register(fixed, moving)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        mean, mx = epe(reg.transform.displacement(fixed.shape), truth)
        print(
            f"shift {np.round(shift, 2)}: cpu {cpu:.2f} s wall {wall:.2f} s EPE mean {mean:.3f} max {mx:.3f}"
        )
    return 0


FIELDS = ("cpu_s", "wall_s", "epe_mean")


def summary(rows: list[dict]) -> str:
    """Markdown table: per image, transform and kind, medians over seeds and ours / elastix ratios."""
    keys = []
    for r in rows:
        k = (r["image"], r["transform"], r["kind"])
        if k not in keys:
            keys.append(k)
    lines = [
        "| image | transform | kind | CPU s ours | CPU s elastix | CPU ratio | wall ratio "
        "| EPE mean ours | EPE mean elastix | EPE max ours | EPE max elastix |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        sel = {
            meth: [r for r in rows if (r["image"], r["transform"], r["kind"]) == k and r["method"] == meth]
            for meth in ("ours", "elastix")
        }

        med = {(meth, f): float(np.median([r[f] for r in sel[meth]])) for meth in sel for f in FIELDS}
        worst = {meth: float(np.max([r["epe_max"] for r in sel[meth]])) for meth in sel}

        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {med['ours', 'cpu_s']:.2f} | {med['elastix', 'cpu_s']:.2f} "
            f"| {med['ours', 'cpu_s'] / med['elastix', 'cpu_s']:.2f} "
            f"| {med['ours', 'wall_s'] / med['elastix', 'wall_s']:.2f} "
            f"| {med['ours', 'epe_mean']:.3f} | {med['elastix', 'epe_mean']:.3f} "
            f"| {worst['ours']:.3f} | {worst['elastix']:.3f} |"
        )
    lines.append("")
    lines.append("CPU and wall: medians over seeds; EPE mean: median over seeds; EPE max: worst seed.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
