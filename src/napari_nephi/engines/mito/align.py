"""MITO: align a stack of 2D EM sections with keypoints detected inside mitochondria.

Pipeline (:func:`align_stack`):

1. every section is read once (one at a time from lazy dask / TIFF-folder stacks), scaled to
   uint8, reduced to the work resolution (``scale``) and smoothed;
2. keypoints are detected (``detector``; for ``"mito"``, FAST corners restricted to the
   mitochondria masks dilated by ``mask_dilation`` px; the masks are given or detected
   automatically) and described (``descriptor``) once per section;
3. every section is matched to its neighbour toward the reference section (``matcher`` with
   Lowe's ratio test) and a ``model`` is fitted by RANSAC with a reprojection threshold of
   ``ransac_threshold`` pixels of the original section, then refined to sub-pixel accuracy
   (``refine``: a's keypoints tracked into b by Lucas-Kanade, the model refitted to them);
4. a pair that fails (too few inliers, or an implausible map: flip, scale change over 1.5x,
   strong perspective) is retried with the ``fallback`` detectors on the whole section, then
   against the section one step further toward the reference; when all fail the section gets
   the identity relative to its neighbour. Every such case is in the report;
5. pairwise maps are composed to the reference after all pairs are done.

Steps 1-4 run in ``workers`` threads (OpenCV releases the GIL) over a bounded window of
sections, so a long stack read lazily from disk never needs to fit in memory.

Convention: ``matrices[k]`` (3x3, ``(y, x)`` order, homogeneous) maps coordinates in the
aligned stack (the reference section's frame) to coordinates in original section ``k``: a
pull-back, as :class:`~napari_nephi.core.transform.PerSectionTransform` expects. OpenCV fits
``(x, y)`` maps; they are converted with :func:`.features.xy_to_yx`.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ...core.device import check_memory
from ...core.errors import DimensionMismatchError, InputError
from ...core.grid import check_spacing
from ...core.options import check_bool, check_float, check_int, check_known
from ...core.progress import CancelFlag, Progress, ProgressCallback
from ...core.registration import Registration
from ...core.transform import ElasticSectionTransform, PerSectionTransform
from . import background as bgm
from . import detrend as detrend_module
from . import features as ft
from . import organelles
from .background import background_motion, classify, second_look, sections_read, unread
from .background import runs as background_runs
from .detrend import (
    AUTO_P,
    DEFAULT_DRIFT_CORRECTION,
    DEFAULT_REFERENCE,
    MIN_TREND,
    SCREEN_P,
    check_drift_options,
    detrend,
    recentred,
    section_centres,
    trend_test,
    windows,
)
from .detrend import MIN_SECTIONS as MIN_DETREND_SECTIONS
from .distortion import DEFAULT_ELASTIC, Correlation, check_elastic, decide, pair_residual
from .distortion import LIMIT as DISTORTION_LIMIT
from .distortion import RADIUS as DISTORTION_RADIUS
from .distortion import RING as DISTORTION_RING
from .elastic import (
    ELASTIC_SOLVERS,
    elastic_fields,
    field_affine_fit,
    field_affine_matrices,
    reframed_fields,
    warp_elastic_section,
)
from .elastic import default_solver as default_elastic_solver
from .masks import detect_mitochondria_section, intensity_range, to_uint8, valid_region
from .organelles import BOTH_SLOPES, DEFAULT_READING, MIN_READINGS, READINGS, relative_motion
from .solve import DRIFT_PRIOR, GLOBAL_MODEL, Edge, check_global_options, solve_global

#: Native descriptor of each detector when it is used as a fallback.
FALLBACK_DESCRIPTOR = {"sift": "sift", "orb": "orb", "brisk": "brisk", "fast": "brisk"}

#: Session 44 (opt-in ``track_shift``): the values besides None. ``"stack"``: the placement moved by one
#: velocity for the stack; ``"decision"``: that placement read by the drift decision only
#: (:func:`_decided_on_shifted`).
TRACK_SHIFTS = ("stack", "decision")
#: Refined tracks inside the mitochondria (both ends) a neighbour pair needs for its reading (session 43's).
TRACK_SHIFT_MIN_TRACKS = 8
#: Neighbour pairs with a reading the stack needs before ``track_shift`` moves anything (as the background's).
TRACK_SHIFT_MIN_PAIRS = 16
#: Session 45 (opt-in ``kept_reading``): the values besides None. ``"local"``: where the background's reading
#: keeps the trend ("sections") on undistorted sections, the mitochondria are read against the tissue right
#: around them (:func:`.organelles.relative_motion`, as under the elastic step) and only that reading's
#: "both" removes its slope (:func:`_kept_read_locally`).
KEPT_READINGS = ("local", "local-tracks")
#: Session 46: how each :data:`KEPT_READINGS` value reads (keyword arguments of the local reader,
#: :func:`.organelles.relative_motion`). ``"local-tracks"``: the sections' borders left out by
#: :data:`.organelles.MARGIN` (12 px, as the background leaves them; 4 before: on the truth placement a tissue
#: tile on a section's border reads 1-1.5 px outward, pair after pair) and the se the larger of the blocks'
#: and the tracks' (each mitochondrion followed through depth is one sample). ``"local"``: as in session 45
#: (docs/mito.md, session 46).
KEPT_READ_AS = {
    "local": {},
    "local-tracks": {"tracks": True, "border": organelles.MARGIN},
}


# -- inputs ---------------------------------------------------------------------------------------
def _read_path(path, what: str):
    from ...io import read_image

    data, meta, _ = read_image(path)[0]
    if meta.get("multiscale"):
        data = data[0]
    if meta.get("rgb"):
        raise InputError(f"The {what} {path} is RGB; EM sections must be grayscale (one channel).")
    return data, meta


def as_stack(stack, what: str = "stack"):
    """A ``(n, y, x)`` array-like (numpy, dask, zarr ...) from an array, a list or a path."""
    if stack is None:
        raise InputError(f"No {what} given.")
    if isinstance(stack, (str, Path)):
        stack, _ = _read_path(stack, what)
    elif isinstance(stack, (list, tuple)):
        if not stack:
            raise InputError(f"The {what} is empty: pass at least one section.")
        stack = np.stack([np.asarray(s) for s in stack])
    elif not (hasattr(stack, "shape") and hasattr(stack, "dtype") and hasattr(stack, "__getitem__")):
        stack = np.asarray(stack)
    shape = tuple(int(s) for s in stack.shape)
    dtype = np.dtype(stack.dtype)
    if dtype.kind not in "biuf":
        raise InputError(f"The {what} must be numeric, got dtype {dtype}.")
    if len(shape) == 2:
        raise InputError(
            f"The {what} is a single 2D image {shape}; align_stack needs a stack of sections "
            "(n, y, x). To align one image onto another use "
            "napari_nephi.register(fixed, moving, method='mito')."
        )
    if len(shape) != 3:
        raise InputError(
            f"The {what} must be 3D (sections, y, x), got {len(shape)}D shape {shape}. "
            "For RGB sections convert them to grayscale first."
        )
    if min(shape) == 0:
        raise InputError(f"The {what} is empty (shape {shape}): it needs sections with pixels.")
    if min(shape[1:]) < 16:
        raise InputError(f"Sections of {shape[1:]} pixels are too small to align; 16 x 16 is the minimum.")
    return stack


def read_section(stack, k: int) -> np.ndarray:
    """Section ``k`` as numpy; dask arrays are computed in the calling thread only."""
    a = stack[int(k)]
    if hasattr(a, "compute"):
        a = a.compute(scheduler="synchronous")
    return np.asarray(a)


def _auto_scale(shape) -> float:
    side = max(shape)
    return 1.0 / 2 ** max(0, math.ceil(math.log2(side / 1024))) if side > 1024 else 1.0


# -- options --------------------------------------------------------------------------------------
@dataclass
class _Options:
    detector: str
    descriptor: str
    matcher: str
    model: str
    use_masks: bool
    ransac_threshold: float
    ratio: float
    max_keypoints: int
    scale: float
    smooth: float
    mask_dilation: float
    border: int
    min_inliers: int
    fallback: tuple
    max_skip: int
    mito_radius: float | None
    fast_threshold: int
    max_scale: float
    keypoint_size: float | None = None  # original pixels; None: from the mitochondria size
    model_selection: bool = True
    refine: bool = True
    # session 43: the dilation (original px) of the background reading's masks; None: mask_dilation's
    background_mask_dilation: float | None = None
    # session 44: the placement moved along the mitochondria's own tracks (None: off; "stack")
    track_shift: str | None = None

    @property
    def background_dilation(self) -> float:
        """The dilation of the background reading's masks (original px): ``background_mask_dilation``, or
        ``mask_dilation`` where that is None."""
        return self.mask_dilation if self.background_mask_dilation is None else self.background_mask_dilation


@dataclass
class _PairResult:
    section: int
    source: int  # the section the map comes from (toward the reference)
    matrix: np.ndarray  # (y, x) map from section `source` coordinates to section `section` coordinates
    row: dict
    residual: Any = None  # the refined tracks' residuals where `source` is a neighbour (.distortion)
    # session 44 (track_shift): the mean (x, y) residual of the refined tracks inside the mitochondria
    track_reading: Any = None


class _Sections:
    """Per-section preprocessing and cached features, shared by the worker threads."""

    def __init__(self, stack, masks, opts: _Options, intensity):
        self.stack, self.masks, self.opts, self.intensity = stack, masks, opts, intensity
        self._fallback: dict[tuple[str, int], ft.Features] = {}
        self._lock = threading.Lock()
        self.mask_fraction: dict[int, float] = {}
        # the background's masks (the keypoint masks, or dilated by background_mask_dilation) of the sections
        # the background will read (drift_correction="auto"), kept packed at the working scale
        # (:meth:`background_mask`)
        self.keep_masks: set[int] = set()
        self._kept: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
        self.blank: dict[int, str] = {}  # sections without content: "constant (v)" or "all NaN"
        self.keypoint_size = 31.0  # work pixels; set by prepare()
        self.mito_radius = None  # estimated, work pixels
        h, w = (int(v) for v in stack.shape[1:])
        self.work_shape = (max(1, int(round(h * opts.scale))), max(1, int(round(w * opts.scale))))
        # exact (x, y) work / original ratios: round() makes them differ slightly from `scale`
        self.work_ratio = np.array([self.work_shape[1] / w, self.work_shape[0] / h])

    def prepare(self, ref: int) -> None:
        """Fix the keypoint support (work pixels) from the reference section's mitochondria."""
        o = self.opts
        if o.keypoint_size is not None:
            self.keypoint_size = max(4.0, o.keypoint_size * o.scale)
            return
        if o.detector not in ("mito", "fast") and "fast" not in o.fallback:
            return
        work, _, valid = self.work_image(ref)
        mask = self._raw_mask(ref, work) & valid
        r = mean_radius(mask)
        if r is not None:
            self.mito_radius = r
            self.keypoint_size = float(np.clip(2.5 * r, 8.0, 96.0))

    def work_image(self, k: int):
        """``(raw uint8 section, smoothed work image, valid region at work scale)``."""
        section = read_section(self.stack, k)
        why = blank_reason(section)
        if why is not None:
            with self._lock:
                self.blank[k] = why
        raw = to_uint8(section, *self.intensity)
        work = raw
        if self.work_shape != raw.shape:
            work = cv2.resize(raw, self.work_shape[::-1], interpolation=cv2.INTER_AREA)
        valid = valid_region(work, self.opts.border)
        smooth = work
        if self.opts.smooth > 0:
            smooth = cv2.GaussianBlur(work, (0, 0), self.opts.smooth)
        return work, smooth, valid

    def _raw_mask(self, k: int, work: np.ndarray) -> np.ndarray:
        """Mitochondria of section ``k`` at work scale (given or detected), uint8 0/1."""
        o = self.opts
        if self.masks is not None:
            m = read_section(self.masks, k)
            if m.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
                m = (m > 0).astype(np.uint8)
            if m.shape != work.shape:
                m = cv2.resize(m, (work.shape[1], work.shape[0]), interpolation=cv2.INTER_NEAREST)
            return (m > 0).view(np.uint8)
        radius = None if o.mito_radius is None else o.mito_radius * o.scale
        return detect_mitochondria_section(work, radius)

    def _dilated(self, raw: np.ndarray, dilation: float, valid: np.ndarray) -> np.ndarray:
        """``raw`` (work scale, 0/1) dilated by ``dilation`` original px (a disc of its work-pixel radius),
        within ``valid``."""
        r = int(round(dilation * self.opts.scale))
        m = raw
        if r > 0 and m.any():
            m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        return m & valid

    def keypoint_mask(self, k: int, work: np.ndarray, valid: np.ndarray) -> np.ndarray:
        o = self.opts
        raw = self._raw_mask(k, work)
        self.mask_fraction[k] = float(raw.mean())
        m = self._dilated(raw, o.mask_dilation, valid)
        if k in self.keep_masks:
            b = m  # the background reads the keypoint masks, or (session 43) its own dilation of the same
            if o.background_dilation != o.mask_dilation:
                b = self._dilated(raw, o.background_dilation, valid)
            with self._lock:
                self._kept[k] = (np.packbits(b), b.shape)
        return m

    def release_masks(self) -> None:
        """Drop the kept masks (:attr:`keep_masks`) that the background did not read."""
        with self._lock:
            self.keep_masks = set()
            self._kept.clear()

    def background_mask(self, k: int, dilation: float | None = None) -> np.ndarray:
        """Section ``k``'s region the background reading leaves out, at the working scale (0/1): the
        mitochondria dilated by ``dilation`` original px (None: the run's ``background_mask_dilation``, by
        default the keypoint masks' ``mask_dilation``), as the keypoint stage kept it (:attr:`keep_masks`),
        else made again. A ``dilation`` other than the run's is always made again (and drops the kept one)."""
        o = self.opts
        with self._lock:
            kept = self._kept.pop(k, None)
        own = dilation is None or dilation == o.background_dilation
        if kept is not None and own:
            packed, shape = kept
            return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape)
        work, _, valid = self.work_image(k)
        if own and o.background_dilation == o.mask_dilation:
            m = self.keypoint_mask(k, work, valid)  # as before session 43
        else:
            m = self._dilated(self._raw_mask(k, work), o.background_dilation if own else dilation, valid)
        with self._lock:
            self._kept.pop(k, None)
        return m

    def inside(self, k: int, pts: np.ndarray) -> np.ndarray:
        """Whether the (x, y) points ``pts`` (original px) of section ``k`` lie inside its mitochondria (the
        given masks at full size, else those detected at work scale; not dilated)."""
        if self.masks is not None:
            m = read_section(self.masks, k) > 0
        else:
            m = self._raw_mask(k, self.work_image(k)[0]) > 0
            pts = np.asarray(pts, np.float64) * self.work_ratio
        x = np.clip(np.round(pts[:, 0]).astype(int), 0, m.shape[1] - 1)
        y = np.clip(np.round(pts[:, 1]).astype(int), 0, m.shape[0] - 1)
        return m[y, x]

    def track_reading(self, j: int, k: int, src, dst, matrix_xy) -> np.ndarray | None:
        """Session 44 (``track_shift``): the mean residual ``dst - map(src)`` ((x, y), section ``k``'s px) of
        the refined tracks ``src`` (section ``j``) -> ``dst`` (section ``k``) whose both ends lie inside the
        mitochondria: where they went against the map fitted to all tracks (the ring of still tissue
        included). None with fewer than :data:`TRACK_SHIFT_MIN_TRACKS` such tracks."""
        src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
        if len(src) < TRACK_SHIFT_MIN_TRACKS:
            return None
        ins = self.inside(j, src) & self.inside(k, dst)
        if int(ins.sum()) < TRACK_SHIFT_MIN_TRACKS:
            return None
        return np.mean(dst[ins] - ft.project(matrix_xy, src[ins]), axis=0)

    def region(self, k: int) -> np.ndarray:
        """Section ``k``'s keypoint region (:meth:`keypoint_mask`) at the section's own size, 0/1."""
        work, _, valid = self.work_image(k)
        m = self.keypoint_mask(k, work, valid)
        h, w = (int(v) for v in self.stack.shape[1:])
        return m if m.shape == (h, w) else cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)

    def features(self, k: int) -> ft.Features:
        o = self.opts
        work, smooth, valid = self.work_image(k)
        mask = self.keypoint_mask(k, work, valid) if o.use_masks else valid
        f = ft.features(
            smooth, o.detector, o.descriptor, mask, o.max_keypoints, self.work_ratio, o.fast_threshold,
            self.keypoint_size,
        )  # fmt: skip
        return self._keep_image(f, smooth, valid)

    def _keep_image(self, f: ft.Features, smooth: np.ndarray, valid: np.ndarray) -> ft.Features:
        """Attach the work image for the sub-pixel refinement (:func:`.features.refine`)."""
        if self.opts.refine:
            f.image, f.valid, f.scale = smooth, valid, self.work_ratio
        return f

    def fallback_features(self, detector: str, k: int) -> ft.Features:
        key = (detector, k)
        with self._lock:
            if key in self._fallback:
                return self._fallback[key]
        o = self.opts
        _, smooth, valid = self.work_image(k)
        desc = FALLBACK_DESCRIPTOR.get(detector, o.descriptor)
        f = ft.features(
            smooth, detector, desc, valid, o.max_keypoints, self.work_ratio, o.fast_threshold,
            self.keypoint_size,
        )  # fmt: skip
        f = self._keep_image(f, smooth, valid)
        with self._lock:
            self._fallback[key] = f
            if len(self._fallback) > 16:  # a few pairs' worth; fallbacks are rare
                self._fallback.pop(next(iter(self._fallback)))
        return f


def blank_reason(section: np.ndarray) -> str | None:
    """Why a section has nothing to align (``"all NaN"``, ``"all NaN or infinite"``,
    ``"constant (v)"``), or None."""
    a = np.asarray(section)
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.any():
            return "all NaN" if np.isnan(a).all() else "all NaN or infinite"
        if not finite.all():
            a = a[finite]
    lo, hi = a.min(), a.max()
    return f"constant ({lo:g})" if lo == hi else None


def _check_reference(stack, ref: int, reference, why: str | None) -> None:
    """Raise ``InputError`` when the reference section (``why``: blank, see :func:`blank_reason`)
    or the whole stack has no content."""
    if why is None:
        return
    n = int(stack.shape[0])
    for k in range(n):
        if k != ref and blank_reason(read_section(stack, k)) is None:
            raise InputError(
                f"The reference section {ref} is {why}: there is nothing to align the others to. "
                f"Choose a section with content as the reference (e.g. reference={k}); "
                f"reference={reference!r} was given."
            )
    raise InputError(
        f"Every section of the stack is constant or all NaN (section {ref}: {why}): there is nothing "
        "to align. Check that the right layer or file was given and that it was read correctly."
    )


def mean_radius(mask: np.ndarray) -> float | None:
    """Mean half-width of the objects of a binary mask, ``2 * area / perimeter`` (None if empty)."""
    m = (np.asarray(mask) > 0).astype(np.uint8)
    area = float(m.sum())
    if area < 4:
        return None
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    return 2.0 * area / perimeter if perimeter > 0 else None


def _fit_pair(fa: ft.Features, fb: ft.Features, o: _Options, shape) -> dict:
    """Match section a to b and fit the map a -> b.

    With ``o.model_selection`` the simpler nested models (homography > affine > similarity >
    rigid) are fitted too, and the simplest one that keeps at least 90 % of the largest
    inlier count is used: extra degrees of freedom must explain clearly more matches, else
    they only fit noise (and extrapolate badly far from the keypoints). With ``o.refine`` an
    accepted map is then refined on sub-pixel tracks (:func:`_refine`), which choose the model
    again.

    Returns ``matrix`` ((x, y) 3x3, None unless the fit is accepted), ``fit`` (the RANSAC
    result even when rejected), ``model`` (the one used), ``matches`` (index pairs),
    ``inliers`` (bool per match) and ``stats`` (counts, mean inlier reprojection error in
    pixels, model).
    """
    idx = ft.match(fa, fb, o.matcher, o.ratio)
    stats: dict[str, Any] = {
        "matches": int(len(idx)), "inliers": 0, "reprojection_error": None, "model": o.model,
        "refined": False, "tracks": 0, "tracking_error": None,
    }  # fmt: skip
    out = {"matrix": None, "fit": None, "matches": idx, "inliers": np.zeros(len(idx), bool), "stats": stats}
    src, dst = fa.points[idx[:, 0]], fb.points[idx[:, 1]]
    models = ft.MODELS[ft.MODELS.index(o.model) :] if o.model_selection else (o.model,)
    fits = []
    for model in models:
        if len(idx) <= ft.MIN_POINTS[model]:
            continue
        m, inl = ft.fit_model(src, dst, model, o.ransac_threshold)
        if m is not None:
            fits.append((model, m, inl))
    if not fits:
        return out
    best = max(int(f[2].sum()) for f in fits)
    good = [f for f in fits if f[2].sum() >= 0.9 * best and ft.plausible(f[1], shape, o.max_scale)]
    model, m, inl = good[-1] if good else fits[0]
    out["fit"], out["inliers"] = m, inl
    n_in = int(inl.sum())
    stats.update(inliers=n_in, model=model)
    if n_in:
        err = np.linalg.norm(ft.project(m, src[inl]) - dst[inl], axis=1)
        stats["reprojection_error"] = float(err.mean())
    if n_in >= o.min_inliers and ft.plausible(m, shape, o.max_scale):
        out["matrix"] = m
        if o.refine:
            _refine(out, fa, fb, src[inl], dst[inl], model, o, shape)
    return out


def _refine(out: dict, fa: ft.Features, fb: ft.Features, src, dst, model: str, o: _Options, shape):
    """Replace the accepted RANSAC map by its sub-pixel refinement when that one is sound.

    With ``model_selection`` the model is chosen again on the tracks (:func:`.features.refine`),
    among ``model`` and the simpler ones. Sound: plausible, and a solution of the matches
    themselves: at least half of the RANSAC inliers (``src`` -> ``dst``) within
    ``ransac_threshold`` of it, so the refinement polishes the fit but never moves it to another
    solution.
    """
    m = out["matrix"]
    models = ft.MODELS[ft.MODELS.index(o.model) :] if o.model_selection else (model,)
    kept: list = []
    chosen, refined, tracks, err = ft.refine(
        fa, fb, m, models, o.ransac_threshold, o.min_inliers, residuals=kept
    )
    stats = out["stats"]
    stats.update(refined=False, tracks=int(tracks), tracking_error=None)
    if refined is None or not ft.plausible(refined, shape, o.max_scale):
        return
    agree = np.linalg.norm(ft.project(refined, src) - dst, axis=1) <= o.ransac_threshold
    if agree.sum() < max(o.min_inliers, 0.5 * len(src)):
        return
    out["matrix"] = refined
    out["residual"] = kept[0] if kept else None
    stats.update(refined=True, tracking_error=err, model=chosen)


def _estimate(fa: ft.Features, fb: ft.Features, o: _Options, shape):
    """``(accepted (x, y) matrix or None, stats)`` of the map from section a to section b."""
    r = _fit_pair(fa, fb, o, shape)
    return r["matrix"], r["stats"]


def _pair_job(sections: _Sections, futs: dict, k: int, chain: list[int], shape) -> _PairResult:
    """Align section ``k`` to ``chain[0]`` (its neighbour toward the reference), with fallbacks."""
    o = sections.opts
    fk = futs[k].result()
    label = f"{o.detector}+{o.descriptor}"
    row: dict[str, Any] = {
        "section": k,
        "neighbour": chain[0],
        "keypoints": len(fk),
        "matches": 0,
        "inliers": 0,
        "reprojection_error": None,
        "failed": False,
        "fallback": "",
        "method": label,
        "model": o.model,
        "refined": False,
        "tracks": 0,
        "tracking_error": None,
    }
    tried: list[str] = []
    blank = sections.blank.get(k)
    if blank is not None:  # nothing to match: the neighbour's map, reported
        row.update(failed=True, fallback="identity", method="identity", model="identity", blank=blank)
        row["tried"] = [f"section {k} is {blank}: nothing to match"]
        return _PairResult(k, chain[0], np.eye(3), row)
    for step, j in enumerate(chain):
        fj = futs[j].result()
        if j in sections.blank:
            tried.append(f"{j} is {sections.blank[j]}")
            row["failed"] = True
            continue
        fit = _fit_pair(fj, fk, o, shape)
        m, stats = fit["matrix"], fit["stats"]
        if step == 0:
            row.update(stats)
        if m is not None:
            if step:
                row.update(stats, fallback=f"skip to {j}", neighbour=j, tried=list(tried))
            residual = None if step or fit.get("residual") is None else pair_residual(j, k, *fit["residual"])
            reading = None  # session 44: the neighbour pair's mitochondria against its map
            if o.track_shift is not None and not step and fit.get("residual") is not None:
                reading = sections.track_reading(j, k, fit["residual"][0], fit["residual"][1], m)
            return _PairResult(k, j, ft.xy_to_yx(m), row, residual, reading)
        row["failed"] = True
        tried.append(f"{label} vs {j}")
        for det in o.fallback:
            if det == "identity":
                break
            fa, fb = sections.fallback_features(det, j), sections.fallback_features(det, k)
            m, stats = _estimate(fa, fb, o, shape)
            tried.append(f"{det} vs {j}")
            if m is not None:
                name = f"{det}+{FALLBACK_DESCRIPTOR.get(det, o.descriptor)}"
                how = name if not step else f"{name}, skip to {j}"
                row.update(stats, fallback=how, neighbour=j, method=name, tried=list(tried))
                return _PairResult(k, j, ft.xy_to_yx(m), row)
    row.update(
        fallback="identity", method="identity", model="identity", neighbour=chain[0], tried=tried,
        refined=False, tracks=0, tracking_error=None,
    )  # fmt: skip
    return _PairResult(k, chain[0], np.eye(3), row)


def _extra_pair_job(
    sections: _Sections, fut_j: Future, fut_k: Future, j: int, k: int, shape, chain: dict | None = None,
    guided_pairs: bool = True,
) -> Edge | None:  # fmt: skip
    """Match section ``k`` to a further section ``j`` (global solve); no fallbacks.

    Guided first: when ``chain`` (section -> future of its :func:`_pair_job`) links ``k`` back to
    ``j`` by real matches, their composition is the starting map, and ``j``'s keypoints are only
    tracked into ``k`` and the map refitted (:func:`.features.refine`); the refit is kept only
    when descriptor matches near it confirm it (:func:`_confirmed`), which skips most of the
    matching. Otherwise, or when that fails, the pair is matched like a neighbour pair.
    The edge's ``weight`` is 0 when the pair failed; ``stats`` goes to the report. None when
    the chain's own pair of ``k`` already is ``j -> k`` (it skipped to ``j``): the same
    evidence must not count twice."""
    if chain is not None and k in chain:
        own = chain[k].result()
        if own.source == j and own.row["fallback"] != "identity":
            return None
    fj, fk = fut_j.result(), fut_k.result()
    o = sections.opts
    m, stats, guided = None, {"inliers": 0, "reprojection_error": None}, False
    if j not in sections.blank and k not in sections.blank:
        prior = _composed(chain, j, k) if chain is not None and o.refine and guided_pairs else None
        if prior is not None:
            models = ft.MODELS[ft.MODELS.index(o.model) :] if o.model_selection else (o.model,)
            chosen, refined, tracks, err = ft.refine(
                fj, fk, ft.yx_to_xy(prior), models, o.ransac_threshold, o.min_inliers
            )
            if refined is not None and ft.plausible(refined, shape, o.max_scale):
                if _confirmed(fj, fk, refined, chosen, abs(k - j), o):
                    m, guided = refined, True
                    stats = {"inliers": tracks, "reprojection_error": err}
        if m is None:
            m, stats = _estimate(fj, fk, o, shape)
    edge = Edge(j, k, np.eye(3) if m is None else ft.xy_to_yx(m), 0.0 if m is None else 1.0)
    edge.stats = {
        "neighbour": j,
        "inliers": int(stats["inliers"]),
        "reprojection_error": stats["reprojection_error"],
        "guided": guided,
    }
    return edge


def _confirmed(
    fj: ft.Features, fk: ft.Features, guided: np.ndarray, model: str, gap: int, o: _Options
) -> bool:
    """Whether the guided map ``guided`` ((x, y), j -> k, of ``model``) is confirmed by the descriptors.

    The tracks of a guided refit end within ``ransac_threshold`` of the chain's map, so they repeat
    a larger chain error instead of showing it. The check: descriptor matches among the keypoints
    of k within ``(4 + gap) * ransac_threshold`` of the guided prediction (generous: each of the
    ``gap`` chained pairs may be off by about the threshold, and a wrong chain several times that
    still leaves the true matches inside), and a RANSAC fit of ``model`` to them, the best
    independent solution; the guided map must explain at least half as many of the matches
    within ``ransac_threshold`` (and ``min_inliers``), as :func:`_refine` asks of a refinement.
    Shortcuts: no RANSAC when the guided map explains half of all matches (no fit has more
    inliers than there are matches; this keeps the rule exactly); for a homography an affine RANSAC
    first, which can only refuse more maps than the homography fit alone would (under
    1 ms, where a homography one takes 10-30 ms on the low-inlier matches near a distorted
    section): a map with fewer than half its inliers is refused without the homography fit, one
    that passes must also pass the homography's count; and each RANSAC draws only the samples that
    find a model with more than twice the guided map's inliers at RANSAC's confidence (0.999).
    """
    idx = ft.match_near(fj, fk, guided, (4.0 + gap) * o.ransac_threshold, o.ratio)
    if len(idx) <= max(ft.MIN_POINTS[model], o.min_inliers - 1):
        return False
    src, dst = fj.points[idx[:, 0]].astype(np.float64), fk.points[idx[:, 1]].astype(np.float64)
    agree = int((np.linalg.norm(ft.project(guided, src) - dst, axis=1) <= o.ransac_threshold).sum())
    if agree < o.min_inliers:
        return False
    if agree >= 0.5 * len(idx):  # no fit can have more inliers than there are matches: RANSAC not needed
        return True
    # refused when a fit finds more than 2 * agree inliers: RANSAC needs only the draws that find
    # a model of that inlier ratio with its confidence (0.999), not those for the lower best ratio
    ratio = min((2 * agree + 1) / len(idx), 1.0 - 1e-9)  # agree just under half an odd count: 1
    checks = ("affine", model) if model == "homography" else (model,)
    for check in checks:  # the cheap affine fit first: most wrong maps are refused by it alone
        draws = np.log(1 - 0.999) / np.log1p(-(ratio ** ft.MIN_POINTS[check]))
        fit, inl = ft.fit_model(
            src, dst, check, o.ransac_threshold, iterations=int(min(2000, max(20, np.ceil(draws))))
        )
        if fit is not None and agree < 0.5 * int(inl.sum()):
            return False
    return True


def _composed(chain: dict, j: int, k: int) -> np.ndarray | None:
    """The (y, x) map from section ``j`` to section ``k`` composed from the neighbour pairs of the
    chain between them, or None when one of them is missing, an identity fallback or skips past ``j``."""
    m, s = np.eye(3), k
    while s != j:
        fut = chain.get(s)
        if fut is None:
            return None
        res = fut.result()
        if res.row["fallback"] == "identity" or (res.source - j) * (s - j) < 0:
            return None
        m = m @ res.matrix
        s = res.source
    return _normalise(m)


def _aligned_step(res: _PairResult, placed: np.ndarray) -> np.ndarray:
    """Session 44: a neighbour pair's :meth:`_Sections.track_reading` (section ``res.section``'s (x, y) px)
    as the mitochondria's motion per section in the aligned frame, (x, y): turned back by the linear part of
    the section's chained placement ``placed`` ((y, x), aligned -> section; sections may be turned by any
    angle) and divided by the pair's step (``section - source``, +-1)."""
    lin = placed[:2, :2] / placed[2, 2]
    d_yx = np.linalg.solve(lin, np.asarray(res.track_reading, np.float64)[::-1])
    return d_yx[::-1] / float(res.section - res.source)


def _track_velocity(readings, option: str) -> tuple[np.ndarray | None, dict]:
    """Session 44: the stack's velocity ``v`` ((y, x) px per section, aligned frame; None with fewer than
    :data:`TRACK_SHIFT_MIN_PAIRS` readings) from the neighbour pairs' readings (:func:`_aligned_step`), the
    median per axis, and the record for ``metrics["track_shift"]`` (see :func:`_track_shifted`)."""
    info: dict[str, Any] = {
        "option": option, "pairs_read": len(readings), "min_pairs": TRACK_SHIFT_MIN_PAIRS,
        "min_tracks": TRACK_SHIFT_MIN_TRACKS, "applied": False, "velocity": None,
    }  # fmt: skip
    if len(readings) < TRACK_SHIFT_MIN_PAIRS:
        info["note"] = (
            f"track_shift: {len(readings)} neighbour pairs had {TRACK_SHIFT_MIN_TRACKS} tracks inside the "
            f"mitochondria, {TRACK_SHIFT_MIN_PAIRS} needed; the placement was not moved."
        )
        return None, info
    r = np.asarray(readings, np.float64)
    v = np.median(r, axis=0)[::-1]
    mad = np.median(np.abs(r - np.median(r, axis=0)), axis=0)[::-1]
    info.update(velocity=[float(x) for x in v], reading_mad=[float(x) for x in mad])
    return v, info


def _line(steps: float, v: np.ndarray) -> np.ndarray:
    """The homogeneous (y, x) translation by ``steps * v``."""
    t = np.eye(3)
    t[:2, 2] = steps * v
    return t


def _track_shifted(matrices, chain_edges, extra_edges, readings, ref: int) -> tuple[np.ndarray, dict]:
    """Session 44 (``track_shift="stack"``, opt-in): every pair map and the chained placement moved along the
    mitochondria's own tracks by one velocity for the whole stack.

    ``readings``: the neighbour pairs' :meth:`_Sections.track_reading` in the aligned frame, per section
    (:func:`_aligned_step`), (x, y). Their median per axis ``v`` ((y, x) here) moves the placement of section
    ``k`` by ``(k - ref) v`` in the aligned frame (``matrices[k] @ T((k - ref) v)``) and every edge ``a -> b``
    alike (conjugated by the chained placement of ``b``): a straight line, the lag of a placement whose maps
    are fitted to the mitochondria and
    the still tissue around them together (docs/mito.md, sessions 41 and 43). One velocity, not each pair's
    own (session 43's diagnosis): each pair's reading scatters (about 0.1 px), and the placement sums the
    shifts, so every pair's own shift, or a shift averaged over a window of pairs, adds a random walk that
    only a shift shared by the whole stack leaves out. The median: a pair whose tracks caught a mitochondrion
    badly counts as one vote. Fewer than :data:`TRACK_SHIFT_MIN_PAIRS` readings: nothing moves.
    Returns the placement and the record for ``metrics["track_shift"]``."""
    v, info = _track_velocity(readings, "stack")
    if v is None:
        return matrices, info
    for e in (*chain_edges, *extra_edges):  # E' = M_b T((b - a) v) M_b^-1 E: the placements' own step
        e.matrix = _normalise(matrices[e.b] @ _line(e.b - e.a, v) @ np.linalg.inv(matrices[e.b]) @ e.matrix)
    info["applied"] = True
    return np.stack([_normalise(m @ _line(k - ref, v)) for k, m in enumerate(matrices)]), info


def _decided_on_shifted(detrended: Callable, matrices, v, ref: int, info: dict):
    """Session 44 (``track_shift="decision"``, opt-in): the drift decision (``detrended``: :func:`_detrended`
    bound to its other arguments) reads the solved placement moved by ``(k - ref) v`` in the aligned frame
    (the line :func:`_track_shifted` adds: a placement that follows the mitochondria, which is what the
    decision's reading assumes; about 9 % of their drift more), and only a detrend keeps it (the trend, or
    the background's slope, is removed from it). Where the decision keeps the placement (the trend is the
    sections', or no trend), the solved one is kept: it follows the still tissue best, and a kept
    mitochondria's drift would be added to it (session 44's development: the "stack" arm lost 0.022-0.024
    Dice ref on kept stage-drift+drift rows). Returns ``(matrices, drift_info)``; ``info`` records it."""
    shifted = np.stack([_normalise(m @ _line(k - ref, v)) for k, m in enumerate(matrices)])
    out, drift_info = detrended(shifted)
    info["applied"] = drift_info["method"] != "none"
    if not info["applied"]:
        return matrices, drift_info
    return out, drift_info


def _global_placement(n, ref, shape, chain_edges, extra_edges, chained, rows, model, opts, drift_prior):
    """Matrices of the global solve over all pairs, the pair list in every report row, and
    the solver summary for the metrics."""
    edges = chain_edges + [e for e in extra_edges if e.weight > 0]
    for e in edges:  # sections further apart differ more (organelles move): weight 1 / distance^2
        e.confident = e.weight >= 0.5  # decided before the scaling: any real match places its sections
        e.weight /= float(e.b - e.a) ** 2
    matrices, info = solve_global(
        n, edges, ref, shape, model, initial=chained, huber=opts.ransac_threshold, drift_prior=drift_prior
    )  # fmt: skip
    for row in rows:
        if row is not None:
            row["pairs"] = []
    for e, res, w, rw in zip(edges, info["residuals"], info["weights"], info["robust"]):
        stats = e.stats or {
            "neighbour": e.a, "inliers": int(rows[e.b]["inliers"]),
            "reprojection_error": rows[e.b]["reprojection_error"],
        }  # fmt: skip
        rows[e.b]["pairs"].append(
            {**stats, "residual": float(res), "weight": float(w), "prior_weight": float(e.weight),
             "robust_weight": float(rw)}
        )  # fmt: skip
    for e in extra_edges:
        if e.weight == 0:
            rows[e.b]["pairs"].append(
                {**e.stats, "residual": None, "weight": 0.0, "prior_weight": 0.0, "robust_weight": 0.0,
                 "failed": True}
            )  # fmt: skip
    placed_by = [(e.a, e.b, e.matrix, float(r)) for e, r in zip(edges, info["residuals"]) if e.is_confident()]
    summary = {
        "pairs": len(edges), "failed_pairs": sum(e.weight == 0 for e in extra_edges),
        "residual_mean": float(np.mean(info["residuals"])) if len(edges) else 0.0,
        "downweighted_pairs": int(np.sum(info["robust"] < 0.999)),  # by the Huber weights only
        "unconstrained_sections": info["unconstrained"],
    }  # fmt: skip
    return matrices, summary, placed_by


def _detrended(
    matrices,
    shape,
    ref,
    rows,
    window,
    auto=False,
    background=None,
    recentre=False,
    frames=None,
    relative=None,
    kept=None,
    kept_reading=None,
):
    """:func:`.detrend.detrend` over the sections placed by a real match (not blank, no identity
    fallback); the shifts go into the report rows; the summary for the metrics. ``auto``: only
    where :func:`.detrend.trend_test` finds a trend and the rest of the image says it is the
    organelles' (``background(matrices, use)``: :func:`.background.background_motion`; session 22),
    see :func:`_auto_decision`. ``recentre`` (``reference="auto"``, session 24): where it detrends,
    the stack first goes into the frame of the placed section nearest the middle
    (:func:`.detrend.recentred`, where ``frames`` places it, default ``matrices``); the summary's
    ``"reference"`` is then ``[from, to]``. ``kept`` / ``kept_reading`` (session 45): see
    :func:`_auto_decision`."""
    use = np.array([r is not None and r["fallback"] != "identity" for r in rows])
    use[ref] = True
    if use.sum() < MIN_DETREND_SECTIONS:
        note = (
            f"Drift correction skipped: only {int(use.sum())} sections were placed by a real match; a "
            f"trend needs at least {MIN_DETREND_SECTIONS} (through fewer it would remove real translations)."
        )
        return matrices, {
            "method": "none",
            "window": window,
            "skipped": note,
            "sections_used": int(use.sum()),
        }
    slope = None
    test = None
    if auto:
        test = trend_test(section_centres(matrices, shape), use)
        if kept is None and kept_reading is None:  # as before session 45 (the call a wrapper sees)
            apply, slope = _auto_decision(test, matrices, use, background, relative)
        else:
            apply, slope = _auto_decision(
                test, matrices, use, background, relative, kept=kept, kept_reading=kept_reading
            )
        if not apply:
            return matrices, {
                "method": "none",
                "auto": test,
                "window": window,
                "sections_used": int(use.sum()),
            }
    moved = None
    if recentre:
        mats, new = recentred(matrices, use, ref, frames)
        if new != ref:
            if slope is not None:  # the background's slope into the new frame: by its linear part
                anchor = matrices[new] if frames is None else frames[new]
                slope = (anchor[:2, :2] / anchor[2, 2]) @ slope
            matrices, moved, ref = mats, [int(ref), int(new)], new
    matrices, shift = detrend(matrices, shape, ref, use, window, slope)
    for k, row in enumerate(rows):
        if row is not None:
            row["drift_shift"] = [float(shift[k, 0]), float(shift[k, 1])]
    norm = np.hypot(shift[:, 0], shift[:, 1])
    info = {
        "method": "detrend", "window": window, "shift_max": float(norm.max()),
        "shift_per_section": [float(v) for v in norm], "sections_used": int(use.sum()),
    }  # fmt: skip
    if moved is not None:
        info["reference"] = moved
    if slope is not None:  # "both": only the background's slope, not the positions' whole trend
        info["method"] = "detrend-slope"
        info["slope_removed"] = [float(v) for v in slope]
    if test is not None:
        info["auto"] = test
    widened = np.flatnonzero(windows(use, window) > window) if window > 0 and slope is None else []
    if len(widened):
        info["widened_sections"] = [int(k) for k in widened]
        info["note"] = (
            f"Drift correction: fewer than {MIN_DETREND_SECTIONS} sections placed by a real match lie "
            f"within drift_window={window:g} of sections {_ranges(widened)} (stack ends, failed or blank "
            "runs); the trend there was fitted over a wider window (up to the whole stack)."
        )
    return matrices, info


def _auto_decision(
    test: dict, matrices, use, background, relative=None, kept=None, kept_reading=None
) -> tuple[bool, np.ndarray | None]:
    """``(detrend?, slope to remove or None for the whole trend)`` of ``drift_correction="auto"``;
    ``test`` (:func:`.detrend.trend_test`'s) gains what decided under ``"background"``.

    Session 22: where the variogram test finds a trend at :data:`.detrend.SCREEN_P`, the background
    (:func:`.background.background_motion`) says whose it is (:func:`.background.classify`): the
    organelles' is removed, the sections' kept (stage drift), and where both drift only the
    background's slope is removed; where it cannot tell (``"undecided"``) the trend is kept, unless
    it favours the organelles (``"undecided-organelles"``: the variogram test decides alone, at
    :data:`.detrend.AUTO_P`, as before session 22). Where the background cannot be measured
    (``"unmeasured"``: fewer than :data:`.background.MIN_PAIRS` neighbour pairs, e.g. stacks of
    under 17 sections or sections too small for its crops) the placement is kept, as with
    ``"none"``: the trend test alone detrended a stage drift there (16 sections, 1 px per section:
    Dice 0.978 -> 0.645; review 2 of session 22). Without a ``background`` the variogram test
    decides alone, at :data:`.detrend.AUTO_P`. A trend of less than :data:`.detrend.MIN_TREND`
    pixels over the placed sections is left alone.

    Session 25: where the sections are distorted (:func:`.background.unread`: at least
    :data:`.background.UNREAD` of the pairs planned gave no step; recorded as ``["background"]["unread"]``,
    ``["unread_limit"]`` and ``["distorted"]``) and the background cannot tell (``"undecided"``, or
    ``"unmeasured"`` for want of steps), the trend test decides alone, at :data:`.detrend.AUTO_P`, without
    a second look (distorted sections read the drift short, toward the sections'). A decided reading
    ("sections", "both", "organelles") stands: with a stage drift on distorted sections the background's
    "sections" / "both" is what keeps it (review 1 of session 25, A1).

    Session 26: the background's pairs are searched around the trend's step too (``trend``, see
    :func:`.background.pair_step`), so that a background moving as fast as the trend is read instead of
    counted as unread (undistorted stacks with a strong organelle drift were flagged as distorted, and
    read short or "unmeasured"), where the trend is at least :data:`.background.TOWARD_FROM` long.
    ``unread`` counts the pairs read in neither box; the stack is distorted where the box around 0 leaves
    :data:`.background.UNREAD` of the pairs unread and the widened one :data:`.background.UNREAD_WIDE`
    (recorded: ``"unread_around_0"``, ``"unread_limit_widened"``). Where it is, the slope is that of the box
    around 0 alone (``"slope_from"``), as before: exactly the readings of session 25 there.

    Session 28: the pairs read in neither box are climbed again from the background's own step (the widened
    box's median step, rounded; recorded as ``"followed"``, :func:`.background.followed`) where that is
    neither 0 nor the trend's step: where the sections drift against the organelles the background moves by
    the organelles' drift alone, longer than the trend and elsewhere, and an undistorted stack was flagged.

    Session 37, opt-in (drift + jitter under 20 px of per-section scatter, seed 88: Dice 0.597 -> 0.967 with
    both): the screen can read the smaller of the variogram's and the likelihood's p
    (:data:`.detrend.SCREEN_TEST` ``"either"``, no correction for testing twice), and an
    ``"undecided-organelles"`` first look that the trend test alone would keep (p at least
    :data:`.detrend.AUTO_P`) can get the second look too (:data:`.background.SECOND_LOOK` ``"kept"``).
    Recorded: ``"screen_test"``, ``"screen_p"``, ``["background"]["second_look_on"]``. Both can only turn a
    kept stack into a detrended one; the defaults ``"variogram"`` / ``"undecided"`` are the rules up to
    session 36.

    Session 38, opt-in (session 37 A2's candidate: 0.06 and ``"both"``; 0.02 and ``"undecided"``, the
    defaults up to session 39, are the rules up to session 37): :data:`.background.SE_FLOOR` (recorded as
    ``["background"]["se_floor"]``; the local reading's is :data:`.organelles.SE_FLOOR`, recorded as
    ``["organelles"]["se_floor"]``) and :data:`.background.SECOND_LOOK` ``"both"`` (or ``"kept+both"``): a
    first look that reads ``"both"`` on undistorted sections gets the second look too, decided as after an
    ``"undecided"`` one (a still background read as moving by one look's runs is then kept, and an organelle
    drift read short by one look can be read whole).

    Session 39, opt-in (session 38 A2's candidate with a gate, with :data:`.background.SE_FLOOR` 0.06):
    :data:`.background.SECOND_LOOK` ``"sections"``, a first look that reads ``"sections"`` on undistorted
    sections with a chi-square from 0 of at least :data:`.background.SECTIONS_C0` and a slope along the trend
    (share over 0), or an se under the floor on an axis, gets the second look too (recorded:
    ``["first_look"]["chi_square_from_0"]``): an organelle drift of 0.33 px per section inside a stage drift
    that one look reads inside 0's region can be read by both looks. It needs :data:`.background.SE_FLOOR` of
    at least :data:`.background.SECTIONS_MIN_FLOOR` (0.06; ``InputError`` otherwise, checked first, on every
    stack, with or without a trend: :func:`_sections_c0`): without the floor it failed the simulation gate.

    Session 40: the default is :data:`.background.SE_FLOOR` 0.06 with :data:`.background.SECOND_LOOK`
    ``"sections"`` (fresh seeds 106-117 and the lead's held-out 118 / 119: no row lost, stage-drift+drift
    0.55-0.67 -> 0.92-0.96 where it reaches; docs/mito.md, session 40). The earlier rule stays reachable by
    setting ``SE_FLOOR = 0.02`` and ``SECOND_LOOK = "undecided"``.

    Session 45, opt-in (``kept_reading="local"``; ``kept``: the local reading ``kept(matrices, use)``, as
    ``relative``): where the background decides "sections" on undistorted sections (the trend kept as the
    sections'), the local reading is read on the same placement and classified against the trend as under
    the elastic step (:data:`.organelles.SE_FLOOR`); its "both" removes ``-v`` (:func:`_kept_read_locally`),
    anything else keeps the trend. Recorded as ``test["kept_reading"]``; ``decided_by`` ``"kept-local"``
    where it changed the decision."""
    # session 39, review 2: "sections" without the floor refused on every stack, trend or not
    c0 = _sections_c0()
    placed = np.flatnonzero(use)
    span = placed[-1] - placed[0] if len(placed) else 0
    test["screen_test"], test["screen_p"] = _screen(test)  # session 37: what the screen read (recorded)
    if test["screen_p"] >= SCREEN_P or float(np.hypot(*test["slope"])) * span < MIN_TREND:
        return False, None
    if relative is not None:  # organelle_reading="local" under the elastic step (session 32)
        local = relative(matrices, use)
        test["organelles"] = local
        if local["readings"] >= MIN_READINGS:
            # the alignment followed the mitochondria, so their drift through the tissue, negated, is the
            # placement's error: like the background's slope, the trend where only they drift, 0 where only
            # the sections do. Classified against the trend as the background is: "organelles" removes the
            # whole trend, "sections" keeps it, "both" removes -v; undecided: the background decides
            decision, error = _classified_locally(test, local)
            if decision in ("organelles", "sections", "both"):
                test["decided_by"] = "local"
                return decision != "sections", (error if decision == "both" else None)
    test["decided_by"] = "trend-test"  # below: the background, unless the trend test decides alone
    if background is None:
        return test["p"] < AUTO_P, None
    motion = background(matrices, use, trend=test["slope"])
    around_0 = motion.pop("around_0", None)
    missed = unread(motion)
    missed_0 = missed if around_0 is None else unread(around_0)
    distorted = missed is not None and motion["planned"] >= bgm.MIN_PAIRS and missed_0 >= bgm.UNREAD
    widened = {}
    if around_0 is not None:  # the box widened toward the trend read too: both boxes must leave pairs unread
        distorted = distorted and missed >= bgm.UNREAD_WIDE
        widened = {
            "unread_around_0": missed_0,
            "unread_limit_widened": bgm.UNREAD_WIDE,
            "slope_from": "around 0" if distorted else "widened",
        }
        if distorted:
            # distorted sections' pairs are noisy (1.0-1.6 px against 0.4-0.5): in the box widened toward
            # the trend more of them are read on its side, which moves the slope toward the trend (stage
            # drift on distorted sections, 80 sections, elastic, seed 39 with toward [1, 0]: -0.15 -> +0.07
            # px per section along it); the box around 0 alone, as before session 26 (without that pull)
            motion = {**{k: v for k, v in motion.items() if k != "runs"}, **around_0}
    floor = _se_floor(bgm.SE_FLOOR, "background.SE_FLOOR")  # session 38 (recorded)
    decision, share = classify(test["slope"], motion, floor=floor)
    first = None
    # a second look, at as many other sections (not on distorted sections: the trend test decides there)
    # session 37, bgm.SECOND_LOOK "kept" (opt-in): also an "undecided-organelles" one the trend test keeps;
    # session 38, "both": also a first look that reads "both" (each look's se from 8 runs' spread)
    looks = _second_look().split("+")
    # session 39, "sections" (the default since session 40): also a first-look "sections" off 0, along the
    # trend (share over 0) or with an se under the floor on an axis (there the floor may have made the
    # "sections")
    off_0 = (
        bgm.chi_square_from_0(motion, floor)
        if c0 is not None and decision == "sections" and "runs" in motion
        else None
    )
    again = (
        decision == "undecided"
        or (decision == "undecided-organelles" and test["p"] >= AUTO_P and "kept" in looks)
        or (decision == "both" and "both" in looks)
        or (off_0 is not None and off_0 >= c0 and (share > 0 or float(np.min(motion["se"])) < floor))
    )
    if again and "runs" in motion and not distorted:
        first = {"slope": motion["slope"], "se": motion["se"], "pairs": motion["pairs"], "decision": decision}
        if off_0 is not None:
            first["chi_square_from_0"] = off_0  # session 39 (recorded)
        motion = second_look(motion, background(matrices, use, True, trend=test["slope"]))
        if motion["pairs"] <= first["pairs"]:  # no room for a second look (e.g. 80 sections)
            first = None
        else:
            decision, share = classify(test["slope"], motion, floor=floor)
            # no FAVOUR on a second look: its bound holds for one (simulated, se from the runs: a still
            # background detrended 1.2-3.2 % -> 1.8-3.6 %, with FAVOUR here 1.8-4.9 %; docs/mito.md)
            decision = "undecided" if decision == "undecided-organelles" else decision
    test["background"] = {
        **{k: v for k, v in motion.items() if k != "runs"},
        "decision": decision,
        "share": share,
        "second_look_on": _second_look(),  # session 37: which first looks get a second (recorded)
        "se_floor": floor,  # session 38: the smallest se trusted per axis (recorded)
        "unread": missed,
        "unread_limit": bgm.UNREAD,
        "distorted": distorted,
        **widened,
    }
    if c0 is not None:
        test["background"]["sections_c0"] = c0  # session 39 (recorded where "sections" is on)
    if first is not None:
        test["background"]["first_look"] = first
    test["background"]["trend_test_alone"] = distorted and decision in ("undecided", "unmeasured")
    if test["background"]["trend_test_alone"]:
        return test["p"] < AUTO_P, None
    test["decided_by"] = "background"
    if decision == "unmeasured":
        return False, None
    if decision == "undecided-organelles":
        return test["p"] < AUTO_P, None
    if decision == "both":
        return True, np.asarray(motion["slope"], np.float64)
    if decision == "sections" and kept_reading is not None and not distorted:
        return _kept_read_locally(test, matrices, use, kept, kept_reading)
    return decision == "organelles", None


def _kept_read_locally(
    test: dict, matrices, use, kept, kept_reading="local"
) -> tuple[bool, np.ndarray | None]:
    """Session 45 (``kept_reading="local"``, opt-in): the background read "sections" (kept) on undistorted
    sections. The mitochondria against the tissue right around them (``kept``:
    :func:`.organelles.relative_motion` on the same placement) are classified against the positions' trend as
    under the elastic step; only "both" changes the decision: ``(True, -v)`` (or the placement's error slope,
    :data:`.organelles.BOTH_SLOPE`). Otherwise, or without the reading (no masks, fewer than
    :data:`.organelles.MIN_READINGS` readings), the trend is kept. Recorded as ``test["kept_reading"]``.
    ``kept_reading`` (session 46): which reading, :data:`KEPT_READ_AS` (``"local-tracks"``: the sections'
    borders left out by 12 px and the tracks' se)."""
    if kept is None:
        test["kept_reading"] = {
            "decision": "unread",
            "note": "no local reading (no masks or the elastic step)",
        }
        return False, None
    local = kept(matrices, use, **KEPT_READ_AS[kept_reading])
    test["kept_reading"] = local
    if local["readings"] < MIN_READINGS:
        local["decision"] = "unmeasured"
        return False, None
    decision, error = _classified_locally(test, local)
    if decision != "both":
        return False, None
    test["decided_by"] = "kept-local"
    return True, error


def _classified_locally(test: dict, local: dict) -> tuple[str, np.ndarray]:
    """The local reading ``local`` (:func:`.organelles.relative_motion`'s) classified against the positions'
    trend as the background's slope is (:func:`.background.classify`, at :data:`.organelles.SE_FLOOR`): the
    alignment followed the mitochondria, so their drift through the tissue, negated, is the placement's
    error, like the background's slope the trend where only they drift, 0 where only the sections do.
    Returns the decision and the slope "both" removes: ``-v``, or (session 36, :data:`.organelles.BOTH_SLOPE`
    "placement") the placement's error slope. Records ``se_floor``, ``decision`` and, for "both",
    ``both_slope`` in ``local`` (session 45: shared by the elastic step's and ``kept_reading``'s readings)."""
    error = -np.asarray(local["slope"], np.float64)
    motion = {"slope": error.tolist(), "se": local["se"], "pairs": local["readings"]}
    local["se_floor"] = _se_floor(organelles.SE_FLOOR, "organelles.SE_FLOOR")  # session 38 (recorded)
    decision, _ = classify(test["slope"], motion, floor=local["se_floor"])
    local["decision"] = decision
    if decision == "both":  # session 36: organelles.BOTH_SLOPE, what "both" removes (recorded)
        local["both_slope"] = _both_slope()
        if local["both_slope"] == "placement":
            error = np.asarray(local["placement_error"], np.float64)
    return decision, error


def _screen(test: dict) -> tuple[str, float]:
    """``(test read, p)`` of the screen of ``"auto"`` (:data:`.detrend.SCREEN_TEST`, session 37): the
    variogram test's ``p``, or the smaller of it and the likelihood test's (``q_likelihood``, where
    recorded)."""
    how = ft.check_choice(detrend_module.SCREEN_TEST, detrend_module.SCREEN_TESTS, "detrend.SCREEN_TEST")
    if how == "variogram" or "q_likelihood" not in test:
        return how, float(test["p"])
    return how, min(float(test["p"]), math.exp(-float(test["q_likelihood"]) / 2.0))


def _second_look() -> str:
    """:data:`.background.SECOND_LOOK`, checked (a module setting, read where it is used)."""
    return ft.check_choice(bgm.SECOND_LOOK, bgm.SECOND_LOOKS, "background.SECOND_LOOK")


def _sections_c0() -> float | None:
    """:data:`.background.SECTIONS_C0`, checked, where :data:`.background.SECOND_LOOK` holds ``"sections"``
    (else None; module settings, read where they are used). Session 39 (review 1): ``"sections"`` with
    :data:`.background.SE_FLOOR` under :data:`.background.SECTIONS_MIN_FLOOR` raises an ``InputError``;
    :func:`_auto_decision` calls this first (review 2), so a stack without a trend refuses it too. Only
    checks: it changes no value."""
    if "sections" not in _second_look().split("+"):
        return None
    c0 = check_float("background.SECTIONS_C0", bgm.SECTIONS_C0, 0.0, math.inf)
    floor = _se_floor(bgm.SE_FLOOR, "background.SE_FLOOR")
    if floor < bgm.SECTIONS_MIN_FLOOR:  # session 39, review 1: gated only with the floor
        raise InputError(
            f"background.SECOND_LOOK 'sections' needs background.SE_FLOOR at least {bgm.SECTIONS_MIN_FLOOR}"
            f" (got {floor}): without the floor the second look on a first-look 'sections' failed the"
            " simulation gate (a still background under a stage drift detrended too often; docs/mito.md,"
            f" session 39). Set background.SE_FLOOR = {bgm.SECTIONS_MIN_FLOOR} too, or, for the rule before"
            " session 40, set background.SECOND_LOOK = 'undecided' together with background.SE_FLOOR = 0.02."
        )
    return c0


def _se_floor(value, what: str) -> float:
    """A standard error floor (px per section; a module setting, read where it is used), checked: over 0 (a
    zero se would divide by zero in :func:`.background.classify`)."""
    return check_float(what, value, 0.0, 10.0, low_open=True)


def _both_slope() -> str:
    """:data:`.organelles.BOTH_SLOPE`, checked (a module setting, read where it is used)."""
    return ft.check_choice(organelles.BOTH_SLOPE, BOTH_SLOPES, "organelles.BOTH_SLOPE")


def _detrended_elastic(
    matrices, fields, shape, ref, rows, window, auto=False, background=None, recentre=False, relative=None
):
    """:func:`_detrended` of the sections as the elastic ``fields`` place them (each matrix with its
    field's mean displacement, the least-squares affine fit of the field at the centre of the frame);
    the shifts go onto the matrices, which moves the sections with their fields (``P (p + s + u(p))``).

    Session 21: the field's mean, not its value at the centre, which follows the section's local
    distortion there (drift + distorted stacks, 160 sections: the positions' scatter 2.3-4.2 px with
    the centre value, 0.56-0.58 px with the mean), so the trend test saw the drift less well
    (``q_likelihood`` 9.2 -> 31.7 on seed 8 with the middle reference, docs/mito.md). Returns
    ``(matrices, fields, summary)``; where ``recentre`` put the stack in another section's frame
    (:func:`_detrended`), the fields are resampled into it (:func:`.elastic.reframed_fields`)."""
    n = len(matrices)
    at = np.repeat(np.eye(3)[None], n, axis=0)
    at[:, :2, 2] = field_affine_fit(fields, shape)[:, 4:]
    placed = matrices @ at
    # the new frame (recentre) is where the new reference lies with its field's whole affine part: with
    # reference 0 the joint solve leaves the chain's turn in the fields (drift + distorted seed 1, 80
    # sections: -1.66 degrees in section 39's; its translation alone as the frame gave Dice 0.859 without
    # the detrend, the affine part 0.910)
    frames = matrices @ field_affine_matrices(fields, shape) if recentre else None
    moved, info = _detrended(placed, shape, ref, rows, window, auto, background, recentre, frames, relative)
    if "reference" in info:  # new frame -> old frame: the new reference's placement, inverted
        fields = reframed_fields(fields, np.linalg.inv(frames[info["reference"][1]]), shape)
    return np.stack([matrices[k] @ np.linalg.solve(placed[k], moved[k]) for k in range(n)]), fields, info


def _moved_to(drift_info: dict | None, ref: int) -> int:
    """The reference section after the drift correction: where ``reference="auto"`` put a detrended
    stack in another section's frame (``drift_info["reference"]`` ``[from, to]``), ``to``; else ``ref``."""
    return ref if drift_info is None or "reference" not in drift_info else int(drift_info["reference"][1])


def _ranges(ks) -> str:
    """``"0-3, 7, 9-12"`` for sorted section indices."""
    out, start = [], None
    for i, k in enumerate(ks):
        if start is None:
            start = k
        if i == len(ks) - 1 or ks[i + 1] != k + 1:
            out.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out)


# -- the engine ---------------------------------------------------------------------------------
def _checked_call(func: Callable[..., Registration]) -> Callable[..., Registration]:
    """Make ``func`` refuse unknown option names and extra positional arguments with an
    ``InputError`` (not a ``TypeError``) and turn running out of memory into ``OutOfMemoryError``."""
    params = inspect.signature(func).parameters
    positional = [n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    @functools.wraps(func)
    def checked(*args: Any, **options: Any) -> Registration:
        check_known(
            "mito", {k: v for k, v in options.items() if k not in params}, [n for n in params if n != "stack"]
        )
        if len(args) > len(positional):
            raise InputError(
                f"{func.__name__} takes at most {len(positional)} positional arguments "
                f"({', '.join(positional)}), got {len(args)}; give the options by name, e.g. detector='sift'."
            )
        with ft.opencv_memory_guard("stack alignment"):
            return func(*args, **options)

    return checked


@_checked_call
def align_stack(
    stack,
    masks=None,
    detector: str = "mito",
    descriptor: str = "brisk",
    matcher: str = "bf",
    model: str = "homography",
    reference: int | str = DEFAULT_REFERENCE,
    ransac_threshold: float = 3.0,
    ratio: float = 0.8,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag = None,
    *,
    use_masks: bool | None = None,
    max_keypoints: int = 1000,
    scale: float | None = None,
    smooth: float = 1.0,
    mask_dilation: float = 12.0,
    border: int = 6,
    min_inliers: int = 10,
    fallback: Sequence[str] = ("sift", "identity"),
    max_skip: int = 2,
    mito_radius: float | None = None,
    fast_threshold: int = 10,
    max_scale: float = 1.5,
    keypoint_size: float | None = None,
    model_selection: bool = True,
    refine: bool = True,
    background_mask_dilation: float | None = None,
    track_shift: str | None = None,
    neighbours: int | None = None,
    solver: str | None = None,
    global_model: str = GLOBAL_MODEL,
    drift_prior: float = DRIFT_PRIOR,
    guided_pairs: bool = True,
    drift_correction: str = DEFAULT_DRIFT_CORRECTION,
    drift_window: float = 0.0,
    elastic: bool | str = DEFAULT_ELASTIC,
    elastic_spacing: float = 32.0,
    elastic_radius: int = 4,
    elastic_iterations: int = 2,
    elastic_solver: str | None = None,
    elastic_landmarks: bool | None = None,
    organelle_reading: str = DEFAULT_READING,
    kept_reading: str | None = None,
    warp: bool = True,
    lazy: bool = False,
    spacing: Sequence[float] | None = None,
) -> Registration:
    """Align the sections of an EM stack to a reference section with keypoints (MITO).

    Parameters
    ----------
    stack
        ``(n, y, x)`` sections: a numpy or dask array (read one section at a time), a list of
        2D arrays, or a path (multi-page TIFF, folder of section TIFFs, NIfTI).
    masks
        Optional mitochondria masks of the same shape (labels or binary; array or path). With
        ``detector="mito"`` (or ``use_masks=True``) and no masks, mitochondria are detected
        automatically (:func:`~.masks.detect_mitochondria_section`).
    detector
        ``"mito"`` (FAST corners inside the dilated mitochondria masks), ``"orb"``, ``"brisk"``,
        ``"fast"`` or ``"sift"``.
    descriptor
        ``"brisk"``, ``"orb"``, ``"freak"`` (binary, Hamming distance) or ``"sift"`` (float, L2).
    matcher
        ``"bf"`` brute force or ``"flann"`` (LSH for binary descriptors, kd-trees for SIFT),
        both followed by the ratio test with ``ratio``.
    model
        ``"homography"``, ``"affine"``, ``"similarity"`` or ``"rigid"``: the most general map
        allowed. With ``model_selection`` (default) a simpler nested model is used for a pair
        when it keeps at least 90 % of the RANSAC inliers of the richer ones and, with
        ``refine``, the choice is made again on the sub-pixel tracks (a richer model must lower
        their RMS residual by 20 %); the report's ``model`` column says which.
        ``model_selection=False`` always fits ``model`` itself.
    reference
        Index of the section that stays in place (negative counts from the end), ``"middle"``, or
        ``"auto"`` (the default since session 24): section 0, except where the drift correction
        detrends (``"auto"``'s decision or ``"detrend"``): there the aligned stack is put in the frame
        of the placed section nearest the middle (with ``elastic``, where it lies with its field's affine
        part, the fields resampled into that frame) before the trend is removed
        (:data:`.detrend.DEFAULT_REFERENCE`: what no pair sees, such as the mitochondria's common
        turn, grows from the reference). ``metrics["reference"]`` and the settings'
        ``reference_applied`` say which section it was; ``metrics["drift_correction"]["reference"]``
        ``[from, to]`` where it moved. With ``drift_correction`` the reference moves by its own
        level, the wander of the placement errors there (:func:`.detrend.reference_level`, session 21).
    ransac_threshold
        RANSAC reprojection threshold in pixels of the original sections.
    workers
        Threads for per-section features and matching (default: the usable CPU cores).
    progress, cancel
        A callback receiving :class:`~napari_nephi.core.progress.ProgressEvent` once per
        section (``extra["row"]`` is that section's report row) and a flag that stops the run.
    use_masks
        Restrict keypoints to (dilated) mitochondria masks; default True for ``"mito"`` or when
        ``masks`` are given, else False. True without ``masks`` detects them automatically.
    max_keypoints
        Keypoints kept per section, spread over the section (strongest per grid cell first).
    scale
        Work resolution relative to the sections; default 1 up to 1024 px, 0.5 up to 2048 px ...
        Keypoints are mapped back, so matrices are always in original pixels.
    smooth
        Gaussian sigma (work pixels) applied before detection and description.
    mask_dilation
        Margin (original pixels) added around the mitochondria masks.
    background_mask_dilation
        Margin (original pixels) added around the mitochondria masks that the background reading of
        ``drift_correction="auto"`` leaves out (:mod:`.background`, which adds its own
        :data:`.background.MARGIN`); the keypoints keep ``mask_dilation``. Default None: ``mask_dilation``
        (the keypoints' masks themselves, as up to session 43). It changes nothing before the drift
        decision. Needs masks (``use_masks``). Session 43, opt-in (docs/mito.md).
    track_shift
        ``"stack"`` (session 44, opt-in; default None: off, bit for bit as before): the pair maps are fitted
        to all tracks, the mitochondria's and the still tissue's around them, so the placement follows only
        91-94 % of a drift of the mitochondria (docs/mito.md, session 41). Each neighbour pair reads where
        its refined tracks inside the mitochondria went against its map (at least 8 tracks); the median over
        the pairs, one velocity for the stack, then moves every pair map and the placement along it (a
        straight line; :func:`_track_shifted`). Needs masks (``use_masks``) and ``refine``, and 16 such pairs
        (else nothing moves). ``metrics["track_shift"]`` has the reading.
    border
        Keypoints closer than this (work pixels) to the zero padding of a section are dropped.
    min_inliers
        A pair with fewer RANSAC inliers fails and goes to the fallbacks.
    fallback
        Detectors tried on the whole sections when a pair fails, in order; ``"identity"`` ends
        the list. After them the section is matched one step further toward the reference
        (``max_skip`` neighbours in all), and finally it gets the identity relative to its
        neighbour.
    mito_radius
        Typical mitochondrion radius in pixels for automatic masks (default: estimated).
    keypoint_size
        Support (diameter, original pixels) of the descriptors of FAST / ``"mito"`` keypoints,
        which have no scale of their own; default 2.5x the mean mitochondrion half-width of
        the reference section's masks, so a descriptor sees a mitochondrion and its border.
    refine
        Sub-pixel refinement of every accepted pair map (:func:`.features.refine`): section
        a's keypoints are tracked into section b by Lucas-Kanade after resampling a with the
        RANSAC map, and the same model is refitted by least squares to the tracks. Removes
        the whole-work-pixel quantisation of FAST keypoints, whose random error per pair
        otherwise accumulates along long stacks. The report's ``refined`` column says where it
        was used (it is skipped when it would move the map by more than
        ``ransac_threshold`` at an inlier).
    neighbours
        Sections each section is matched to, toward the reference (default None: 2, or 1 with
        ``solver="chain"``; 1: its neighbour only, the chain, the default of sessions 1-13).
        Features are computed once per section; every extra pair is matched in the worker
        threads and listed in the section's report row (``pairs``).
    solver
        ``"chain"`` composes the neighbour maps (errors add up along the stack);
        ``"global"`` places all sections at once by robust least squares over all pairs
        (:mod:`.solve`). Default: ``"global"`` when ``neighbours > 1``, else ``"chain"``.
    global_model
        Map of every section in the global solve: ``"affine"`` (default: a section's own
        compression or shear is undone, as the chain's affine and homography maps do),
        ``"similarity"`` or ``"rigid"`` (sections cut from one block differ by a rigid motion;
        their own distortions are left in place, for ``elastic``). Affine scale and shear
        errors add up along the stack unless ``drift_prior`` holds them back.
    drift_prior
        Weight of the global solve's penalty on scale and shear of each section (default 0.1;
        0: off). It holds back slowly accumulating scale/shear drift but also resists real
        shape changes of the sections: at 0.1 about 3 % of an isolated section's own
        compression is left (0.2 px for 4 % on 256 px), at 1 about 20 % (see :mod:`.solve`).
    guided_pairs
        With the global solve and ``refine``: a further pair starts from the chain's composed
        map, tracks the keypoints and keeps the refit when descriptor matches near it confirm
        it (cheaper than matching in full); False matches every further pair in full.
    drift_correction, drift_window
        ``"detrend"``: after the chain or global solve, the slow trend through depth of where
        the section centres land is taken to be organelle drift, not misalignment, and removed
        (a robust straight line over the whole stack with ``drift_window=0``, else at every
        section a local line weighted by a Gaussian of sigma ``drift_window`` sections); the
        sections' level goes where the reference's own level is (the wander of the placement
        errors there, not its scatter: :func:`.detrend.reference_level`, session 21), so the
        reference moves by that much (its row's ``drift_shift``; ~0 where the sections only
        scatter). Skipped, with a ``metrics["notes"]`` entry, when fewer
        than 10 sections are placed by a real match. Right for serial-section TEM (sections
        placed independently), wrong for FIB-SEM / SBEM stage drift (see :mod:`.detrend`).
        With ``elastic_solver="joint"`` the trend is taken after the elastic step, of where the
        sections land with their fields (the joint solve's keypoint pairs would undo it).
        ``"auto"`` (the default since session 22): detrend only where the straight-line trend is
        more than the sections' own scatter and slow wander explain (:func:`.detrend.trend_test`,
        p below 0.05) and the rest of the image (membranes, texture; the mitochondria left out)
        moves with it in the aligned stack, i.e. where it is the organelles' drift
        (:mod:`.background`): sections that only scatter (placement jitter) and sections that
        drift as a whole (FIB-SEM / SBEM stage drift, whose background stays put once aligned)
        are left as solved; where both drift, only the background's slope is removed. Where the
        background cannot be measured (fewer than 16 neighbour pairs, e.g. under 17 sections)
        the placement is kept, as with ``"none"``; where it cannot tell but favours the
        organelles, the trend test decides at p 0.001 (up to session 21's rule). The settings'
        ``drift_correction_applied`` and ``metrics["drift_correction"]``
        (``["auto"]["background"]``) say what ran and why.
        ``"none"`` (the default up to session 21) leaves the placement as solved.
    elastic, elastic_spacing, elastic_radius, elastic_iterations
        Elastic refinement after the per-section maps: True, False or ``"auto"`` (the default since
        session 30, opt-in in session 29: only where the sections are measured to be distorted, from the
        neighbour pairs' track residuals, :mod:`.distortion`; ``metrics["distortion"]`` has the
        reading, the limit and the decision, the settings' ``elastic_applied`` what ran; a stack read
        undistorted gets ``elastic=False``'s result bit for bit; since session 30 the residuals are
        correlated between points 12-30 work pixels apart, beyond the tracking window, so image noise
        no longer reads as distortion). A smooth displacement
        per section on a grid of ``elastic_spacing`` pixels, minus the median optical flow to
        its ``elastic_radius`` neighbours on each side, in ``elastic_iterations`` relaxation
        passes (:mod:`.elastic`); identical sections get zero fields. The transform is then an
        :class:`~napari_nephi.core.transform.ElasticSectionTransform` (about 40 times the CPU of
        the alignment without it). Defaults 4 neighbours
        and 2 passes: with eight votes a section's own distortion is told apart from its
        neighbours' better than with four (synthetic distorted stack: Dice 0.944 with 2 and 1
        pass, 0.952 with 4 and 2, at about twice the wall time and four times the CPU time).
    elastic_solver
        ``"joint"``: the affine part of the fields is solved for all sections at once from the
        affine fits of the dense flows between every section and its ``elastic_radius``
        neighbours (each measures the whole section, so their errors do not add up along the
        stack as the keypoint pairs' do), with a weak prior that the sections' own scale and
        shear average out; the reference keeps its place; the median then handles the rest.
        With the global solve, its keypoint pairs join that solve too, each kind weighted by its
        typical residual (:func:`.elastic._joint_affine`): pairs that agree closely keep their
        placement (undistorted sections), pairs that disagree give way to the flows (sections
        distorted by cutting). ``"local"``: every section's whole field from the median
        (sessions 11-14). Default None: ``"joint"`` with the global solve (since session 19),
        ``"local"`` with the chain (whose pairs cannot join the joint solve).
    elastic_landmarks
        With ``elastic_solver="joint"`` and masks (``use_masks``): each flow pair's rotation and
        translation come from the keypoint regions (the mitochondria, as the keypoints'), its
        scale and shear from all textured pixels (session 17: distorted stacks gain, drifting
        ones lose a little; see docs/mito.md). Default None: on where it applies (the joint
        solver with masks; since session 19), else off. The settings record what ran.
    organelle_reading
        Who tells, under the elastic step with ``drift_correction="auto"``, whether the
        positions' trend is the organelles' drift or the sections': ``"local"`` (the default since
        session 32; :mod:`.organelles`: each mitochondrion against the tissue right around it,
        so the sections' distortion cancels) or ``"background"`` (as before, :mod:`.background`:
        the rest of the image in the aligned frame). With ``"local"`` the mitochondria's drift ``v``,
        negated (the placement followed them), is classified against the positions' trend as the
        background's slope is (:func:`.background.classify`): "organelles" removes the whole
        trend, "sections" keeps it, "both" removes the slope ``-v``; the reading and its decision
        are in ``metrics["drift_correction"]["auto"]["organelles"]``. Where it is undecided, or
        without masks, the elastic step or enough mitochondria read (16 pair readings), the
        background decides as before. The settings record the choice and, as
        ``organelle_reading_applied``, what decided: "local", "background", "trend-test" or "none"
        (session 33). ``"local-grid"`` (session 34, opt-in): ``"local"`` with the tissue's step of each
        tile taken as the median over tissue tiles on a grid around it (:data:`.organelles.TISSUE_READS`),
        which halves the reading's noise on the benchmark's stacks (docs/mito.md).
    kept_reading
        ``"local"`` (session 45, opt-in; default None: off, bit for bit as before): with
        ``drift_correction="auto"``, masks (``use_masks``) and no elastic step, where the background's
        reading keeps the positions' trend as the sections' ("sections", on undistorted sections), the
        mitochondria are read against the tissue right around them as ``organelle_reading="local"`` reads
        them under the elastic step, on the same placement. The placement's own wander, the background
        reading's largest error on the engine's placement, cancels in that difference. Only its "both"
        changes the decision: the slope ``-v`` is removed ("detrend-slope"); anything else keeps the trend
        as before. The reading is in ``metrics["drift_correction"]["auto"]["kept_reading"]``
        (docs/mito.md, session 45). ``"local-tracks"`` (session 46, opt-in): the same reading with the
        sections' borders left out by 12 px (4 before: a tissue tile on a section's border reads about 1 px
        outward, pair after pair) and the se the larger of the blocks' and the tracks' (each mitochondrion,
        followed through depth, one sample), so that a stage drift alone stays kept (docs/mito.md,
        session 46).
    spacing
        ``(z, y, x)`` voxel size kept with the transform (default: from the file for a path,
        else 1).
    warp, lazy
        Compute ``.warped`` (the aligned stack, same dtype as the input where OpenCV can
        interpolate it, else float32); ``lazy=True`` makes it a dask array computed section by
        section on access instead. With ``warp=False`` ``.warped`` is None.

    Returns
    -------
    Registration
        ``.warped`` the aligned stack, ``.transform`` a
        :class:`~napari_nephi.core.transform.PerSectionTransform` whose ``matrices[k]`` maps
        aligned (reference-frame) coordinates to coordinates of section ``k``, ``.metrics``
        with ``"report"`` (one dict per section: keypoints, matches, inliers, reprojection
        error, failed, fallback, method) and a summary; ``.settings`` the options used.

    Raises
    ------
    InputError
        For an unknown option name (listing the valid ones) or a value out of type or range.
    OutOfMemoryError
        When the sections or the aligned stack do not fit in memory.
    """
    start = time.perf_counter()
    if spacing is not None:
        spacing = check_spacing(spacing, 3)
    if isinstance(stack, (str, Path)):
        stack, meta = _read_path(stack, "stack")
        file_spacing = meta.get("scale")
        if spacing is None and file_spacing is not None and len(file_spacing) == 3:
            spacing = tuple(file_spacing)
    stack = as_stack(stack)
    n, h, w = (int(s) for s in stack.shape)
    if masks is not None:
        masks = as_stack(masks, "mask stack")
        if tuple(masks.shape) != (n, h, w):
            raise DimensionMismatchError(
                f"The masks have shape {tuple(masks.shape)} but the stack has shape {(n, h, w)}; "
                "give one mask per section, of the section's size."
            )
    opts = build_options(
        (h, w), detector, descriptor, matcher, model, use_masks, ransac_threshold, ratio,
        max_keypoints, scale, smooth, mask_dilation, border, min_inliers, fallback, max_skip,
        mito_radius, fast_threshold, max_scale, keypoint_size, model_selection,
        masks_given=masks is not None, refine=refine, background_mask_dilation=background_mask_dilation,
        track_shift=track_shift,
    )  # fmt: skip
    det, desc, mat, mod, fb = opts.detector, opts.descriptor, opts.matcher, opts.model, opts.fallback
    ref = _reference(reference, n)
    # "auto": the middle where detrended, with the elastic step too (drift + distorted, elastic: 160 sections
    # seeds 29 / 19 / 25: 0.940 -> 0.962, 0.943 -> 0.956, 0.942 -> 0.943; 80 sections 19 / 1 / 6: -0.008 /
    # +0.007 / 0.000; docs/mito.md, session 24)
    auto_reference = isinstance(reference, str) and reference.lower() == "auto"
    neighbours, solver, global_model, drift_prior = check_global_options(
        neighbours, solver, global_model, drift_prior
    )
    drift_correction, drift_window = check_drift_options(drift_correction, drift_window)
    guided_pairs = check_bool("guided_pairs", guided_pairs)
    workers = (0 if workers is None else check_int("workers", workers, 0, 4096)) or _cpu_count()
    warp, lazy = check_bool("warp", warp), check_bool("lazy", lazy)
    elastic = check_elastic(elastic)
    organelle_reading = ft.check_choice(organelle_reading, READINGS, "organelle_reading")
    kept_reading = check_kept_reading(kept_reading, opts.use_masks)
    elastic_auto = elastic == "auto"  # decided after the pairs (.distortion), before the global solve
    elastic_spacing = check_float("elastic_spacing", elastic_spacing, 4.0, 1e5)
    elastic_radius = check_int("elastic_radius", elastic_radius, 1, 32)
    elastic_iterations = check_int("elastic_iterations", elastic_iterations, 1, 20)
    if elastic_solver is None:
        elastic_solver = default_elastic_solver(solver == "global")
    elastic_solver = ft.check_choice(elastic_solver, ELASTIC_SOLVERS, "elastic_solver")
    landmarks_asked = elastic_landmarks
    if elastic_landmarks is None:
        elastic_landmarks = bool(elastic) and elastic_solver == "joint" and opts.use_masks
    elastic_landmarks = check_bool("elastic_landmarks", elastic_landmarks)
    if elastic_landmarks and not (elastic and elastic_solver == "joint" and opts.use_masks):
        raise InputError(
            "elastic_landmarks needs elastic=True, elastic_solver='joint' and mitochondria masks "
            "(use_masks, given or detected)."
        )
    prog = Progress(progress, cancel)  # checks the callbacks
    prog.check()
    intensity = (None, None)
    if np.dtype(stack.dtype) != np.uint8:
        intensity = intensity_range(read_section(stack, ref))
    sections = _Sections(stack, masks, opts, intensity)
    sections.prepare(ref)
    if drift_correction == "auto" and opts.use_masks:  # the background reuses these sections' masks
        planned = background_runs(np.ones(n, bool))
        sections.keep_masks = sections_read(planned)
    total = n + (n if warp and not lazy else 0)

    matrices = np.repeat(np.eye(3)[None], n, axis=0)
    rows: list[dict | None] = [None] * n
    # the sections' distortion, from the neighbour pairs' track residuals as they arrive (.distortion)
    correlation = Correlation(
        (DISTORTION_RING[0] / opts.scale, DISTORTION_RING[1] / opts.scale), DISTORTION_RADIUS / opts.scale
    )
    chain_edges: list[Edge] = []  # the chained pairs (identity fallbacks with a tiny weight)
    extra_edges: list[Edge] = []  # the further neighbours of the global solve
    track_readings: list[np.ndarray] = []  # track_shift (session 44): the mitochondria's motion per section
    t_align = time.perf_counter()
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mito")
    try:
        ref_feats = executor.submit(sections.features, ref)
        f_ref = ref_feats.result()
        _check_reference(stack, ref, reference, sections.blank.get(ref))
        rows[ref] = {
            "section": ref, "neighbour": None, "keypoints": len(f_ref), "matches": 0, "inliers": 0,
            "reprojection_error": None, "failed": False, "fallback": "", "method": "reference", "model": "",
            "refined": False, "tracks": 0, "tracking_error": None,
        }  # fmt: skip
        done = 1
        prog.step(done, total, stage=f"section {ref + 1}/{n}", section=ref, row=rows[ref])
        limit = 4 * workers + 2  # pairs in flight: bounds memory for lazily read stacks
        lag = 2 * workers  # extra pairs are submitted this many sections later: their chain is done
        keep = max(opts.max_skip, neighbours + lag)  # features kept for the pairs still to submit
        for direction in (1, -1):
            order = list(range(ref + direction, n if direction > 0 else -1, direction))
            futs: dict[int, Future] = {ref: ref_feats}
            pairs_of: dict[int, Future] = {}  # section -> its neighbour pair job
            window: deque = deque()
            for i, k in enumerate(order):
                prog.check()
                futs[k] = executor.submit(sections.features, k)
                chain = ([ref] + order[:i])[::-1]  # toward the reference
                needed = {j: futs[j] for j in [k, *chain[: opts.max_skip]]}
                window.append(executor.submit(_pair_job, sections, needed, k, chain[: opts.max_skip], (h, w)))
                pairs_of[k] = window[-1]
                # the further pairs of section order[i - lag] (of all the rest after the last section)
                last = i == len(order) - 1
                for kk in (
                    order[max(0, i - lag) : i + 1 if last else max(0, i - lag + 1)]
                    if solver == "global"
                    else ()
                ):
                    for j in range(kk - 2 * direction, kk - direction * (neighbours + 1), -direction):
                        if (j - ref) * direction < 0:
                            break
                        between = {x: pairs_of[x] for x in range(kk, j, -direction)}  # the chain from kk to j
                        window.append(executor.submit(
                            _extra_pair_job, sections, futs[j], futs[kk], j, kk, (h, w), between, guided_pairs
                        ))  # fmt: skip
                for old in [j for j in futs if abs(j - k) > keep]:
                    del futs[old]  # features stay alive only while a queued pair needs them
                for old in [j for j in pairs_of if abs(j - k) > keep]:
                    del pairs_of[old]  # queued extra pairs hold their own copies
                while len(window) > limit or (window and i == len(order) - 1):
                    res = window.popleft().result()
                    if res is None:  # an extra pair that the chain already holds
                        continue
                    if isinstance(res, Edge):
                        extra_edges.append(res)
                        continue
                    matrices[res.section] = _normalise(res.matrix @ matrices[res.source])
                    rows[res.section] = res.row
                    correlation.add(res.section - 1 if res.section > ref else res.section, res.residual)
                    if res.track_reading is not None:  # per section, in the aligned frame (x, y)
                        track_readings.append(_aligned_step(res, matrices[res.section]))
                    identity = res.row["fallback"] == "identity"
                    chain_edges.append(Edge(res.source, res.section, res.matrix, 1e-3 if identity else 1.0))
                    done += 1
                    stage = f"section {res.section + 1}/{n}"
                    prog.step(done, total, stage=stage, section=res.section, row=res.row)
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)
    # the sections' distortion (.distortion); elastic="auto" decides here
    distortion = decide(elastic, correlation.result(), DISTORTION_LIMIT)
    del correlation
    if elastic_auto:
        elastic = distortion["distorted"]
        if landmarks_asked is None:
            elastic_landmarks = elastic and elastic_solver == "joint" and opts.use_masks
        elastic_landmarks = elastic_landmarks and elastic  # what runs
    track_info = track_v = None
    if opts.track_shift == "stack":  # session 44, opt-in: before the solve, so its pairs carry it too
        matrices, track_info = _track_shifted(matrices, chain_edges, extra_edges, track_readings, ref)
    elif opts.track_shift == "decision":  # read by the decision only, after the solve
        track_v, track_info = _track_velocity(track_readings, "decision")
    solve_info = drift_info = None
    placed_by: list = []  # the keypoint pairs of the global solve, for the joint elastic solve
    if solver == "global":
        matrices, solve_info, placed_by = _global_placement(
            n, ref, (h, w), chain_edges, extra_edges, matrices, rows, global_model, opts, drift_prior
        )  # fmt: skip
    # with the joint elastic solve the trend is taken after it (its keypoint pairs would undo it)
    auto = drift_correction == "auto"
    background = None
    if auto:  # the rest of the image (mitochondria left out where the keypoints used them)

        def background(mats, use, second=False, trend=None):
            try:
                return background_motion(
                    lambda k: to_uint8(read_section(stack, k), *intensity),
                    sections.background_mask if opts.use_masks else None, mats, (h, w), use,
                    workers=workers, second=second, trend=trend,
                )  # fmt: skip
            finally:  # masks kept for sections the runs did not read (planned before `use` was known)
                sections.release_masks()

    late_detrend = drift_correction != "none" and elastic and elastic_solver == "joint"

    def mito_of(k):  # the given masks at full size, else those detected at work scale
        if masks is not None:
            return read_section(masks, k)
        return sections._raw_mask(k, sections.work_image(k)[0])

    def local_reading(mats, use, tissue="tile", **more):  # the mitochondria against the tissue around them
        return relative_motion(  # more: session 46's tracks / border (kept_reading, KEPT_READ_AS)
            lambda k: to_uint8(read_section(stack, k), *intensity), mito_of, mats, (h, w), use,
            workers=workers, tissue=tissue, **more,
        )  # fmt: skip

    relative = None
    if auto and organelle_reading in ("local", "local-grid") and late_detrend and opts.use_masks:
        tissue = "grid" if organelle_reading == "local-grid" else "tile"  # session 34, opt-in

        def relative(mats, use):  # (.organelles)
            return local_reading(mats, use, tissue)

    # session 45 (kept_reading, opt-in): the same reading where the background keeps on undistorted sections
    kept = local_reading if auto and opts.use_masks and not late_detrend else None

    recentre = auto_reference
    if track_v is not None and not (auto and not late_detrend):
        track_v = None  # "decision" reads where the background decides (no elastic step), else nothing moves
        track_info["note"] = (
            "track_shift='decision' acts on drift_correction='auto''s background decision, which this run "
            "did not make (another drift_correction, or the elastic step's late decision); nothing moved."
        )
    if track_v is not None:
        matrices, drift_info = _decided_on_shifted(
            lambda m: _detrended(
                m, (h, w), ref, rows, drift_window, auto, background, recentre, kept=kept,
                kept_reading=kept_reading,
            ),
            matrices, track_v, ref, track_info,
        )  # fmt: skip
    elif drift_correction != "none" and not late_detrend:
        matrices, drift_info = _detrended(
            matrices, (h, w), ref, rows, drift_window, auto, background, recentre, kept=kept,
            kept_reading=kept_reading,
        )  # fmt: skip
    fields = None
    if elastic:  # part of the alignment time
        why = (
            f"auto: sections distorted, residual correlation {distortion['correlation']:.3f}"
            if elastic_auto
            else ""
        )
        prog.step(done, total, stage=f"elastic refinement ({why or 'on'})")  # the bar waits: say why
        t0 = time.perf_counter()
        fields = elastic_fields(
            lambda k: to_uint8(read_section(stack, k), *intensity), matrices, (h, w), elastic_spacing,
            elastic_radius, min(1.0, opts.scale), step=lambda k: prog.check(), iterations=elastic_iterations,
            workers=workers, solver=elastic_solver, reference=_moved_to(drift_info, ref), pairs=placed_by,
            rois=sections.region if elastic_landmarks else None,
        )  # fmt: skip
        if late_detrend:
            matrices, fields, drift_info = _detrended_elastic(
                matrices, fields, (h, w), ref, rows, drift_window, auto, background, recentre, relative
            )
        t_elastic = time.perf_counter() - t0
    ref = _moved_to(drift_info, ref)  # reference="auto": the section the detrended stack was put in
    t_align = time.perf_counter() - t_align
    if elastic:
        transform = ElasticSectionTransform(matrices, fields, shape=(n, h, w), spacing=spacing)
    else:
        transform = PerSectionTransform(matrices, shape=(n, h, w), spacing=spacing)
    warped = None
    t_warp = 0.0
    if warp:
        t0 = time.perf_counter()
        warped = warp_sections(stack, matrices, labels=False, workers=workers, lazy=lazy, progress=prog,
                               step0=done, total=total, fields=fields)  # fmt: skip
        t_warp = time.perf_counter() - t0
    report = [_jsonable(r) for r in rows]
    failed = [r["section"] for r in report if r["failed"]]
    identity = [r["section"] for r in report if r["fallback"] == "identity"]
    inl = [r["inliers"] for r in report if r["method"] != "reference"]  # the section matching started from
    errs = [r["reprojection_error"] for r in report if r["reprojection_error"] is not None]
    megapixels = n * h * w / 1e6
    metrics: dict[str, Any] = {
        "report": report,
        "sections": n,
        "reference": ref,
        "failed_sections": failed,
        "fallback_sections": [r["section"] for r in report if r["fallback"]],
        "identity_sections": identity,
        "inliers_mean": float(np.mean(inl)) if inl else 0.0,
        "inliers_min": int(min(inl)) if inl else 0,
        "reprojection_error_mean": float(np.mean(errs)) if errs else None,
        "refined_sections": [r["section"] for r in report if r.get("refined")],
        "mask_source": ("given" if masks is not None else "automatic") if opts.use_masks else "none",
        "seconds_alignment": t_align,
        "seconds_warp": t_warp,
        "megapixels": megapixels,
        "megapixels_per_second": megapixels / t_align if t_align > 0 else None,
        "seconds": time.perf_counter() - start,
    }
    if solve_info is not None:
        metrics["solver"] = solve_info
    metrics["distortion"] = distortion
    if drift_info is not None:
        metrics["drift_correction"] = drift_info
    if track_info is not None:
        metrics["track_shift"] = track_info
    if fields is not None:
        norm = np.linalg.norm(fields, axis=-1)
        metrics["elastic"] = {
            "seconds": t_elastic, "grid": list(fields.shape[1:3]),
            "displacement_mean": float(norm.mean()), "displacement_max": float(norm.max()),
            "displacement_per_section": [float(v) for v in norm.mean(axis=(1, 2))],
        }  # fmt: skip
    metrics["blank_sections"] = {int(k): why for k, why in sorted(sections.blank.items())}
    if sections.blank:
        listed = ", ".join(f"{k} ({why})" for k, why in sorted(sections.blank.items()))
        metrics["notes"] = [
            f"Sections without content got their neighbour's map (identity fallback) and were skipped "
            f"as neighbours: {listed}."
        ]
    for key in ("skipped", "note"):
        if drift_info is not None and key in drift_info:
            metrics.setdefault("notes", []).append(drift_info[key])
    if track_info is not None and "note" in track_info:
        metrics.setdefault("notes", []).append(track_info["note"])
    if opts.use_masks and sections.mask_fraction:
        metrics["mask_fraction_mean"] = float(np.mean(list(sections.mask_fraction.values())))
    settings = {
        "method": "mito",
        "detector": det, "descriptor": desc, "matcher": mat, "model": mod,
        # "auto" where asked (the section it ended in: "reference_applied", also metrics["reference"])
        "reference": "auto" if auto_reference else ref, "reference_applied": ref,
        "ransac_threshold": opts.ransac_threshold, "ratio": opts.ratio, "workers": workers,
        "use_masks": opts.use_masks, "max_keypoints": opts.max_keypoints, "scale": opts.scale,
        "smooth": opts.smooth, "mask_dilation": opts.mask_dilation, "border": opts.border,
        # session 43: as asked (None: the keypoints' masks); "_applied": the dilation the background's masks
        # had, None where no background reading could run (no masks, or drift_correction other than "auto")
        "background_mask_dilation": opts.background_mask_dilation,
        "background_mask_dilation_applied": opts.background_dilation if opts.use_masks and auto else None,
        # session 44: as asked (None: off); what moved: metrics["track_shift"]
        "track_shift": opts.track_shift,
        "min_inliers": opts.min_inliers, "fallback": list(fb), "max_skip": opts.max_skip,
        "mito_radius": mito_radius, "fast_threshold": opts.fast_threshold, "max_scale": opts.max_scale,
        "keypoint_size": sections.keypoint_size / opts.scale,
        "model_selection": opts.model_selection, "refine": opts.refine,
        # the global solve's options only where it ran (a chain would record unused defaults)
        "neighbours": neighbours, "solver": solver,
        "global_model": global_model if solver == "global" else None,
        "drift_prior": drift_prior if solver == "global" else None,
        "guided_pairs": guided_pairs, "drift_correction": drift_correction, "drift_window": drift_window,
        # what ran: "none", "detrend" or "detrend-slope" (only the background's slope removed, where
        # "auto" found both drifting; metrics["drift_correction"]["auto"] has its test)
        "drift_correction_applied": drift_info["method"] if drift_info is not None else "none",
        # "auto" where asked (what ran: "elastic_applied"; metrics["distortion"] has the reading)
        "elastic": "auto" if elastic_auto else elastic, "elastic_applied": elastic,
        "elastic_spacing": elastic_spacing, "elastic_radius": elastic_radius,
        "elastic_iterations": elastic_iterations, "elastic_solver": elastic_solver,
        "elastic_landmarks": elastic_landmarks,
        # session 32: who reads the organelles' drift under the elastic step ("local": .organelles), as
        # asked; what decided (session 33, review 2 of session 32 A5): _organelle_reading_applied
        "organelle_reading": organelle_reading,
        "organelle_reading_applied": _organelle_reading_applied(drift_info),
        # session 45: as asked (None: off); where it read: metrics["drift_correction"]["auto"]["kept_reading"]
        "kept_reading": kept_reading,
    }  # fmt: skip
    transform.settings = dict(settings)
    return Registration(warped=warped, transform=transform, metrics=metrics, settings=settings)


def check_kept_reading(kept_reading, use_masks: bool) -> str | None:
    """``align_stack(kept_reading=...)`` checked (session 45): None (off) or one of :data:`KEPT_READINGS`
    (any case), which reads the mitochondria and so needs masks (``use_masks``); else :class:`InputError`."""
    if kept_reading is None:
        return None
    if not isinstance(kept_reading, str) or kept_reading.lower() not in KEPT_READINGS:
        raise InputError(
            f"kept_reading must be None (off) or one of {', '.join(repr(k) for k in KEPT_READINGS)}, "
            f"got {kept_reading!r}."
        )
    if not use_masks:
        raise InputError(
            f"kept_reading={kept_reading!r} reads the mitochondria against the tissue; it needs masks "
            "(give masks, or use detector='mito' / use_masks=True to detect them)."
        )
    return kept_reading.lower()


def _organelle_reading_applied(drift_info: dict | None) -> str:
    """What decided whose the positions' trend is (``settings["organelle_reading_applied"]``, session 33;
    :func:`_auto_decision` records it as ``metrics["drift_correction"]["auto"]["decided_by"]``):
    ``"local"`` where :mod:`.organelles`' reading decided ("organelles", "sections" or "both"),
    ``"background"`` where the background did (asked, or fallen back to from an undecided or too thin
    local reading; "undecided" and "unmeasured" included), ``"trend-test"`` where the variogram test
    decided alone (no background, or distorted sections whose background could not tell), ``"none"``
    where no decision ran (no ``"auto"`` drift correction, no trend, too few placed sections);
    ``"kept-local"`` (session 45, ``kept_reading="local"``) where the local reading turned the background's
    "sections" into "both"."""
    test = (drift_info or {}).get("auto") or {}
    return str(test.get("decided_by", "none"))


def build_options(
    shape, detector, descriptor, matcher, model, use_masks, ransac_threshold, ratio, max_keypoints,
    scale, smooth, mask_dilation, border, min_inliers, fallback, max_skip, mito_radius,
    fast_threshold, max_scale, keypoint_size=None, model_selection=True, masks_given=False,
    refine=True, background_mask_dilation=None, track_shift=None,
) -> _Options:  # fmt: skip
    """Validate the options of :func:`align_stack` (shared with :func:`.engine.match_pair`).

    Every value is type- and range-checked (``InputError`` naming the option otherwise).
    """
    det = ft.check_choice(detector, ft.DETECTORS, "detector")
    desc = ft.check_choice(descriptor, ft.DESCRIPTORS, "descriptor")
    mat = ft.check_choice(matcher, ft.MATCHERS, "matcher")
    mod = ft.check_choice(model, ft.MODELS, "model")
    fb = _check_fallback(fallback)
    if use_masks is None:
        use_masks = det == "mito" or masks_given
    elif not check_bool("use_masks", use_masks) and det == "mito":
        raise InputError("detector='mito' always uses mitochondria masks; choose 'fast' to use none.")
    scale = _auto_scale(shape) if scale is None else scale

    def optional(name, value, low, high):
        return None if value is None else check_float(name, value, low, high, low_open=True)

    if background_mask_dilation is not None:
        background_mask_dilation = check_float("background_mask_dilation", background_mask_dilation, 0, 10**4)
        if not use_masks:
            raise InputError(
                "background_mask_dilation sets the mitochondria masks the background reading leaves out; "
                "it needs masks (give masks, use_masks=True or detector='mito'), or leave it at None."
            )
    if track_shift is not None:
        if not isinstance(track_shift, str) or track_shift.lower() not in TRACK_SHIFTS:
            raise InputError(
                f"track_shift must be None (off) or one of {', '.join(repr(t) for t in TRACK_SHIFTS)}, "
                f"got {track_shift!r}."
            )
        track_shift = track_shift.lower()
        if not use_masks or not check_bool("refine", refine):
            raise InputError(
                "track_shift reads the refined tracks inside the mitochondria; it needs masks (give masks, "
                "use_masks=True or detector='mito') and refine=True, or leave it at None."
            )

    return _Options(
        detector=det, descriptor=desc, matcher=mat, model=mod, use_masks=use_masks,
        ransac_threshold=check_float("ransac_threshold", ransac_threshold, 0, 1000, low_open=True),
        ratio=check_float("ratio", ratio, 0, 1, low_open=True),
        max_keypoints=check_int("max_keypoints", max_keypoints, 4, 10**7),
        scale=check_float("scale", scale, 0, 1, low_open=True),
        smooth=check_float("smooth", smooth, 0, 100),
        mask_dilation=check_float("mask_dilation", mask_dilation, 0, 10**4),
        border=check_int("border", border, 0, 10**4),
        min_inliers=check_int("min_inliers", min_inliers, 1, 10**6), fallback=fb,
        max_skip=check_int("max_skip", max_skip, 1, 10**4),
        mito_radius=optional("mito_radius", mito_radius, 0, 10**4),
        fast_threshold=check_int("fast_threshold", fast_threshold, 1, 255),
        max_scale=check_float("max_scale", max_scale, 1, 100),
        keypoint_size=optional("keypoint_size", keypoint_size, 0, 10**4),
        model_selection=check_bool("model_selection", model_selection),
        refine=check_bool("refine", refine),
        background_mask_dilation=background_mask_dilation, track_shift=track_shift,
    )  # fmt: skip


def _check_fallback(fallback) -> tuple[str, ...]:
    """The ``fallback`` detectors as lower-case names; ``InputError`` for anything else."""
    usage = f"give a detector name or a list of them ({', '.join(ft.DETECTORS[1:])}), or 'identity'"
    if fallback is None:
        return ()
    if isinstance(fallback, str):
        fallback = (fallback,)
    if not isinstance(fallback, (list, tuple)) or not all(isinstance(f, str) for f in fallback):
        raise InputError(f"Option fallback must be detector names; {usage}, got {fallback!r}.")
    fb = tuple(f.lower() for f in fallback)
    for f in fb:
        if f != "identity":
            ft.check_choice(f, ft.DETECTORS[1:], "fallback detector")
    return fb


#: Names :func:`align_stack` takes besides the stack, for checks of option names elsewhere.
STACK_OPTIONS = tuple(
    name for name in inspect.signature(align_stack).parameters if name not in ("stack", "progress", "cancel")
)


def _reference(reference, n: int) -> int:
    """The section the alignment starts from (``"auto"``: 0; :data:`.detrend.DEFAULT_REFERENCE`)."""
    if isinstance(reference, str):
        if reference.lower() in ("middle", "centre", "center"):
            return (n - 1) // 2
        if reference.lower() == "auto":
            return 0
        raise InputError(f"reference must be a section index, 'middle' or 'auto', got {reference!r}.")
    r = check_int("reference", reference)
    if r < 0:
        r += n
    if not 0 <= r < n:
        raise InputError(f"reference {reference} is outside the stack of {n} sections.")
    return r


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _normalise(m: np.ndarray) -> np.ndarray:
    return m / m[2, 2] if abs(m[2, 2]) > 1e-12 else m


def _jsonable(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating, float)):
            v = float(v) if math.isfinite(v) else None
        elif isinstance(v, np.bool_):
            v = bool(v)
        out[k] = v
    return out


# -- warping ------------------------------------------------------------------------------------
_LINEAR_DTYPES = {np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32, np.float64)}


def _warp_one(section: np.ndarray, matrix_yx: np.ndarray, labels: bool, field=None) -> np.ndarray:
    h, w = section.shape
    if field is not None:
        return _warp_elastic_one(section, matrix_yx, field, labels)
    m = ft.yx_to_xy(matrix_yx)
    if labels:
        return _warp_labels_one(section, m)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    src = section if section.dtype in _LINEAR_DTYPES else section.astype(np.float32)
    return cv2.warpPerspective(src, m, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _warp_labels_one(section: np.ndarray, matrix_xy: np.ndarray) -> np.ndarray:
    """Nearest-neighbour warp of a label section, the same code path for every dtype.

    The labels become one int32 index image (0 reserved for outside), which OpenCV warps with
    nearest neighbour; the values are looked up afterwards. Which source pixel lands where thus
    never depends on the dtype (uint8 and int64 labels give the same picture), and values are
    kept exactly.
    """
    h, w = section.shape
    index, values = _label_index(section)
    out = cv2.warpPerspective(
        index, matrix_xy, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )  # fmt: skip
    if values is None:  # index = value + 1; outside (0) -> 0
        np.subtract(out, 1, out=out)
        np.maximum(out, 0, out=out)
        return out.astype(section.dtype, copy=False)
    return np.concatenate([np.zeros(1, section.dtype), values]).take(out)


def _warp_elastic_one(section: np.ndarray, matrix_yx: np.ndarray, field: np.ndarray, labels: bool):
    """:func:`_warp_one` through an elastic field (:func:`.elastic.warp_elastic_section`)."""
    if not labels:
        src = section if section.dtype in _LINEAR_DTYPES else section.astype(np.float32)
        return warp_elastic_section(src, matrix_yx, field, cv2.INTER_LINEAR)
    index, values = _label_index(section)
    out = warp_elastic_section(index, matrix_yx, field, cv2.INTER_NEAREST)
    if values is None:
        np.subtract(out, 1, out=out)
        np.maximum(out, 0, out=out)
        return out.astype(section.dtype, copy=False)
    return np.concatenate([np.zeros(1, section.dtype), values]).take(out)


def _label_index(section: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(int32 index image, values)``: pixel value + 1 for integer labels in ``[0, 2**31 - 2]``
    (``values`` None), else 1 + the position of the pixel's value in the sorted distinct ``values``."""
    if section.dtype.kind in "ui" and int(section.min()) >= 0 and int(section.max()) < 2**31 - 1:
        index = section.astype(np.int32)
        np.add(index, 1, out=index)
        return index, None
    values, inverse = np.unique(section, return_inverse=True)
    return (inverse.reshape(section.shape) + 1).astype(np.int32), values


def warp_sections(
    stack,
    matrices,
    labels: bool = False,
    workers: int | None = None,
    lazy: bool = False,
    progress: Progress | None = None,
    step0: int = 0,
    total: int | None = None,
    fields=None,
):
    """Resample every section ``k`` of ``stack`` at ``matrices[k] @ p`` (OpenCV, per section).

    With ``fields`` (``(n, gh, gw, 2)``, see
    :class:`~napari_nephi.core.transform.ElasticSectionTransform`) at
    ``matrices[k] @ (p + fields[k](p))`` instead.

    Linear interpolation for images (input dtype kept where OpenCV interpolates it, else
    float32), nearest neighbour for ``labels`` (dtype and values kept exactly); 0 outside.
    Equivalent to ``PerSectionTransform(matrices).warp / .warp_labels`` but much faster.
    ``lazy=True`` returns a dask array computed one section at a time.
    """
    stack = as_stack(stack, "labels" if labels else "stack")
    mats = np.asarray(matrices, dtype=np.float64)
    n, h, w = (int(s) for s in stack.shape)
    if mats.shape != (n, 3, 3):
        raise DimensionMismatchError(f"{mats.shape[0]} matrices for a stack of {n} sections.")
    dtype = np.dtype(stack.dtype)
    out_dtype = dtype if (labels or dtype in _LINEAR_DTYPES) else np.dtype(np.float32)
    if labels and dtype.kind == "b":
        out_dtype = np.dtype(np.uint8)

    def one(k: int) -> np.ndarray:
        sec = read_section(stack, k)
        if sec.dtype == bool:
            sec = sec.astype(np.uint8)
        field = None if fields is None else fields[k]
        return _warp_one(sec, mats[k], labels, field).astype(out_dtype, copy=False)

    if lazy:
        import dask
        import dask.array as da

        parts = [da.from_delayed(dask.delayed(one)(k), (h, w), out_dtype) for k in range(n)]
        return da.stack(parts)
    what = "aligned masks" if labels else "aligned stack"
    check_memory(
        n * h * w * out_dtype.itemsize, torch.device("cpu"), f"{what} ({n} x {h} x {w}, {out_dtype})",
        "Warp it lazily (lazy=True: each section is computed when it is read, e.g. while writing it to "
        "disk), or align with warp=False and warp the sections you need with warp_sections.",
    )  # fmt: skip
    out = np.empty((n, h, w), dtype=out_dtype)
    total = total if total is not None else n
    with ThreadPoolExecutor(max_workers=int(workers) if workers else _cpu_count()) as ex:
        futs = [ex.submit(one, k) for k in range(n)]
        try:
            for k, f in enumerate(futs):
                out[k] = f.result()
                if progress is not None:
                    progress.step(step0 + k + 1, total, stage=f"warping section {k + 1}/{n}")
        except BaseException:
            for f in futs:
                f.cancel()
            raise
    return out


def warp_masks(reg: Registration, masks, workers: int | None = None, lazy: bool = False):
    """The masks (labels) aligned with ``reg`` (nearest neighbour; values and dtype kept)."""
    fields = getattr(reg.transform, "fields", None)
    return warp_sections(
        masks, reg.transform.matrices, labels=True, workers=workers, lazy=lazy, fields=fields
    )


def detect_mitochondria(stack, radius: float | None = None, workers: int | None = None, labels: bool = True):
    """Automatic mitochondria masks of every section (see :mod:`.masks`), ``(n, y, x)``.

    ``labels=True`` gives connected-component labels per section (uint16), else 0/1 uint8.
    """
    from .masks import label_mask

    stack = as_stack(stack)
    n = int(stack.shape[0])
    intensity = (None, None)
    if np.dtype(stack.dtype) != np.uint8:
        intensity = intensity_range(read_section(stack, 0))

    def one(k: int) -> np.ndarray:
        m = detect_mitochondria_section(to_uint8(read_section(stack, k), *intensity), radius)
        return label_mask(m).astype(np.uint16) if labels else m

    with ThreadPoolExecutor(max_workers=int(workers) if workers else _cpu_count()) as ex:
        return np.stack(list(ex.map(one, range(n))))
