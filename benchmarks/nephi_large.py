# ruff: noqa: E501  (table-printing lines)
"""NePhi on large smooth deformations, textured and textureless tissue, shifts and rotations.

    python benchmarks/nephi_large.py [--quick] [--images camera retina ihc disc] [--amplitudes 1 2 4]
        [--mri-amplitudes 2 4 6] [--seeds 10] [--tools elastix elastix-ncc ants]
        [--nephi fast] [--nephi "label:key=value,..."] [--size2d 512] [--no-global] [--noise 0.02] [--noise-kind poisson]
        [--warmup] [--alternate-arms] [--json out.json]

Extends ``nephi_accuracy.py`` (same tools, conventions and measurements, imported from it):

* every 2D image is warped at displacement amplitudes of ``--amplitudes`` per cent of its size
  (1, 2, 4: 5, 10, 20 px at 512 x 512), with a smoothness (Gaussian correlation length) of
  3, 4.5 and 6 % of the size for them (rising with the amplitude, so every field is a
  diffeomorphism); nibabel's MRI at ``--mri-amplitudes`` voxels (2, 4, 6) with smoothness 7
  voxels. The field of a case is drawn with seed ``--seeds`` (default 10) + 10 x the image's
  offset (camera 0, retina 1, ihc 2, disc 3, mri 4) + the amplitude: new fields, not the ones of
  ``nephi_accuracy.py`` (seeds 0-3). (Until commit "nephi_large: per-case seeds" the k-th case of
  the run got ``--seeds + offset + 10 k``.)
* images: scikit-image's ``camera`` (a large flat sky), ``retina``, ``immunohistochemistry`` and
  ``disc``: ``gravel`` with a flat disc of radius 22 % of the size in its middle (textureless
  tissue surrounded by texture).
* the endpoint error (EPE, voxels) is reported on all tissue, on textured tissue and on
  textureless tissue: a voxel is textureless when the local RMS gradient of the fixed image
  (central differences, intensities in [0, 1], averaged in a Gaussian window of sigma 4 px x
  size/512 in 2D, 1 voxel in 3D) is below ``TEXTURE_THRESHOLD`` (0.01 per pixel in 2D, 0.05 per
  voxel on the MRI, whose 2 mm voxels make every gradient larger).
* global cases (``--no-global`` skips them): the camera shifted by (7.5, -4) px (scaled with the
  size) and rotated by 5 degrees about its centre. Reported: EPE, the Jacobian determinant's range
  and NePhi's inverse consistency ``|phi_inv(phi(x)) - x|`` (mean, max), all 32 px (scaled) inside
  the border. The moving image takes the edge value outside the frame (no black strip).
  ``--global-images camera retina`` adds other images, ``--global-orders 1 3`` a moving image
  resampled by cubic splines besides the default linear one (whose blur, set by the sub-pixel part
  of the map, the deformable stages fit at strong edges); ``--global-orders area`` a fair pair (session 35,
  :func:`rigid_pair_area`): one object (the image upsampled 4 times by cubic splines) imaged twice by the same
  voxels (means over 4-voxel blocks per axis), the second time after the map moved it on the fine grid, so the
  two images carry the same blur, as two acquisitions of a moving object do (names end ", area 4x"; its fixed
  image is the area-sampled object, not the image itself); ``--global-degrees 5 60`` other rotations
  (NePhi's rows say whether the default global stage's basin guard judged the map and which it kept).
  ``--neural-3d-gate RMS`` sets the opt-in gate of the neural stage on volumes (session 33,
  ``engine.NEURAL_3D_GATE_RMS``); NePhi's rows on volumes then give its reading (the coarse map's displacement RMS,
  voxels) and whether the neural stage ran (JSON ``neural_3d_gate``). ``--neural-3d-gate-blur B`` with it: a map under
  the RMS skips the stage only where the moving image is blurrier by more than B voxel^2 (session 34,
  ``engine.NEURAL_3D_GATE_BLUR``; the reading is ``excess_blur`` in the JSON). ``--warp-blur-3d on|all``: the
  coarse stage matches its trilinear warp's smoothing on volumes (session 35, ``coarse.WARP_BLUR_3D``, which
  overrides the engine's default where set). ``--coarse-reg-weight-3d R``: the coarse stage's default bending
  weight on volumes (session 36, ``engine.COARSE_REG_WEIGHT_3D``; 2D keeps ``engine.COARSE_REG_WEIGHT``). Since
  session 37 the fast preset's volume default (optimize, not chunked, volumes of at most
  ``engine.VOLUME_DEFAULT_MAX_VOXELS``, 33,825: the bundled MRI; 2^19 since session 38, 2^20 since 39) is warp blur "all",
  weight 0.03 and no neural steps after the coarse stage; the earlier one is ``--nephi
  "old:coarse_warp_blur=False,coarse_reg_weight=0.1,iterations=50"``.
* ``--deformation-orders 1 area``: the deformation cases also as fair pairs (session 36,
  :func:`deformation_pair_area`): both images area means over 4-voxel blocks of one object, the moving one after
  the field moved the object on the fine grid, so the pair differs by the field only (names end ", area 4x"; same
  fields). The default, ``1``, is the moving image resampled linearly through the field (earlier sessions' cases,
  the same numbers), whose blur varies with the field's sub-voxel part.

``--noise SIGMA``: independent Gaussian noise of that standard deviation (intensities in [0, 1])
added to both images of every case (seeded by the case), the warp made from the noise-free image;
``--noise-kind poisson``: photon noise instead, ``SIGMA`` at mid-range (:func:`add_noise`). The
textured and textureless parts are those of the noise-free image.
``--images cell`` (not in the default list): scikit-image's cell (faint texture, whole frame).

``--warmup`` (session 42): one small NePhi registration (64 x 64, two coarse steps) before the first case, so the
process's warm-up (imports, torch's first kernels and allocations: about 200 against 90 MiB resident and a few CPU
seconds in session 42's runs) does not fall on the first arm of the first case. ``--alternate-arms``: NePhi's arms
(``--nephi``, two or more) run in reverse order on every second case of the run (deformation cases, then global
ones, counted together), so no arm always runs first within a case. Both off by default (as before).

``--quick``: 256 x 256, camera and disc at 2 % and 4 %, the MRI at 4 voxels, the two global cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import nephi_accuracy as NA  # noqa: E402  (sets the thread count of ITK before it is imported)
import numpy as np
import torch
from scipy import ndimage

from napari_nephi.core.jacobian import jacobian_determinant
from napari_nephi.core.transform import AffineTransform, DisplacementTransform
from napari_nephi.synthetic import mri_volume, random_smooth_displacement

#: Textureless below this local RMS gradient (intensity in [0, 1] per voxel): 2D, 3D.
TEXTURE_THRESHOLD = {2: 0.01, 3: 0.05}
#: Smoothness of the 2D fields as a fraction of the size, per amplitude (per cent of the size).
SMOOTHNESS = {1: 0.03, 2: 0.045, 4: 0.06}
MRI_SMOOTHNESS = 7.0
#: Margin (voxels) inside which the 3D global cases are measured.
MARGIN_3D = 3
CASE_OFFSETS = {"camera": 0, "retina": 1, "ihc": 2, "disc": 3, "mri": 4, "cell": 5}
#: Fair rigid pairs (``--global-orders area``, session 35): both images area means over blocks of this many
#: voxels per axis of one object upsampled by it (:func:`rigid_pair_area`).
AREA_FACTOR = 4


def local_gradient_rms(img: np.ndarray, sigma: float) -> np.ndarray:
    """RMS of the central-difference gradient magnitude in a Gaussian window of ``sigma``."""
    energy = sum(g**2 for g in np.gradient(img.astype(np.float64)))
    return np.sqrt(ndimage.gaussian_filter(energy, sigma))


def textureless_mask(img: np.ndarray) -> np.ndarray:
    sigma = 4.0 * img.shape[0] / 512 if img.ndim == 2 else 1.0
    return local_gradient_rms(img, sigma) < TEXTURE_THRESHOLD[img.ndim]


def disc_image(size: int) -> np.ndarray:
    """scikit-image's gravel texture with a flat disc (radius 22 % of the size) in its middle."""
    from skimage import data
    from skimage.transform import resize

    img = NA._unit(data.gravel())
    if img.shape != (size, size):
        img = resize(img, (size, size), anti_aliasing=True, preserve_range=True).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    img[(yy - c) ** 2 + (xx - c) ** 2 <= (0.22 * size) ** 2] = float(img.mean())
    return img


def load(name: str, size: int) -> tuple[np.ndarray, bool]:
    """``(fixed image, whole frame is tissue)``."""
    if name == "disc":
        return disc_image(size), True
    if name == "cell":  # scikit-image's cell: low-contrast texture under the camera's own noise
        from skimage import data
        from skimage.transform import resize

        img = resize(NA._unit(data.cell()), (size, size), anti_aliasing=True, preserve_range=True)
        return img.astype(np.float32), True
    img, _, whole, _ = NA.load_image(name, size)
    return img, whole


def make_case(name: str, amplitude: float, size: int, seed: int, order: int | str = 1) -> dict:
    """A deformation case: the field drawn from ``seed`` (the same for every ``order``); ``order`` 1, the moving
    image is the fixed one resampled linearly through it (the cases of earlier sessions, unchanged); ``"area"``,
    the fair pair of :func:`deformation_pair_area` (names end ", area 4x")."""
    if order not in (1, "area"):
        raise ValueError(f"{order!r}: a deformation case is resampled linearly (1) or area-sampled (area)")
    if name == "mri":
        img, _ = mri_volume()
        whole, umax, smooth = False, float(amplitude), MRI_SMOOTHNESS
    else:
        img, whole = load(name, size)
        # amplitudes under 1 % (near-rigid pairs) take the 1 % smoothness
        umax, smooth = amplitude / 100 * size, SMOOTHNESS[max(1, int(amplitude))] * size
    u, u_inv = random_smooth_displacement(img.shape, umax, smooth, seed=seed, return_inverse=True)
    assert np.all(jacobian_determinant(u) > 0)
    if order == "area":
        fixed, moving = deformation_pair_area(img, u_inv)
    else:
        fixed = img
        moving = np.ascontiguousarray(DisplacementTransform(u_inv).warp(fixed), np.float32)
    mask = NA.tissue_mask(fixed, whole)
    flat = textureless_mask(fixed) & mask
    return dict(
        name=f"{name} {amplitude:g}{'' if name == 'mri' else ' %'}" + sampling_suffix(order),
        fixed=fixed,
        moving=moving,
        truth=u,
        mask=mask,
        flat=flat,
        textured=mask & ~flat,
        umax=umax,
        smooth=smooth,
    )


def fine_object(img: np.ndarray, factor: int) -> np.ndarray:
    """``img`` upsampled ``factor`` times by cubic splines (edge values outside): voxel ``i`` of ``img`` is the
    centre of the fine voxels ``factor i .. factor i + factor - 1``. The "object" of a fair rigid pair."""
    d = img.ndim
    c = (factor - 1) / 2
    shape = tuple(factor * n for n in img.shape)
    return ndimage.affine_transform(
        np.asarray(img, np.float64),
        np.eye(d) / factor,
        np.full(d, -c / factor),
        shape,
        order=3,
        mode="nearest",
    )


def area_down(fine: np.ndarray, factor: int) -> np.ndarray:
    """Mean over blocks of ``factor`` voxels per axis: every voxel integrates its footprint on the fine grid."""
    split = [x for n in fine.shape for x in (n // factor, factor)]
    return np.ascontiguousarray(fine.reshape(split).mean(axis=tuple(range(1, 2 * fine.ndim, 2))), np.float32)


def rigid_pair_area(
    img: np.ndarray, mat: np.ndarray, factor: int = AREA_FACTOR
) -> tuple[np.ndarray, np.ndarray]:
    """A fair rigid pair ``(fixed, moving)`` with ``moving(mat x) = fixed(x)``: one object (``img`` upsampled
    ``factor`` times, :func:`fine_object`) imaged twice by the same voxels (area means over ``factor``-voxel
    blocks, :func:`area_down`), the second time after the object moved by ``mat`` (applied on the fine grid by
    cubic splines). Both images carry the same blur, as two acquisitions of one moving object do; a moving image
    resampled from the fixed one (:func:`rigid_moving`) carries the resampling's blur besides."""
    d = img.ndim
    fine = fine_object(img, factor)
    scale = np.eye(d + 1)
    scale[:d, :d] *= factor
    scale[:d, d] = (factor - 1) / 2  # coarse voxel x -> its centre on the fine grid
    inv = np.linalg.inv(scale @ mat @ np.linalg.inv(scale))
    moved = ndimage.affine_transform(fine, inv[:d, :d], inv[:d, d], order=3, mode="nearest")
    return area_down(fine, factor), area_down(moved, factor)


def deformation_pair_area(
    img: np.ndarray, u_inv: np.ndarray, factor: int = AREA_FACTOR
) -> tuple[np.ndarray, np.ndarray]:
    """A fair deformation pair ``(fixed, moving)`` with ``moving(x + u(x)) = fixed(x)`` where ``u_inv`` is the
    inverse of ``u`` (``moving(y) = object(y + u_inv(y))``): the object of :func:`rigid_pair_area` imaged twice by
    the same voxels, the second time after the field moved it on the fine grid (``u_inv`` interpolated there by
    cubic splines, the object sampled through it by cubic splines; session 36). Both images carry the voxel's box
    blur; the moving one of :func:`make_case`'s linear pairs carries the resampling's blur besides, which varies
    with the field's sub-voxel part."""
    d = img.ndim
    fine = fine_object(img, factor)
    fgrid = np.stack(
        np.meshgrid(*[np.arange(factor * n, dtype=np.float64) for n in img.shape], indexing="ij")
    )
    pts = (fgrid - (factor - 1) / 2) / factor  # fine voxels in coarse voxel coordinates
    uf = np.stack(
        [
            ndimage.map_coordinates(np.asarray(u_inv[i], np.float64), pts, order=3, mode="nearest")
            for i in range(d)
        ]
    )
    moved = ndimage.map_coordinates(fine, fgrid + factor * uf, order=3, mode="nearest")
    return area_down(fine, factor), area_down(moved, factor)


def rigid_images(img: np.ndarray, mat: np.ndarray, order: int | str) -> tuple[np.ndarray, np.ndarray]:
    """``(fixed, moving)`` of a rigid case: ``order`` 1 or 3, ``img`` and its resampling (:func:`rigid_moving`);
    ``"area"``, the fair pair of :func:`rigid_pair_area`."""
    if order == "area":
        return rigid_pair_area(img, mat)
    return img, rigid_moving(img, mat, int(order))


def sampling_suffix(order: int | str) -> str:
    """Case-name suffix of a rigid case's sampling: none for linear resampling (the earlier sessions' names)."""
    return {1: "", 3: ", cubic", "area": f", area {AREA_FACTOR}x"}[order]


def parse_weight(text: str) -> float:
    """``--coarse-reg-weight-3d``: a finite bending weight of at least 0 (argparse's error otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a bending weight is a finite number of at least 0")
    return value


def parse_order(text: str) -> int | str:
    """``--global-orders`` values: a spline order (1, 3) or ``area``; anything else is refused with a clear
    message (argparse's error, not a traceback where the case is named)."""
    if text == "area":
        return text
    if text in ("1", "3"):
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: a global order is 1 (linear), 3 (cubic) or area (fair pair)")


def rigid_moving(fixed: np.ndarray, mat: np.ndarray, order: int) -> np.ndarray:
    """``fixed`` resampled through the inverse of the homogeneous pull-back ``mat`` (``moving(mat x) =
    fixed(x)``) with spline ``order``, edge values outside the frame (not zeros, which would put a
    black strip into the moving image)."""
    d = fixed.ndim
    inv = np.linalg.inv(mat)
    moving = ndimage.affine_transform(fixed, inv[:d, :d], inv[:d, d], order=order, mode="nearest")
    return np.ascontiguousarray(moving, np.float32)


def rotation_matrix(shape, degrees: float, axis=None, shift=None) -> np.ndarray:
    """Homogeneous map turning by ``degrees`` about the centre of ``shape`` (3D: about ``axis``, a
    vector in array order; None: the first axis, i.e. in the plane of the last two), then shifting by
    ``shift`` (voxels, None: none)."""
    d = len(shape)
    c = (np.asarray(shape, np.float64) - 1) / 2
    a = np.deg2rad(degrees)
    if d == 2:
        r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    else:
        k = np.asarray((1.0, 0.0, 0.0) if axis is None else axis, np.float64)
        k = k / np.linalg.norm(k)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        r = np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx  # Rodrigues
    mat = np.eye(d + 1)
    mat[:d, :d] = r
    mat[:d, d] = c - r @ c + (0 if shift is None else np.asarray(shift, np.float64))
    return mat


def global_cases(size: int, image: str = "camera", order: int | str = 1, degrees=(5.0,)) -> list[dict]:
    """``image`` shifted by (7.5, -4) px (at 512) and rotated by each of ``degrees`` about its centre, the
    moving image resampled with spline ``order`` (1: linear, which blurs it by an amount set by the
    sub-pixel part of the map; 3: cubic, nearly none; "area": the fair pair of :func:`rigid_pair_area`, whose
    fixed image is the area-sampled object, not ``image`` itself). Names: "camera shift" and "camera rotation
    5 deg" for the camera at order 1 (the cases of earlier sessions), else with the image and
    ", cubic" (", area 4x") added. ``image="mri"``: the bundled MRI (25 x 41 x 33, 2 mm voxels) shifted by (1.25,
    -0.75, 0.5) voxels and rotated about its first axis (in the plane of the last two): the 3D cases
    of docs/nephi.md (review R7)."""
    img = mri_volume()[0] if image == "mri" else load(image, size)[0]
    s = size / 512
    shift = np.eye(img.ndim + 1)
    shift[:-1, -1] = (1.25, -0.75, 0.5) if img.ndim == 3 else (7.5 * s, -4.0 * s)
    maps = [("shift", shift)] + [
        (f"rotation {deg:g} deg", rotation_matrix(img.shape, deg)) for deg in degrees
    ]
    out = []
    for label, mat in maps:
        fixed, moving = rigid_images(img, mat, order)
        truth = AffineTransform(mat).displacement(fixed.shape)  # pull-back: moving(phi(x)) = fixed(x)
        name = f"{image} {label}" + sampling_suffix(order)
        out.append(dict(name=name, fixed=fixed, moving=moving, truth=truth))
    return out


def rigid_draw(
    seed: int, image: str, i: int, shape, max_shift: float = 2.0, max_degrees: float = 6.0
) -> tuple[np.ndarray, str]:
    """Draw ``i`` of :func:`random_rigid_cases` for an image of ``shape``: ``(homogeneous pull-back map, its
    description)``; the numbers drawn depend on (seed, image, i) only, the centre of rotation on ``shape``
    (``nephi_zoom_cases.py`` draws the maps of the zoomed MRI with it)."""
    d = len(shape)
    rng = np.random.default_rng([seed, CASE_OFFSETS[image], i, 31])
    kind = ("shift", "rotation", "both")[i % 3]
    shift = rng.uniform(-max_shift, max_shift, d) if kind != "rotation" else np.zeros(d)
    deg = rng.uniform(0.1, 1.0) * max_degrees * rng.choice([-1, 1]) if kind != "shift" else 0.0
    axis = rng.normal(size=3) if d == 3 else None
    mat = rotation_matrix(shape, deg, axis, shift)
    parts = [f"shift ({', '.join(f'{t:.2f}' for t in shift)})"] if kind != "rotation" else []
    return mat, " ".join(parts + ([f"rotation {deg:.2f} deg"] if kind != "shift" else []))


def random_rigid_cases(
    seed: int,
    count: int,
    size: int,
    image: str,
    order: int | str = 1,
    max_shift: float = 2.0,
    max_degrees: float = 6.0,
) -> list[dict]:
    """``count`` random rigid maps of ``image`` ("mri": the bundled MRI) drawn from ``seed``: draw ``i`` is
    a shift (``i % 3 == 0``), a rotation about the centre (1) or both (2); shifts uniform in
    +-``max_shift`` voxels per axis, rotations uniform in +-``max_degrees`` (at least a tenth of it), in
    3D about a random axis. The draw depends on (seed, image, i) only, not on the other cases run (nor on
    ``order``: the three samplings of a draw share its map)."""
    img = mri_volume()[0] if image == "mri" else load(image, size)[0]
    out = []
    for i in range(count):
        mat, what = rigid_draw(seed, image, i, img.shape, max_shift, max_degrees)
        fixed, moving = rigid_images(img, mat, order)
        truth = AffineTransform(mat).displacement(fixed.shape)
        name = f"{image} rigid {seed}.{i} {what}" + sampling_suffix(order)
        # --noise: seeded by the draw too, not by the case's place in the run
        noise_seed = [seed, CASE_OFFSETS[image], i, 100 + AREA_FACTOR if order == "area" else order, 1000]
        out.append(dict(name=name, fixed=fixed, moving=moving, truth=truth, noise_seed=noise_seed))
    return out


def add_noise(case: dict, sigma: float, seed: int | list[int], kind: str = "gaussian") -> None:
    """Independent noise on both images of ``case`` (intensities scaled to [0, 1] by the image's
    range): ``gaussian``, of standard deviation ``sigma``; ``poisson``, photon counts with a peak of
    ``0.5 / sigma^2`` photons at full range (standard deviation ``sigma`` at mid-range, less on dark
    voxels, more on bright ones, like a fluorescence camera)."""
    if sigma <= 0:
        return
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 7])  # an int seed: [seed, 7], as before
    for key in ("fixed", "moving"):
        img = case[key]
        lo, hi = float(img.min()), float(img.max())
        if kind == "poisson":
            peak = 0.5 / sigma**2
            counts = rng.poisson(np.clip((img - lo) / (hi - lo), 0, None) * peak)
            case[key] = np.ascontiguousarray(lo + (hi - lo) * counts / peak, np.float32)
            continue
        noise = rng.normal(0.0, sigma * (hi - lo), img.shape).astype(np.float32)
        case[key] = np.ascontiguousarray(img + noise, np.float32)


def inner(shape, margin: int) -> tuple[slice, ...]:
    return tuple(slice(margin, n - margin) for n in shape)


def inverse_consistency_inside(transform, shape, margin: int) -> tuple[float, float]:
    """Mean and max of ``|phi_inv(phi(x)) - x|`` over the voxels ``margin`` inside the border."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    pts = grid[inner(shape, margin)].reshape(-1, len(shape))
    back = transform.inverse().map_points(transform.map_points(pts))
    err = np.linalg.norm(back - pts, axis=1)
    return float(err.mean()), float(err.max())


def run_tool(label, fn, case) -> tuple[dict, object]:
    (est, extra), wall, cpu, mib = NA.timed(fn, case["fixed"], case["moving"])
    row = dict(case=case["name"], tool=label, seconds=wall, cpu_seconds=cpu, peak_mib=mib)
    row["folds_pct"] = 100.0 * float((jacobian_determinant(est) <= 0).mean())
    return row, (est, extra)


def neural_gate(label: str, extra) -> dict | None:
    """NePhi on volumes (session 33): the coarse map's displacement RMS and whether the neural stage ran."""
    return extra.metrics.get("neural_3d_gate") if label.startswith("NePhi") else None


def gate_text(gate: dict | None) -> str:
    if not gate:
        return ""
    blur = f" blur {gate['excess_blur']:.3f}" if "excess_blur" in gate else ""
    return f"  neural gate RMS {gate['rms']:.3f}{blur} ({'ran' if gate['ran'] else 'skipped'})"


def finer_gate(label: str, extra) -> dict | None:
    """NePhi's opt-in ``coarse_finer_gate`` (session 43): the RMS of det J - 1 of the map before the coarse
    stage's finer-knot level and whether that level ran (None: no gate)."""
    m = extra.metrics if label.startswith("NePhi") else {}
    return (
        None
        if "coarse_finer_detj_rms" not in m
        else dict(rms=m["coarse_finer_detj_rms"], kept=m["coarse_finer_kept"])
    )


def finer_text(gate: dict | None) -> str:
    return "" if not gate else f"  finer gate {gate['rms']:.4f} ({'ran' if gate['kept'] else 'skipped'})"


def warm_up() -> None:
    """One small NePhi registration (``--warmup``): the camera at 64 x 64 against itself shifted by a pixel."""
    from skimage import data
    from skimage.transform import resize

    import napari_nephi

    img = resize(NA._unit(data.camera()), (64, 64), anti_aliasing=True).astype(np.float32)
    napari_nephi.register(img, np.roll(img, 1, axis=1), method="nephi", device="cpu", coarse_iterations=2)


def arm_order(runs: list, n_nephi: int, index: int, alternate: bool) -> list:
    """The tools of case ``index`` (0-based over the run) in the order they run: NePhi's ``n_nephi`` arms first,
    reversed on odd cases with ``alternate`` (``--alternate-arms``, session 42: so no arm always runs first in a
    case; the process's warm-up itself is ``--warmup``'s), then the peers as given."""
    arms, peers = runs[:n_nephi], runs[n_nephi:]
    return (arms[::-1] if alternate and index % 2 else arms) + peers


def epe(est, truth, where) -> float:
    if not where.any():
        return float("nan")
    return float(np.sqrt(((est - truth) ** 2).sum(0))[where].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", nargs="*", default=["camera", "retina", "ihc", "disc"])
    p.add_argument("--amplitudes", nargs="*", type=float, default=[1, 2, 4])
    p.add_argument("--mri-amplitudes", nargs="*", type=float, default=[2, 4, 6])
    p.add_argument("--tools", nargs="*", default=["elastix", "elastix-ncc", "ants"])
    p.add_argument("--nephi", action="append", help="preset, or 'label:key=value,...' (repeatable)")
    p.add_argument("--size2d", type=int, default=512)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--no-global", action="store_true")
    p.add_argument(
        "--global-images", nargs="*", default=["camera"], help="images of the shift/rotation cases"
    )
    p.add_argument(
        "--global-orders", nargs="*", type=parse_order, default=[1], help="1, 3 or area (fair pair)"
    )
    p.add_argument(
        "--global-degrees", nargs="*", type=float, default=[5.0], help="rotations of the global cases"
    )
    p.add_argument(
        "--global-degrees-3d",
        nargs="*",
        type=float,
        default=[4.0],
        help="rotations of the MRI's global cases",
    )
    p.add_argument(
        "--deformation-orders",
        nargs="*",
        type=parse_order,
        choices=[1, "area"],
        default=[1],
        help="deformation cases: 1 (moving image resampled linearly) or area (fair pair)",
    )
    p.add_argument("--global-rigid-seed", type=int, nargs="*", default=[], help="seeds of random rigid maps")
    p.add_argument("--global-rigid-count", type=int, default=6, help="random rigid maps per seed and image")
    p.add_argument("--no-global-fixed", action="store_true", help="only the random rigid maps")
    p.add_argument("--noise", type=float, default=0.0, help="noise added to both images (0: none)")
    p.add_argument("--noise-kind", choices=["gaussian", "poisson"], default="gaussian")
    p.add_argument("--threads", type=int, default=1, help="threads for torch, elastix and ANTs")
    p.add_argument(
        "--neural-3d-gate",
        type=float,
        default=None,
        help="volumes: run NePhi's neural stage only after a coarse map of at least this RMS (voxels; opt-in)",
    )
    p.add_argument(
        "--neural-3d-gate-blur",
        type=float,
        default=None,
        help="with --neural-3d-gate: skip the neural stage under it only where the moving image is blurrier than "
        "the fixed one by more than this (voxel^2 per axis; engine.NEURAL_3D_GATE_BLUR, opt-in)",
    )
    p.add_argument(
        "--warp-blur-3d",
        choices=["on", "all"],
        help="volumes: match the coarse stage's trilinear warp smoothing (coarse.WARP_BLUR_3D True / 'all', "
        "overriding the fast preset's 'all' on volumes up to engine.VOLUME_DEFAULT_MAX_VOXELS since session 37)",
    )
    p.add_argument(
        "--coarse-reg-weight-3d",
        type=parse_weight,
        default=None,
        help="volumes: the coarse stage's default bending weight (engine.COARSE_REG_WEIGHT_3D; the fast preset's "
        "is 0.03 on volumes up to engine.VOLUME_DEFAULT_MAX_VOXELS in optimize mode since session 37)",
    )
    p.add_argument("--warmup", action="store_true", help="one small NePhi call before the first case")
    p.add_argument(
        "--alternate-arms",
        action="store_true",
        help="run NePhi's arms in reverse order on every second case (default: the order given, as before)",
    )
    p.add_argument("--json")
    args = p.parse_args()
    if args.coarse_reg_weight_3d is not None:
        from napari_nephi.engines.nephi import engine as nephi_engine

        nephi_engine.COARSE_REG_WEIGHT_3D = args.coarse_reg_weight_3d
    if args.warp_blur_3d:
        from napari_nephi.engines.nephi import coarse as nephi_coarse

        nephi_coarse.WARP_BLUR_3D = True if args.warp_blur_3d == "on" else "all"
    if args.neural_3d_gate is not None:
        from napari_nephi.engines.nephi import engine as nephi_engine

        nephi_engine.NEURAL_3D_GATE_RMS = args.neural_3d_gate
        nephi_engine.NEURAL_3D_GATE_BLUR = args.neural_3d_gate_blur
    elif args.neural_3d_gate_blur is not None:
        p.error("--neural-3d-gate-blur acts only with --neural-3d-gate")
    if args.quick:
        args.images, args.amplitudes, args.mri_amplitudes, args.size2d = ["camera", "disc"], [2, 4], [4], 256
    torch.set_num_threads(NA.THREADS)
    specs = [NA.parse_nephi(s) for s in (args.nephi or ["fast"])]
    print(
        f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()}",
        f"\n{' '.join(sys.argv)}",
    )
    # the run's engine switches, recorded in NePhi's JSON rows (review 1 of session 36, B4)
    switches = dict(warp_blur_3d=args.warp_blur_3d, coarse_reg_weight_3d=args.coarse_reg_weight_3d)
    runs = [(lbl, lambda f, m, o=o: NA.run_nephi(f, m, **o)) for lbl, o in specs]
    runs += [NA.TOOLS[t] for t in args.tools]
    rows = []
    if args.warmup:
        warm_up()
    plan = [(n, a, o) for n in args.images for a in args.amplitudes for o in args.deformation_orders]
    plan += [("mri", a, o) for a in args.mri_amplitudes for o in args.deformation_orders]
    for index, (name, amp, order) in enumerate(plan):
        # the seed depends on the case only (not on which other cases run); the fair pair shares the field
        seed = args.seeds + 10 * CASE_OFFSETS[name] + int(amp)
        case = make_case(name, amp, args.size2d, seed, order)
        add_noise(case, args.noise, seed if order == 1 else [seed, 100 + AREA_FACTOR, 3000], args.noise_kind)
        mask, flat, tex, truth = case["mask"], case["flat"], case["textured"], case["truth"]
        zero = np.zeros_like(truth)
        print(
            f"\n{case['name']} {'x'.join(map(str, case['fixed'].shape))}: max {case['umax']:.1f} vox, "
            f"sigma {case['smooth']:.1f}; tissue {100 * mask.mean():.0f} %, textureless "
            f"{100 * flat.sum() / mask.sum():.0f} % of it; EPE before {epe(zero, truth, mask):.2f}",
            flush=True,
        )
        for label, fn in arm_order(runs, len(specs), index, args.alternate_arms):
            load0 = os.getloadavg()[0]
            row, (est, extra) = run_tool(label, fn, case)
            row.update(
                epe=epe(est, truth, mask),
                epe_textured=epe(est, truth, tex),
                epe_textureless=epe(est, truth, flat),
                epe_before=epe(zero, truth, mask),
                load=load0,
            )
            gate = row["neural_3d_gate"] = neural_gate(label, extra)
            row["finer_gate"] = finer_gate(label, extra)
            if label.startswith("NePhi"):
                row.update(switches)
            rows.append(row)
            print(
                f"  {label:34s} EPE {row['epe']:.3f}  textured {row['epe_textured']:.3f}  textureless "
                f"{row['epe_textureless']:.3f}  folds {row['folds_pct']:.3f}%  CPU {row['cpu_seconds']:6.1f} s  "
                f"{row['peak_mib']:5.0f} MiB  load {load0:.1f}{gate_text(gate)}{finer_text(row['finer_gate'])}",
                flush=True,
            )
    if not args.no_global:
        cases, n_resampled = [], 0
        for im in args.global_images if not args.no_global_fixed else []:
            for o in args.global_orders:
                degrees = args.global_degrees_3d if im == "mri" else args.global_degrees
                for j, c in enumerate(global_cases(args.size2d, im, o, degrees)):
                    # --noise: the linear and cubic cases by their place among them (as before the fair pairs),
                    # the fair ones by image and map: adding "area" leaves the others' noise as it was
                    if o == "area":
                        c["noise_seed"] = [CASE_OFFSETS[im], j, 100 + AREA_FACTOR, 2000]
                    else:
                        c["noise_seed"] = 1000 + n_resampled
                        n_resampled += 1
                    cases.append(c)
        cases += [
            c
            for seed in args.global_rigid_seed
            for im in args.global_images
            for o in args.global_orders
            for c in random_rigid_cases(seed, args.global_rigid_count, args.size2d, im, o)
        ]
        for index, case in enumerate(cases, start=len(plan)):
            add_noise(case, args.noise, case["noise_seed"], args.noise_kind)
            # 32 px inside the border at 512 px (scaled); 3 voxels inside the MRI (25 x 41 x 33)
            margin = round(32 * args.size2d / 512) if case["fixed"].ndim == 2 else MARGIN_3D
            sl = inner(case["fixed"].shape, margin)
            print(f"\n{case['name']} (inside {margin} px of the border)", flush=True)
            for label, fn in arm_order(runs, len(specs), index, args.alternate_arms):
                row, (est, extra) = run_tool(label, fn, case)
                det = jacobian_determinant(est)[sl]
                row.update(epe=float(np.sqrt(((est - case["truth"]) ** 2).sum(0))[sl].mean()))
                row.update(jac_min=float(det.min()), jac_max=float(det.max()))
                if label.startswith("NePhi"):
                    ic = inverse_consistency_inside(extra.transform, case["fixed"].shape, margin)
                    row.update(ic_mean=ic[0], ic_max=ic[1])
                    # the matched blur's gate ("auto"): RMS of det J - 1 of the coarser levels' map
                    # (the gate since session 19) and its displacement's spread (voxels, until then)
                    row.update(blur_gate=extra.metrics.get("coarse_blur_gate_detj_rms"))
                    row.update(blur_spread=extra.metrics.get("coarse_blur_gate_spread"))
                    # the default global stage's basin guard (session 24): judged, and which map was kept
                    row.update(initial_basin=extra.metrics.get("initial_basin"))
                    row.update(neural_3d_gate=neural_gate(label, extra), finer_gate=finer_gate(label, extra))
                    row.update(switches)
                rows.append(row)
                ic_text = (
                    f"  IC mean {row['ic_mean']:.3f} max {row['ic_max']:.3f}" if "ic_mean" in row else ""
                )
                if row.get("blur_gate") is not None:
                    ic_text += f"  blur gate det J RMS {row['blur_gate']:.4f} spread {row['blur_spread']:.3f}"
                if row.get("initial_basin"):
                    ib = row["initial_basin"]
                    ic_text += f"  basin {'judged, ' if ib['judged'] else ''}{ib['kept']} kept ({ib['difference']:.1f} px)"
                ic_text += gate_text(row.get("neural_3d_gate")) + finer_text(row.get("finer_gate"))
                print(
                    f"  {label:34s} EPE {row['epe']:.3f}  det J {row['jac_min']:.3f}..{row['jac_max']:.3f}"
                    f"{ic_text}  CPU {row['cpu_seconds']:6.1f} s",
                    flush=True,
                )

    print("\n| case | tool | EPE before | EPE | textured | textureless | folds % | CPU s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "epe_textured" in r:
            print(
                f"| {r['case']} | {r['tool']} | {r['epe_before']:.2f} | {r['epe']:.3f} | {r['epe_textured']:.3f} | "
                f"{r['epe_textureless']:.3f} | {r['folds_pct']:.2f} | {r['cpu_seconds']:.1f} | {r['peak_mib']:.0f} |"
            )
    print("\n| case | tool | EPE | det J min | det J max | IC mean | IC max | CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "jac_min" in r:
            ic = f"{r['ic_mean']:.3f} | {r['ic_max']:.3f}" if "ic_mean" in r else "- | -"
            print(
                f"| {r['case']} | {r['tool']} | {r['epe']:.3f} | {r['jac_min']:.3f} | {r['jac_max']:.3f} | {ic} | {r['cpu_seconds']:.1f} |"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
