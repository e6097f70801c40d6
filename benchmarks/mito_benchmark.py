"""MITO benchmark: EM section alignment on the full-size synthetic stack, with a peer.

Generates the Lucchi++-sized synthetic stack (160 sections of 768 x 1024, each rotated by a
random angle in (-pi, pi) and padded 250 px to 1268 x 1524) with
:func:`napari_nephi.synthetic.em_stack`, aligns it with every detector/descriptor x BF/FLANN x
with/without masks row of the MITO paper's table, plus MITO with automatic masks and
``pystackreg`` rigid (previous-section reference) as a peer, and prints one table.

Columns:

* ``MP/s``: megapixels of stack per second of alignment (features, matching, fitting and
  composition; the final resampling is timed separately in ``warp s``);
* ``MP/CPU-s``: megapixels per CPU second of the whole process (all threads), which other
  jobs on a shared machine disturb much less than wall time; with ``w`` threads on ``w``
  idle cores the wall-time rate approaches ``w`` times it;
* ``load``: the 1-minute load average at the start or end of the row, whichever is higher;
* ``Dice chain``: mean over sections of the Dice coefficient between the aligned masks and the
  unrotated ground-truth masks. The aligned stack lives in the reference section's frame, so
  it is mapped to the unrotated frame with the reference's known rotation first. Errors of the
  pairwise maps accumulate along the chain of sections;
* ``Dice pair``: the same, but every section is placed by its own pairwise map composed with
  the *true* placement of its neighbour: the accuracy of one pairwise step, without
  accumulation;
* rows run the chain (``neighbours=1``, the engine's default up to session 13) unless named
  otherwise; ``mito-default``: the engine's defaults since session 14 (2 neighbours and the
  global solve with affine sections and ``drift_prior=0.1``; since session 22 with
  ``drift_correction="auto"``, which ``-auto`` rows name and ``-none`` rows turn off);
* ``mito-global``: 3 neighbours and the global solve with rigid sections and no drift prior
  (session 13's settings); ``-affine`` with affine sections, ``-affine-prior`` with
  ``drift_prior=1``;
* ``Dice ref``: the chain Dice measured in the aligned (reference section's) frame, the true
  masks moved there by the reference's known rotation; the only chain Dice of rows with elastic
  refinement (whose fields live in that frame; their ``Dice chain`` is nan);
* ``Dice fit`` (session 36): Dice ref after the best single rigid map (rotation + translation, no
  scale) of the whole aligned stack onto the truth, fitted on the true mitochondria's positions (their
  centroids, weighted by area), not on the Dice (:func:`dice_fit`; the map in the JSON's
  ``frame_fit``). The aligned stack sits in the reference section's frame, whose placement and own
  distortion no aligner of randomly rotated sections can see: Dice ref counts it, Dice fit does not.
  One map for the whole stack: a drift slope, a rotation walk and each section's own error still
  count. The issue's target is stated on Dice ref;
* ``failed``: sections whose primary pair fit failed (fallback used).
* cases (``--cases``): ``default`` today's drift-free stack; ``drift`` / ``strong-drift``
  mitochondria drifting with a population velocity of 0.1 / 0.25 scale px per section
  (``organelle_drift``); ``distorted`` sections deformed smoothly before their rotation
  (``distortion=0.5``); ``drift+distorted`` (0.1 and 0.5); ``jitter`` / ``drift+jitter``
  sections also translated independently by 20 px rms per axis (``placement_shift``), the
  case where detrending the section positions is off by the slope of their scatter;
  ``tissue-drift``: as ``drift``, but the whole tissue (membranes, vesicles, texture) moves with
  the mitochondria's mean velocity (``tissue_drift``): no aligner can tell that from misalignment;
  ``stage-drift`` (session 22): the acquired sections drift as a whole by 0.5 px per section on a
  slowly curving path (``placement_trend``, FIB-SEM / block-face stage drift), part of the truth: an
  aligner recovers it and a drift correction that removes it is wrong; ``stage-drift+drift`` with
  the mitochondria's drift too (only the latter is to be removed); ``stage-drift+distorted`` and
  ``stage-drift+drift+distorted`` (session 25): the same on distorted sections (``distortion=0.5``).
* ``-serial`` rows (session 20): the serial-section preset, ``reference="middle"`` and
  ``drift_correction="auto"`` (``detrend.SERIAL_SECTIONS``); their reference is the middle section
  whatever ``--reference`` says (the Dice is measured in its frame).
* ``-detrend`` rows: ``drift_correction="detrend"`` (the slow trend of the section centres
  through depth removed: one line over the stack; ``-w10`` a local line at every section
  weighted by a Gaussian of sigma 10 sections).
* ``mito-norefine``: MITO without the sub-pixel refinement of the pair maps (``refine=False``),
  i.e. RANSAC on the keypoints alone, as in the paper.
* ``+elastic-joint`` / ``+elastic-local`` rows: ``elastic_solver="joint"`` (session 15: the
  fields' affine part solved for all sections at once from dense flows) or ``"local"`` (every
  section's field from the median of its neighbours' flows, sessions 11-14);
* ``drift``: (once) MITO run on the *unrotated* stack, where the ideal answer is the identity:
  the Dice that pairwise chaining keeps when the structures themselves move between sections.

Usage::

    .venv/bin/python benchmarks/mito_benchmark.py                      # full 160 sections
    .venv/bin/python benchmarks/mito_benchmark.py --sections 20        # reduced
    .venv/bin/python benchmarks/mito_benchmark.py --rows mito,mito-auto --sections 40
    .venv/bin/python benchmarks/mito_benchmark.py --cases default,drift,distorted \
        --rows mito,mito-global,mito-elastic,mito-global+elastic --matchers bf --sections 40

Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import cv2
import numpy as np

from napari_nephi.engines.mito import align_stack
from napari_nephi.engines.mito.align import warp_sections
from napari_nephi.engines.mito.detrend import SERIAL_SECTIONS
from napari_nephi.engines.mito.masks import detect_mitochondria_section
from napari_nephi.synthetic import em_stack

#: The global solve of sessions 11-13: rigid sections, no drift prior.
_RIGID = {"global_model": "rigid", "drift_prior": 0.0}

# name -> (detector, descriptor, use given masks[, extra align_stack options])
ROWS = {
    "mito": ("mito", "brisk", True),
    "mito-norefine": ("mito", "brisk", True, {"refine": False}),
    "mito-auto": ("mito", "brisk", "auto"),
    "mito-orb": ("mito", "orb", True),
    "mito-freak": ("mito", "freak", True),
    "mito-sift": ("mito", "sift", True),
    "orb": ("orb", "orb", False),
    "orb+masks": ("orb", "orb", True),
    "brisk": ("brisk", "brisk", False),
    "brisk+masks": ("brisk", "brisk", True),
    "fast-freak": ("fast", "freak", False),
    "fast-freak+masks": ("fast", "freak", True),
    "fast-brisk": ("fast", "brisk", False),
    "fast-brisk+masks": ("fast", "brisk", True),
    "sift": ("sift", "sift", False),
    "sift+masks": ("sift", "sift", True),
    # multi-neighbour matching + global solve, elastic refinement (issue 15)
    # (every row without "neighbours" is the chain, neighbours=1, as before session 14; the
    # "global" rows keep session 13's rigid sections without a drift prior)
    "mito-global": ("mito", "brisk", True, {"neighbours": 3, **_RIGID}),
    "mito-global-affine": (
        "mito",
        "brisk",
        True,
        {"neighbours": 3, "global_model": "affine", "drift_prior": 0.0},
    ),
    "mito-global-affine-prior": (
        "mito",
        "brisk",
        True,
        {"neighbours": 3, "global_model": "affine", "drift_prior": 1.0},
    ),  # fmt: skip
    "mito-elastic": ("mito", "brisk", True, {"elastic": True}),
    "mito-global+elastic": ("mito", "brisk", True, {"neighbours": 3, "elastic": True, **_RIGID}),
    "fast-brisk-global": ("fast", "brisk", False, {"neighbours": 3, **_RIGID}),
    # drift correction by detrending the section positions through depth (issue 15, session 12)
    "mito-detrend": ("mito", "brisk", True, {"drift_correction": "detrend"}),
    "mito-global-detrend": (
        "mito",
        "brisk",
        True,
        {"neighbours": 3, "drift_correction": "detrend", **_RIGID},
    ),
    "mito-global-detrend-w10": (
        "mito",
        "brisk",
        True,
        {"neighbours": 3, "drift_correction": "detrend", "drift_window": 10, **_RIGID},
    ),  # fmt: skip
    "mito-global+elastic-detrend": (
        "mito",
        "brisk",
        True,
        {"neighbours": 3, "elastic": True, "drift_correction": "detrend", **_RIGID},
    ),  # fmt: skip
    # the engine's defaults since session 14 (2 neighbours, global solve, affine sections, prior 0.1)
    "mito-default": ("mito", "brisk", True, {"neighbours": None}),
    "mito-default-detrend": ("mito", "brisk", True, {"neighbours": None, "drift_correction": "detrend"}),
    "mito-default+elastic": ("mito", "brisk", True, {"neighbours": None, "elastic": True}),
    "mito-default+elastic-detrend": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, "drift_correction": "detrend"},
    ),  # fmt: skip
    # session 15: the elastic fields' affine part solved for all sections at once, and the median's
    # local fields of sessions 11-14 (named, so that both stay comparable whichever is the default;
    # "-joint" rows without the landmarks, which are on by default with the joint solver since
    # session 19; the rows with "elastic": True alone run joint + landmarks since session 19)
    "mito-default+elastic-joint": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, "elastic_solver": "joint", "elastic_landmarks": False},
    ),
    "mito-default+elastic-joint-detrend": (
        "mito",
        "brisk",
        True,
        {
            "neighbours": None,
            "elastic": True,
            "elastic_solver": "joint",
            "elastic_landmarks": False,
            "drift_correction": "detrend",
        },
    ),  # fmt: skip
    # session 17: each flow pair's rotation and translation from the mitochondria regions
    "mito-default+elastic-joint-landmarks": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, "elastic_solver": "joint", "elastic_landmarks": True},
    ),
    "mito-default+elastic-joint-landmarks-detrend": (
        "mito",
        "brisk",
        True,
        {
            "neighbours": None,
            "elastic": True,
            "elastic_solver": "joint",
            "elastic_landmarks": True,
            "drift_correction": "detrend",
        },
    ),  # fmt: skip
    # session 19: drift_correction="auto" (detrend only where the trend is more than the sections'
    # scatter and wander explain); "mito-default+elastic" is joint + landmarks since session 19
    "mito-default-auto": ("mito", "brisk", True, {"neighbours": None, "drift_correction": "auto"}),
    "mito-default+elastic-auto": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, "drift_correction": "auto"},
    ),
    # session 20: the serial-section preset (reference "middle" and drift_correction "auto"; the row's
    # reference wins over --reference)
    "mito-default-serial": ("mito", "brisk", True, {"neighbours": None, **SERIAL_SECTIONS}),
    "mito-default+elastic-serial": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, **SERIAL_SECTIONS},
    ),
    # session 22: drift_correction="auto" is the default (the background decides whose trend it is);
    # these rows keep the placement as solved, the default up to session 21
    "mito-default-none": ("mito", "brisk", True, {"neighbours": None, "drift_correction": "none"}),
    "mito-default+elastic-none": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, "drift_correction": "none"},
    ),
    "mito-default+elastic-local": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, "elastic_solver": "local"},
    ),
    "mito-default+elastic-local-detrend": (
        "mito",
        "brisk",
        True,
        {"neighbours": None, "elastic": True, "elastic_solver": "local", "drift_correction": "detrend"},
    ),  # fmt: skip
    # session 29: elastic="auto" (the elastic step where the pairs' residuals read the sections distorted),
    # and the elastic step off whatever the engine's default (the rows before it ran without)
    "mito-default+elastic-autoel": ("mito", "brisk", True, {"neighbours": None, "elastic": "auto"}),
    "mito-default-noelastic": ("mito", "brisk", True, {"neighbours": None, "elastic": False}),
    # session 32: the organelles' drift read against the tissue around each mitochondrion under the
    # elastic step (organelle_reading="local", the default since session 32; -bgread: as before)
    "mito-default-localread": ("mito", "brisk", True, {"neighbours": None, "organelle_reading": "local"}),
    "mito-default-bgread": ("mito", "brisk", True, {"neighbours": None, "organelle_reading": "background"}),
}

#: Rows of the paper's table (the default ``--rows``); the others are asked for by name.
PAPER_ROWS = tuple(list(ROWS)[:16])

#: Stack cases: name -> em_stack options. "default" is today's drift-free stack.
CASES = {
    "default": {},
    "drift": {"organelle_drift": 0.1},
    "strong-drift": {"organelle_drift": 0.25},
    "distorted": {"distortion": 0.5},
    "drift+distorted": {"organelle_drift": 0.1, "distortion": 0.5},
    "jitter": {"placement_shift": 20.0},
    "drift+jitter": {"organelle_drift": 0.1, "placement_shift": 20.0},
    "tissue-drift": {"organelle_drift": 0.1, "tissue_drift": True},
    # session 22: the sections themselves drift (FIB-SEM / block-face stage drift), 0.5 px per section
    # on a slowly curving path; everything moves, and the truth removes it
    "stage-drift": {"placement_trend": 0.5},
    "stage-drift+drift": {"placement_trend": 0.5, "organelle_drift": 0.1},
    # session 25 (review 1 A1): stage drift on distorted sections (their "sections" must stand)
    "stage-drift+distorted": {"placement_trend": 0.5, "distortion": 0.5},
    "stage-drift+drift+distorted": {"placement_trend": 0.5, "organelle_drift": 0.1, "distortion": 0.5},
    # session 26 (review 2 of session 25, A-open-2): a background moving faster than the 2 px reach around 0
    # (1.2-1.4 px per section), undistorted: it must not read as distorted
    "drift04": {"organelle_drift": 0.4},
    "stage-drift+drift04": {"placement_trend": 0.5, "organelle_drift": 0.4},
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def dice_stack(masks, truth, matrices) -> np.ndarray:
    warped = warp_sections(masks, matrices, labels=True)
    return np.array([dice(w, t) for w, t in zip(warped, truth)])


def true_masks_in_reference(data, ref: int) -> np.ndarray:
    """The true (unrotated) masks moved into the reference section's frame by its known rotation."""
    to_ref = np.linalg.inv(data["matrices"][ref])
    return warp_sections(
        data["unrotated_masks"], np.repeat(to_ref[None], len(data["matrices"]), axis=0), labels=True
    )


def dice_reference_frame(matrices, data, ref: int, fields=None, warped=None, truth=None) -> np.ndarray:
    """Dice per section in the aligned (reference section's) frame: the aligned masks (through
    the elastic ``fields`` when given) against the true masks moved into that frame by the
    reference's known rotation (``warped`` / ``truth``: either, when already made)."""
    if truth is None:
        truth = true_masks_in_reference(data, ref)
    if warped is None:
        warped = warp_sections(data["masks"], matrices, labels=True, fields=fields)
    return np.array([dice(w, t) for w, t in zip(warped, truth)])


def _label_centroids(labels: np.ndarray) -> dict[int, tuple[float, float, int]]:
    """Label -> (mean y, mean x, pixels) of a 2D label image (0 is background)."""
    idx = np.flatnonzero(labels)
    if idx.size == 0:
        return {}
    lab = labels.ravel()[idx].astype(np.int64)
    y, x = np.divmod(idx, labels.shape[1])
    count = np.bincount(lab)
    sy, sx = np.bincount(lab, weights=y), np.bincount(lab, weights=x)
    return {int(v): (sy[v] / count[v], sx[v] / count[v], int(count[v])) for v in np.flatnonzero(count)}


def rigid_fit(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The rigid map (rotation + translation, homogeneous (y, x) 3 x 3) that takes the points ``src``
    ((m, 2), (y, x)) closest to ``dst`` in the ``weights``-weighted least-squares sense (Kabsch in 2D)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    ms, md = w @ src, w @ dst
    a, b = src - ms, dst - md
    theta = np.arctan2(w @ (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]), w @ (a * b).sum(1))
    c, s = np.cos(theta), np.sin(theta)
    g = np.eye(3)
    g[:2, :2] = [[c, -s], [s, c]]
    g[:2, 2] = md - g[:2, :2] @ ms
    return g


def _error_line(at: np.ndarray, error: np.ndarray, weights: np.ndarray) -> dict:
    """The straight line through the sections' mean error (``error`` (m, 2) of points in sections ``at``,
    weighted): its slope (px per section) and its rms over the sections (weights: their total weight)."""
    ks = np.unique(at)
    w = np.array([weights[at == k].sum() for k in ks])
    mean = np.array([weights[at == k] @ error[at == k] / w[i] for i, k in enumerate(ks)])
    if len(ks) < 2:
        return {"slope": [0.0, 0.0], "slope_rms": 0.0}
    dk = ks - (w @ ks) / w.sum()
    slope = (w * dk) @ (mean - (w @ mean) / w.sum()) / float((w * dk) @ dk)
    return {
        "slope": [float(v) for v in slope],
        "slope_rms": float(np.sqrt((w @ (dk**2)) / w.sum()) * np.hypot(*slope)),
    }


def dice_fit(matrices, data, ref: int, fields=None, warped=None, truth=None) -> tuple[np.ndarray, dict]:
    """Dice per section after the best single rigid map of the whole aligned stack onto the truth
    (session 36), and the map.

    An aligner of randomly rotated sections can only align them to each other: the stack comes out in
    the reference section's frame, whose own placement (and distortion) no aligner can see. ``Dice ref``
    counts that frame; this Dice does not. The map is fitted on the true mitochondria's positions, not
    on the Dice: every mitochondrion of every section (the same label in both) gives its centroid in the
    aligned masks and in the true masks moved into the reference's frame, and one rotation and translation
    for the whole stack takes the first onto the second (least squares weighted by the true area). The
    true masks are then moved by its inverse (the same as moving the aligned stack by it; rigid maps keep
    areas). One map for all sections: a drift slope along the stack, a rotation walk, scale, shear and
    every section's own error stay; only their common part goes. That common part includes a slope's
    mean: with the reference at the stack's end, the offset of half the end-to-end drift (the slope itself
    is left, and reported; Dice fit does not depend on which section is the reference).

    Returns the Dice per section and ``{"rotation": rad, "shift": (y, x) px at the centroids' mean,
    "rms_before": px, "rms_after": px, "points": n, "slope": (y, x) px per section, "slope_rms": px}``:
    the centroid error's weighted rms before and after the map, and the straight line through the
    sections' mean centroid error after it (weighted least squares over the section index): its slope
    and the rms of the line over the sections (review 1 of session 36, A1). ``warped`` / ``truth``: the
    aligned masks and the true masks in the reference's frame, when already made."""
    n = len(matrices)
    if warped is None:
        warped = warp_sections(data["masks"], matrices, labels=True, fields=fields)
    inv_ref = np.linalg.inv(data["matrices"][ref])
    if truth is None:
        truth = true_masks_in_reference(data, ref)
    src, dst, wt, at = [], [], [], []
    for k, (w, t) in enumerate(zip(warped, truth)):
        cw, ct = _label_centroids(w), _label_centroids(t)
        for v in sorted(set(cw) & set(ct)):
            src.append(cw[v][:2])
            dst.append(ct[v][:2])
            wt.append(ct[v][2])
            at.append(k)
    if not src:  # no mitochondria anywhere: nothing to fit, the reference frame as it is
        return np.array([dice(w, t) for w, t in zip(warped, truth)]), {
            "rotation": 0.0, "shift": [0.0, 0.0], "rms_before": float("nan"), "rms_after": float("nan"),
            "points": 0, "slope": [0.0, 0.0], "slope_rms": float("nan"),
        }  # fmt: skip
    src, dst, wt = np.array(src), np.array(dst), np.array(wt, dtype=np.float64)
    g = rigid_fit(src, dst, wt)
    moved = src @ g[:2, :2].T + g[:2, 2]
    centre = (wt @ src) / wt.sum()
    fit = {
        "rotation": float(np.arctan2(g[1, 0], g[0, 0])),
        "shift": [float(v) for v in (g[:2, :2] @ centre + g[:2, 2] - centre)],
        "rms_before": float(np.sqrt(wt @ ((src - dst) ** 2).sum(1) / wt.sum())),
        "rms_after": float(np.sqrt(wt @ ((moved - dst) ** 2).sum(1) / wt.sum())),
        "points": int(len(src)),
        **_error_line(np.array(at), moved - dst, wt),
    }
    truth = warp_sections(data["unrotated_masks"], np.repeat((inv_ref @ g)[None], n, axis=0), labels=True)
    return np.array([dice(w, t) for w, t in zip(warped, truth)]), fit


def evaluate(matrices, data, ref: int, fields=None) -> dict:
    """Chain and pair Dice of ``matrices`` (aligned -> original section, (y, x)); with elastic
    ``fields`` the chain Dice is measured in the reference frame (:func:`dice_reference_frame`)."""
    true = data["matrices"]
    chain = matrices @ true[ref]  # unrotated frame -> section k
    pair = np.empty_like(matrices)
    for k in range(len(matrices)):
        if k == ref:
            pair[k] = true[k]
            continue
        j = k - 1 if k > ref else k + 1
        p = matrices[k] @ np.linalg.inv(matrices[j])  # estimated section j -> section k
        pair[k] = p @ true[j]
    d_chain = dice_stack(data["masks"], data["unrotated_masks"], chain)
    d_pair = dice_stack(data["masks"], data["unrotated_masks"], pair)
    warped = warp_sections(data["masks"], matrices, labels=True, fields=fields)
    truth = true_masks_in_reference(data, ref)
    d_ref = dice_reference_frame(matrices, data, ref, warped=warped, truth=truth)
    d_fit, fit = dice_fit(matrices, data, ref, warped=warped, truth=truth)
    others = np.arange(len(matrices)) != ref
    return {
        "dice_chain": float(d_chain.mean()) if fields is None else float("nan"),
        "dice_chain_min": float(d_chain.min()) if fields is None else float("nan"),
        "dice_ref": float(d_ref.mean()),
        "dice_pair": float(d_pair[others].mean()) if others.any() else 1.0,
        "dice_fit": float(d_fit.mean()),
        "frame_fit": fit,
    }


def run_mito(data, name, matcher, args) -> dict:
    det, desc, masks, *extra = ROWS[name]
    kw = dict(
        detector=det, descriptor=desc, matcher=matcher, model=args.model, reference=args.reference,
        workers=args.workers, warp=False,
    )  # fmt: skip
    kw["neighbours"] = 1  # the chain, unless the row says otherwise (None: the engine's default)
    kw.update(extra[0] if extra else {})
    kw.update(args.extra)
    if masks is True:
        kw["masks"] = data["masks"]
    elif masks == "auto":
        kw["use_masks"] = True
    else:
        kw["use_masks"] = False
    load = os.getloadavg()[0]
    cpu = time.process_time()
    reg = align_stack(data["stack"], **kw)
    cpu = time.process_time() - cpu
    m = reg.metrics
    t0 = time.perf_counter()  # the aligned stack, as align_stack(warp=True) makes it
    fields = getattr(reg.transform, "fields", None)
    warp_sections(data["stack"], reg.transform.matrices, workers=args.workers, fields=fields)
    warp_s = time.perf_counter() - t0
    res = evaluate(reg.transform.matrices, data, m["reference"], fields)
    res.update(
        mp_s=m["megapixels_per_second"],
        mp_cpu_s=m["megapixels"] / cpu,
        load=max(load, os.getloadavg()[0]),
        seconds=m["seconds_alignment"],
        warp_s=warp_s,
        failed=len(m["failed_sections"]),
        identity=len(m["identity_sections"]),
        inliers=m["inliers_mean"],
    )
    if "distortion" in m:  # session 29: the sections' distortion reading (elastic="auto" decides on it)
        res["distortion"] = {**m["distortion"], "elastic_applied": reg.settings["elastic_applied"]}
    if "auto" in m.get("drift_correction", {}):  # drift_correction="auto": what it chose, and why
        res["drift_auto"] = {"applied": m["drift_correction"]["method"], **m["drift_correction"]["auto"]}
    return res


def run_pystackreg(data, args) -> dict:
    from pystackreg import StackReg

    stack = data["stack"].astype(np.float32)
    load = os.getloadavg()[0]
    t0, cpu = time.perf_counter(), time.process_time()
    sr = StackReg(StackReg.RIGID_BODY)
    tmats = sr.register_stack(stack, reference="previous", verbose=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu
    # tmats[k]: (x, y) map from the output (section 0's frame) to section k; reference = 0
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    mats = np.stack([swap @ t @ swap for t in tmats])
    mats = mats @ np.linalg.inv(mats[0])
    res = evaluate(mats, data, 0)
    mp = stack.size / 1e6
    res.update(
        mp_s=mp / seconds, mp_cpu_s=mp / cpu, load=max(load, os.getloadavg()[0]), seconds=seconds,
        warp_s=0.0, failed=0, identity=0, inliers=float("nan"),
    )  # fmt: skip
    return res


def auto_mask_quality(data, sample: int = 8) -> dict:
    ks = np.linspace(0, len(data["stack"]) - 1, min(sample, len(data["stack"]))).astype(int)
    t0 = time.perf_counter()
    d = [dice(detect_mitochondria_section(data["stack"][k]), data["masks"][k]) for k in ks]
    return {
        "dice_mean": float(np.mean(d)),
        "dice_min": float(np.min(d)),
        "ms_per_section": 1e3 * (time.perf_counter() - t0) / len(ks),
    }


def run_case(case: str, rows, args) -> list[dict]:
    """Every row (and the drift control and the peer) on one stack case; the result rows."""
    results: list[dict] = []
    t0 = time.perf_counter()
    data = em_stack(args.sections, tuple(args.shape), seed=args.seed, pad=args.pad, **CASES[case])
    n, h, w = data["stack"].shape
    print(
        f"# case {case} {CASES[case]}: stack {n} x {h} x {w} ({n * h * w / 1e6:.0f} MP), "
        f"generated in {time.perf_counter() - t0:.1f} s; "
        f"{os.cpu_count()} CPUs, OpenCV {cv2.__version__}, {platform.processor() or platform.machine()}"
    )
    aq = auto_mask_quality(data)
    print(
        f"# automatic masks vs true masks: Dice {aq['dice_mean']:.3f} (min {aq['dice_min']:.3f}), "
        f"{aq['ms_per_section']:.0f} ms/section"
    )
    header = (
        f"{'row':<19} {'matcher':<6} {'MP/s':>7} {'MP/CPU-s':>8} {'load':>5} {'align s':>8} {'warp s':>7} "
        f"{'Dice chain':>10} {'min':>6} {'Dice ref':>8} {'Dice fit':>8} {'Dice pair':>9} "
        f"{'failed':>6} {'inliers':>7}"
    )
    print(header)
    print("-" * len(header))

    def show(name, matcher, r):
        results.append({"case": case, "row": name, "matcher": matcher, "auto_masks": aq, **r})
        print(
            f"{name:<19} {matcher:<6} {r['mp_s']:7.1f} {r['mp_cpu_s']:8.1f} {r['load']:5.1f} "
            f"{r['seconds']:8.2f} {r['warp_s']:7.2f} {r['dice_chain']:10.3f} {r['dice_chain_min']:6.3f} "
            f"{r['dice_ref']:8.3f} {r['dice_fit']:8.3f} {r['dice_pair']:9.3f} {r['failed']:6d} "
            f"{r['inliers']:7.1f}",
            flush=True,
        )
        if r.get("frame_fit"):  # review 2 of session 36, A2: Dice fit is read with the slope it keeps
            f = r["frame_fit"]
            (sy, sx), (ly, lx) = f["shift"], f["slope"]
            print(
                f"#   frame_fit: rotation {f['rotation']:.4f} rad, shift ({sy:.2f}, {sx:.2f}) px, "
                f"slope ({ly:.3f}, {lx:.3f}) px per section, line rms {f['slope_rms']:.2f} px",
                flush=True,
            )
        if "drift_auto" in r:
            a = r["drift_auto"]
            bg = a.get("background")
            why = "" if bg is None else f", background {bg['decision']}, share {bg['share']:.2f}"
            if bg is not None and bg.get("unread") is not None:  # session 25: pairs without a step
                alone = bg.get("trend_test_alone", False)  # what ran (session 25's rule), recorded
                why += f", unread {bg['unread']:.2f}" + (
                    (" (distorted: the trend test decides)" if alone else " (distorted)")
                    if bg["distorted"]
                    else ""
                )
            if bg is not None and bg.get("toward", [0, 0]) != [0, 0]:  # session 26: also searched there
                why += f", searched toward {bg['toward']}"
            if bg is not None and bg.get("followed") is not None:  # session 28: and the background's own step
                why += f", followed {bg['followed']}"
            print(
                f"#   drift_correction auto: {a['applied']} (q {a['q']:.1f}, p {a['p']:.2g}{why})", flush=True
            )
        if "distortion" in r:  # session 29: what elastic="auto" reads (also where elastic is on or off)
            d = r["distortion"]
            value = "unmeasured" if d["correlation"] is None else f"{d['correlation']:.4f}"
            if d.get("se") is not None:  # session 30: the ring reading's standard error, the same-point one
                value += f" +- {d['se']:.4f}"
            if d.get("same_point") is not None:
                value += f", same point {d['same_point']:.3f}"
            if d.get("corrected") is not None:  # session 33: the ring reading less its lag-2 share
                c_se = "" if d.get("corrected_se") is None else f" +- {d['corrected_se']:.4f}"
                rule = "on" if d.get("corrected_rule") else "off"
                value += (
                    f", lag-corrected {d['corrected']:.4f}{c_se} (rule {rule}, read by {d.get('read_by')})"
                )
            print(
                f"#   distortion: residual correlation {value} (limit {d['limit']:g}, {d['points']} points), "
                f"elastic {d['elastic']} -> {'on' if d['elastic_applied'] else 'off'}",
                flush=True,
            )

    for name in rows:
        for matcher in args.matchers.split(","):
            show(name, matcher, run_mito(data, name, matcher, args))
    if not args.no_drift:
        flat = dict(data)
        flat["stack"], flat["masks"] = data["unrotated_stack"], data["unrotated_masks"]
        flat["matrices"] = np.repeat(np.eye(3)[None], n, axis=0)
        show("drift (unrotated)", "bf", run_mito(flat, "mito", "bf", args))
    if not args.no_peer:
        try:
            show("pystackreg rigid", "-", run_pystackreg(data, args))
        except ImportError:
            print("pystackreg not installed: pip install pystackreg")
    return results


def bgm_looks() -> tuple:
    """``background.SECOND_LOOKS`` (the values ``--second-look`` takes)."""
    from napari_nephi.engines.mito import background as bgm

    return bgm.SECOND_LOOKS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", type=int, default=160)
    p.add_argument("--shape", type=int, nargs=2, default=(768, 1024))
    p.add_argument("--pad", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(PAPER_ROWS), help="comma-separated rows, or 'all'")
    p.add_argument("--cases", default="default", help=f"comma-separated stack cases: {', '.join(CASES)}")
    p.add_argument("--matchers", default="bf,flann")
    p.add_argument("--model", default="homography")
    p.add_argument("--reference", default="auto", help="index, 'middle' or 'auto' (the engine's default)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--no-peer", action="store_true", help="skip pystackreg")
    p.add_argument("--no-drift", action="store_true", help="skip the drift (unrotated stack) row")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="align_stack option")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--distortion-corrected", choices=("on", "off"), default=None,
        help="elastic='auto' also reads the lag-corrected distortion reading (distortion.CORRECTED, "
        "session 33); default: the engine's",
    )  # fmt: skip
    p.add_argument(
        "--second-look", choices=bgm_looks(), default=None,
        help="background.SECOND_LOOK (which first looks of drift_correction='auto' get a second; "
        "the engine's default since session 40: sections; the earlier rule: undecided, with --se-floor "
        "0.02); default: the engine's",
    )  # fmt: skip
    p.add_argument(
        "--se-floor", type=float, default=None,
        help="background.SE_FLOOR (the engine's default since session 40: 0.06; the earlier rule: 0.02, with "
        "--second-look undecided); default: the engine's",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.second_look is not None or args.se_floor is not None:  # module settings, recorded per row
        from napari_nephi.engines.mito import background as bgm

        bgm.SECOND_LOOK = bgm.SECOND_LOOK if args.second_look is None else args.second_look
        bgm.SE_FLOOR = bgm.SE_FLOOR if args.se_floor is None else args.se_floor
        if bgm.SECOND_LOOK == "sections" and bgm.SE_FLOOR < bgm.SECTIONS_MIN_FLOOR:  # the engine refuses it
            p.error(
                f"--second-look sections (the engine's default since session 40) needs --se-floor "
                f"{bgm.SECTIONS_MIN_FLOOR} or more; the earlier rule is --se-floor 0.02 --second-look "
                "undecided (docs/mito.md)"
            )
    if args.distortion_corrected is not None:
        from napari_nephi.engines.mito import distortion

        distortion.CORRECTED = args.distortion_corrected == "on"
    args.reference = int(args.reference) if args.reference.lstrip("-").isdigit() else args.reference
    rows = list(ROWS) if args.rows == "all" else [r for r in args.rows.split(",") if r]
    args.extra = {}
    for item in args.option:
        key, value = item.split("=", 1)
        try:
            args.extra[key] = json.loads(value)
        except json.JSONDecodeError:
            args.extra[key] = value

    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    results = []
    for case in cases:
        results += run_case(case, rows, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
