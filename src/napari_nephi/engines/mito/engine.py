"""One section pair: keypoints and matches for overlays, and the ``method="mito"`` pair engine."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...core.errors import InputError
from ...core.metrics import similarity_report
from ...core.options import check_float, check_known
from ...core.registration import Pair, Registration
from ...core.transform import AffineTransform
from ..registry import register_engine
from . import features as ft
from .align import STACK_OPTIONS, _fit_pair, _Sections, as_stack, build_options, read_section
from .features import opencv_memory_guard
from .masks import detect_mitochondria_section, intensity_range, to_uint8


def match_pair(
    stack,
    a: int,
    b: int,
    masks=None,
    detector: str = "mito",
    descriptor: str = "brisk",
    matcher: str = "bf",
    model: str = "homography",
    ransac_threshold: float = 3.0,
    ratio: float = 0.8,
    *,
    use_masks: bool | None = None,
    max_keypoints: int = 1000,
    scale: float | None = None,
    smooth: float = 1.0,
    mask_dilation: float = 12.0,
    border: int = 6,
    min_inliers: int = 10,
    mito_radius: float | None = None,
    fast_threshold: int = 10,
    max_scale: float = 1.5,
    keypoint_size: float | None = None,
    model_selection: bool = True,
    refine: bool = True,
    **stack_options: Any,
) -> dict:
    """Keypoints, matches and fitted map between sections ``a`` and ``b`` of a stack.

    Same options as :func:`~.align.align_stack`; those that only concern a whole stack
    (``reference``, ``workers``, ``fallback`` ...) are accepted and ignored, any other name raises
    ``InputError``.
    Returns a dict with ``points_a`` / ``points_b`` (keypoints, ``(N, 2)`` ``(y, x)`` in original
    pixels of each section), ``matches`` (``(M, 2)`` indices into them), ``inliers`` (``(M,)``
    bool), ``matrix`` (3x3 ``(y, x)`` map from section ``a`` to section ``b`` coordinates, or
    None when the fit failed) and ``stats`` (keypoints, matches, inliers, reprojection error).
    """
    check_known("mito", stack_options, STACK_OPTIONS)
    stack = as_stack(stack)
    n, h, w = (int(s) for s in stack.shape)
    for k in (a, b):
        if not 0 <= int(k) < n:
            raise InputError(f"Section {k} is outside the stack of {n} sections.")
    if masks is not None:
        masks = as_stack(masks, "mask stack")
        if tuple(masks.shape) != (n, h, w):
            raise InputError(f"The masks have shape {tuple(masks.shape)} but the stack has {(n, h, w)}.")
    opts = build_options(
        (h, w), detector, descriptor, matcher, model, use_masks, ransac_threshold, ratio,
        max_keypoints, scale, smooth, mask_dilation, border, min_inliers, (), 1, mito_radius,
        fast_threshold, max_scale, keypoint_size, model_selection, masks_given=masks is not None,
        refine=refine,
    )  # fmt: skip
    intensity = (None, None)
    if np.dtype(stack.dtype) != np.uint8:
        intensity = intensity_range(read_section(stack, int(a)))
    sections = _Sections(stack, masks, opts, intensity)
    sections.prepare(int(a))
    fa, fb = sections.features(int(a)), sections.features(int(b))
    r = _fit_pair(fa, fb, opts, (h, w))
    matrix = None if r["matrix"] is None else ft.xy_to_yx(r["matrix"])
    stats = {"keypoints_a": len(fa), "keypoints_b": len(fb), **r["stats"]}
    idx, inliers = r["matches"], r["inliers"]
    return {
        "points_a": fa.points[:, ::-1].astype(np.float64),
        "points_b": fb.points[:, ::-1].astype(np.float64),
        "matches": idx,
        "inliers": inliers,
        "matrix": matrix,
        "stats": stats,
    }


@register_engine("mito", description="Keypoints in mitochondria, RANSAC (MITO); 2D EM sections")
def register_mito(
    pair: Pair,
    detector: str = "mito",
    descriptor: str = "brisk",
    matcher: str = "bf",
    model: str = "similarity",
    ransac_threshold: float = 3.0,
    ratio: float = 0.8,
    use_masks: bool | None = None,
    max_keypoints: int = 1000,
    scale: float | None = None,
    smooth: float = 1.0,
    mask_dilation: float = 12.0,
    border: int = 6,
    min_inliers: int = 10,
    mito_radius: float | None = None,
    fast_threshold: int = 10,
    max_scale: float = 1.5,
    keypoint_size: float | None = None,
    model_selection: bool = True,
    refine: bool = True,
) -> Registration:
    """Align a 2D ``moving`` image onto ``fixed`` with keypoints (the MITO pipeline on a pair).

    The map is fitted from fixed keypoints to moving keypoints, so it is the pull-back
    ``fixed -> moving`` the project uses. ``model`` is ``"rigid"``, ``"similarity"`` or
    ``"affine"`` (a 2D homography has no saved transform kind; use
    :func:`~.align.align_stack` on a two-section stack for one). Masks given to
    :func:`napari_nephi.register` restrict the keypoints of their image; an image without one is
    treated as when no masks are given (``detector="mito"`` or ``use_masks=True``: its
    mitochondria are detected automatically; otherwise its keypoints come from the whole image).
    The other options are those of :func:`~.align.align_stack`, checked the same way.
    """
    if pair.fixed.ndim != 2:
        raise InputError(
            "method='mito' registers one 2D section onto another; for a stack of sections use "
            "napari_nephi.align_stack(stack)."
        )
    if str(model).lower() == "homography":
        raise InputError(
            "model='homography' is available for stacks (napari_nephi.align_stack); for a 2D pair "
            "choose 'rigid', 'similarity' or 'affine'."
        )
    options = {
        "use_masks": use_masks, "max_keypoints": max_keypoints, "scale": scale, "smooth": smooth,
        "mask_dilation": mask_dilation, "border": border, "min_inliers": min_inliers,
        "mito_radius": mito_radius, "fast_threshold": fast_threshold, "max_scale": max_scale,
        "keypoint_size": keypoint_size, "model_selection": model_selection, "refine": refine,
    }  # fmt: skip
    pair.progress.check()
    start = time.perf_counter()
    fixed, moving = pair.fixed, pair.moving
    if fixed.shape != moving.shape:
        h, w = max(fixed.shape[0], moving.shape[0]), max(fixed.shape[1], moving.shape[1])
        fixed, moving = _pad_to(fixed, (h, w)), _pad_to(moving, (h, w))
    stack = np.stack([fixed, moving])
    lo, hi = intensity_range(stack)
    stack = np.stack([to_uint8(fixed, lo, hi), to_uint8(moving, lo, hi)])  # one range for both
    with opencv_memory_guard("mito registration"):
        masks = _pair_masks(stack, (pair.fixed_mask, pair.moving_mask), detector, use_masks, mito_radius)
        res = match_pair(
            stack, 0, 1, masks, detector=detector, descriptor=descriptor, matcher=matcher, model=model,
            ransac_threshold=ransac_threshold, ratio=ratio, **options,
        )  # fmt: skip
    pair.progress.step(1, 1, stage="keypoints matched")
    if res["matrix"] is None:
        st = res["stats"]
        raise InputError(
            f"Too few keypoint matches to align the images ({st['matches']} matches, "
            f"{st['inliers']} inliers). Try detector='sift' or 'orb' without masks, a larger "
            "ransac_threshold, or an intensity-based method such as method='affine'."
        )
    transform = AffineTransform(res["matrix"], shape=pair.fixed.shape, spacing=pair.spacing)
    warped = transform.warp(pair.moving)
    metrics: dict[str, Any] = dict(res["stats"])
    metrics.update(similarity_report(pair.fixed, pair.moving, warped, pair.fixed_mask, transform))
    metrics["seconds"] = time.perf_counter() - start
    settings = {
        "detector": detector, "descriptor": descriptor, "matcher": matcher, "model": model,
        "ransac_threshold": ransac_threshold, "ratio": ratio, **options,
    }  # fmt: skip
    return Registration(warped=warped, transform=transform, metrics=metrics, settings=settings)


def _pair_masks(stack: np.ndarray, given, detector: str, use_masks, mito_radius) -> np.ndarray | None:
    """Both sections' masks, or None when neither image has one.

    A missing mask is what the engine uses without masks: automatically detected mitochondria
    when masks are in use for ``detector="mito"`` or ``use_masks=True``, else the whole image.
    """
    if all(m is None for m in given):
        return None
    shape = stack.shape[1:]
    detect = str(detector).lower() == "mito" or use_masks is True
    out = []
    for section, mask in zip(stack, given, strict=True):
        if mask is not None:
            out.append(_pad_to(np.asarray(mask), shape).astype(np.uint8))
        elif detect:
            radius = (
                None
                if mito_radius is None
                else check_float("mito_radius", mito_radius, 0, 10**4, low_open=True)
            )
            out.append(detect_mitochondria_section(section, radius))
        else:
            out.append(np.ones(shape, np.uint8))
    return np.stack(out)


def _pad_to(img: np.ndarray, shape) -> np.ndarray:
    if img.shape == tuple(shape):
        return img
    out = np.zeros(shape, dtype=img.dtype)
    out[: img.shape[0], : img.shape[1]] = img
    return out
