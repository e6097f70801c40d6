"""Does the rest of the section move where the mitochondria do not? (``drift_correction="auto"``,
session 22.)

A slow trend of the section positions through depth has two causes that keypoints on the
mitochondria cannot tell apart: the organelles drift through the tissue (cut obliquely) while the
sections stay put, or the sections themselves drift (stage or beam drift of a FIB-SEM or
block-face stack, a slow systematic offset of placed ssTEM sections) and everything in them moves
together. After an alignment that pins the mitochondria, the two differ in the rest of the image:
where the organelles drift, the membranes, vesicles and texture move steadily in the aligned
stack (by the positions' trend, every section); where the sections drift, the aligner has undone
it for everything and the rest of the image stays put.

:func:`background_motion` measures that motion: for up to :data:`PAIRS` pairs of neighbouring
sections spread over the stack, a few crops of both are resampled at full resolution into the
aligned frame, the mitochondria (the masks the keypoints used) and the sections' borders are left
out, and the shift between them is the peak of their cross-correlation on band-passed crops (the
finest texture kept; noise, shading and membranes mostly out). Every pair's shift is one
measurement of the background's motion per section; their median is the background's drift per
section, with a standard error from runs of pairs along the stack (the structures' own apparent
motion persists over a few sections). :func:`classify` then compares it with the positions' trend.

Assumption: the tissue around the mitochondria has no common motion through depth of its own (its
structures move at random as they are cut). Where it drifts with the organelles (a whole block
cut obliquely, the benchmark's ``tissue-drift``), nothing in the image can tell that from the
sections drifting, and the trend is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from ...core.options import check_float

#: Neighbour pairs measured (evenly spread over the sections placed by a real match).
PAIRS = 64
#: Side (pixels) of the square crops compared, at full resolution, and their grid: ``GRID x GRID``
#: crops, side by side, centred on the aligned frame (those inside it). Full resolution: the finest
#: texture changes least with depth; coarser structures (membranes cut at an angle, shading) sweep
#: across the section from one section to the next, and their apparent motion, random in
#: direction, did not average out over 80 sections (synthetic seed 6, truth's own frame: 0.25 px per
#: section at a quarter of the resolution, 0.005 px at full resolution; these crops with the true
#: matrices of the rotated stack: 0.03 px; docs/mito.md, session 22).
CROP, GRID = 256, 3
#: Gaussian sigmas (pixels) of the band-pass: noise out below, shading and membranes out above.
FINE_SIGMA, COARSE_SIGMA = 1.0, 2.0
#: Pixels around the mitochondria and the sections' borders left out.
MARGIN = 12
#: Fewer pairs measured than this: no decision (``"unmeasured"``).
MIN_PAIRS = 16
#: Runs of consecutive pairs measured, spread over the stack (:func:`background_motion`).
BLOCKS = 8
#: Sections between the two of a measured pair. Tried in session 23: 2 (the step over two sections,
#: less error per section and no bias on undistorted stacks: 80 sections, seed 1, every pair against
#: the truth, stage drift 0.125 -> 0.000 px per section off, drift 0.100 -> 0.003), but on distorted
#: sections the longer steps lost correlation and read the drift short (share 0.65-0.71): drift +
#: distorted with elastic, seed 1, "both" and Dice 0.957 -> 0.914. Kept at 1 (docs/mito.md).
GAP = 1
#: Largest shift (pixels) searched per pair: the peak is climbed to from 0 within it.
REACH = 2
#: Chi-square (2 degrees of freedom) within which the background's slope agrees with a hypothesis
#: (p 0.01).
AGREE = 9.21
#: Chi-square by which an ``"undecided"`` background must favour the organelles over the sections for the
#: trend test alone to decide (:func:`classify`; a likelihood ratio of 10). A bound, not a fit: a background
#: that does not move favours the organelles by this with probability ``Phi(-(FAVOUR + x^2) / (2 x))`` for
#: a trend ``x`` standard errors long, at most ``Phi(-sqrt(FAVOUR))`` = 1.6 % whatever ``x``; one that
#: moves with the trend passes 63 % of the time at ``x`` 2.5 (drift + distorted with ``elastic=True``:
#: 2.4-2.8), 93 % at 4 (docs/mito.md, session 23).
FAVOUR = 4.6
#: Session 25, the sections' distortion measured: the share of the pairs planned that give no step
#: (:func:`unread`) from which the sections are taken as distorted. It counts pairs without a peak
#: within :data:`REACH` of the steps searched: up to session 25 only around 0, so a strong motion of the
#: background itself read high too (undistorted stage drift + organelle drift 0.4 at 160 sections:
#: 0.22-0.33, review 2 of session 25); since session 26 also around the trend's step (``trend`` in
#: :func:`background_motion`), so that motion as fast as the trend is read (docs/mito.md, session 26).
#: Where the background then cannot
#: tell ("undecided", "unmeasured") the trend test decides alone (``align._auto_decision``). Distorted
#: (cut) sections' texture does not line up within :data:`REACH` after the alignment, and the steps that
#: are found read the drift short (toward the sections'). First look, 64 pairs, generator masks
#: (docs/mito.md, session 25): 17 undistorted stacks at 80 sections (drift, stage drift, stage drift +
#: drift, today's, jitter; seeds 34-36, 24, 26) 0.00-0.03, with ``elastic=True`` 0.02-0.08, tissue
#: drift 0.02, strong drift 0.06-0.17 (flagged at 0.17: its "organelles" stands, the rule asks only
#: undecided readings); drift + distorted with ``elastic=True`` 0.25-0.41 (seeds 1 / 6 / 8 / 10 at 80,
#: 19 / 25 / 27 / 29 / 30 at 160), without it 0.34-0.56.
UNREAD = 0.15
#: Session 26: the trend's length (px per section) from which the pairs are also searched around its
#: step (:func:`background_motion` ``trend``). Below it the background's steps stay well inside the 2 px
#: box around 0 on undistorted sections (pair error 0.4-0.5 px), so nothing is searched elsewhere.
#: Session 27 (review 2 of session 26, A-n2): 0.8 -> 0.6. At 0.8 the edge lay inside the benchmark's
#: strong drift (held-out trends 0.83 / 0.754; the one not searched read unread 0.141 against
#: :data:`UNREAD`; fresh seed 44 at 80 sections 0.722 / 0.125); its trends read 0.68-0.87. The plain
#: stage drift (0.5 px per section) reads 0.45-0.59 and is not searched (0.586 on a distorted stack: 0.014
#: under the edge); no edge separates the kinds: stage drift + drift reads 0.25-0.73, with distortion
#: 0.25-0.78, on both sides of it. Where the search engages on a trend shorter than 0.8 it changed no
#: decision (every kind run, offline, with the trend forced to 0.85: docs/mito.md, session 27): distorted
#: stacks stay flagged (widened unread 0.27-0.52 on this session's, 0.36-0.47 on review 2's, 0.14 on session
#: 26's forced seed 10) and read in the box around 0; undistorted ones read the same decision. CPU: +0.4-0.5
#: s per background where it newly engages (the second climb per pair; 1.17 -> 1.66 s, load ~9).
TOWARD_FROM = 0.6
#: Session 26: :data:`UNREAD` for the box widened toward the trend: a stack is distorted where the box
#: around 0 leaves at least :data:`UNREAD` of the pairs without a step and the widened box at least this
#: (review 1 of session 26, A1). Widened box, offline (docs/mito.md, session 26): undistorted strong
#: motion 0.00-0.05; distorted 0.14-0.39 (0.14: stage drift + distorted, 80 sections, seed 10, its trend
#: set to 0.51 px per section).
UNREAD_WIDE = 0.10
#: Session 37: which first looks get a second one (``align._auto_decision``): ``"undecided"`` (up to
#: session 36) or ``"kept"`` (opt-in; the session 37 candidate with :data:`.detrend.SCREEN_TEST`
#: ``"either"``, which the lead decides on): also an ``"undecided-organelles"`` one where
#: the trend test alone would keep the trend (``p`` at least :data:`.detrend.AUTO_P`), so that the decision
#: comes from twice the pairs rather than from a trend test that heavy scatter blinds (drift + jitter, seed
#: 88: first look se (0.135, 0.085), second (0.077, 0.059) -> "organelles"; docs/mito.md, session 37).
#: Session 38 (session 37 A2's candidate E, with :data:`SE_FLOOR` 0.06): ``"both"``, also a first look that
#: reads ``"both"`` on undistorted sections gets the second look, and both looks' runs decide as after an
#: ``"undecided"`` first look (no :data:`FAVOUR`): one look's 8 runs read a still background as moving
#: about 5 % of the time (their se from 7 degrees of freedom), and the drift+jitter 93 first look read the
#: organelles' drift short in y (share 0.45, "both"; both looks: "organelles", Dice ref 0.851 -> 0.940);
#: ``"kept+both"`` both extensions. A first-look "both" on distorted sections stands as before. Opt-in
#: (with :data:`SE_FLOOR` 0.06; fresh seeds 98 / 99, 16 rows: drift+jitter 99 0.904 -> 0.970, drift 99
#: 0.902 -> 0.972, strong-drift 99 0.880 -> 0.944, drift04 99 0.867 -> 0.901, but tissue-drift 99 0.691 ->
#: 0.610, against its preregistered rule; docs/mito.md, session 38).
#: Session 39 (the session 38 A2 / A3 candidate, gated): ``"sections"``, also a first look that reads
#: ``"sections"`` on undistorted sections while its slope ``b`` lies off 0 (:func:`chi_square_from_0` at
#: least :data:`SECTIONS_C0`) and either along the trend ``s`` (``b . s > 0``: classify's share over 0) or
#: with an se under the floor on an axis gets the second look, decided as after an ``"undecided"`` one. One
#: look of 8 runs cannot reject 0 for an organelle drift of 0.33 px per section at an se of 0.10-0.155
#: (stage-drift+drift 98 / 99: "sections", the whole trend kept, Dice ref 0.604 / 0.641). Under "both" the
#: background's slope is the organelles' part of the trend (``b . s = |v_o|^2 + v_o . v_s``, positive unless
#: the drifts point over 90 deg + asin(|v_o| / |v_s|) apart), while a still background's first look points
#: anywhere, and the ones pointing against the trend are those whose pooled reading lands in "both" most
#: often; where the floor raised the se, the floor may have made the "sections" (a right "both" read at the
#: floor) and a still background's pooled look is read at the floor too. Simulated with :data:`SE_FLOOR`
#: 0.06 (``benchmarks/mito_drift_gate.py``, rule ``S+F+A``; docs/mito.md, session 39). Opt-in then, and only
#: with :data:`SE_FLOOR` at least :data:`SECTIONS_MIN_FLOOR` (0.06): without the floor it failed the
#: simulation (an ``InputError``). It is not combined with ``"both"`` (no ``"sections+both"``: not gated).
#: Session 40: ``"sections"`` (with :data:`SE_FLOOR` 0.06) is the default. Its preregistered rule passed on
#: fresh seeds 106-117 (24 rows, none lost; stage-drift+drift 107 / 108 / 112 / 113 0.55-0.67 -> 0.92-0.96)
#: and the lead's held-out 118 / 119 (10 rows, none lost; stage-drift+drift 119 0.661 -> 0.938; docs/mito.md,
#: session 40). The earlier rule stays reachable: ``SECOND_LOOK = "undecided"`` with :data:`SE_FLOOR` 0.02.
SECOND_LOOKS = ("undecided", "kept", "both", "kept+both", "sections")
SECOND_LOOK = "sections"
#: Session 39: the chi-square from 0 (:func:`chi_square_from_0`) from which a first-look ``"sections"`` is
#: off 0 enough for :data:`SECOND_LOOK` ``"sections"`` (session 38 A2's C0, as A3's gate ran it).
SECTIONS_C0 = 2.0
#: Session 39 (review 1): the smallest :data:`SE_FLOOR` with which :data:`SECOND_LOOK` ``"sections"`` runs
#: (an ``InputError`` under it). The switch was gated only with the floor 0.06 (rule ``S+F+A``); without it
#: (``S+P``, development seed [3838, 38]) a still background under a stage drift was detrended more often
#: than the bound in 3 of 8 stage cells (C2: 407 -> 461, 309 -> 358, 189 -> 215; docs/mito.md, session 39).
SECTIONS_MIN_FLOOR = 0.06
#: Smallest standard error (px per section) trusted per axis of the background's slope (:func:`classify`):
#: a handful of blocks can agree by chance. Session 38: 0.06 with :data:`SECOND_LOOK` ``"both"`` is session 37
#: A2's candidate: the tissue's own apparent motion over a look's runs, read with the generator's true
#: matrices on 6 stacks, is about 0.05 px per section, which 8 runs' spread can under-read (stage drift 86:
#: se (0.046, 0.048), slope (0.156, -0.030), "both" and its slope removed, Dice ref 0.891; at 0.06 "sections",
#: 0.970). The elastic step's local reading keeps its own floor (:data:`.organelles.SE_FLOOR`).
#: Session 40: 0.06 is the default, with :data:`SECOND_LOOK` ``"sections"`` (which needs it; the evidence
#: there). The earlier rule (up to session 39): ``SE_FLOOR = 0.02`` with ``SECOND_LOOK = "undecided"``.
SE_FLOOR = 0.06


def crops(shape) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, height, width)`` of the crops compared (:data:`CROP`, :data:`GRID`), inside ``shape``."""
    h, w = int(shape[0]), int(shape[1])
    ch, cw = min(CROP, h), min(CROP, w)
    out = []
    for i in range(GRID):
        for j in range(GRID):
            y0 = (h - ch) // 2 + (i - (GRID - 1) // 2) * ch
            x0 = (w - cw) // 2 + (j - (GRID - 1) // 2) * cw
            if 0 <= y0 <= h - ch and 0 <= x0 <= w - cw:
                out.append((y0, x0, ch, cw))
    return out


def _prepared(section: np.ndarray, mito: np.ndarray | None, matrix: np.ndarray, boxes):
    """``[(band-passed crop of the section in the aligned frame, weight 0/1)]`` for every box (only
    the part of the section under each crop is read). ``mito`` may be smaller than the section (the
    keypoint stage's masks at its working scale): it is read through the scale (pixel centres)."""
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)
    square = np.ones((2 * MARGIN + 1, 2 * MARGIN + 1), np.uint8)  # the margin: a square (10x faster)
    sh, sw = section.shape
    to_mask = None
    if mito is not None and mito.shape != section.shape:
        ry, rx = mito.shape[0] / sh, mito.shape[1] / sw
        to_mask = np.array([[ry, 0, 0.5 * ry - 0.5], [0, rx, 0.5 * rx - 0.5], [0, 0, 1.0]])
    out = []
    for y0, x0, ch, cw in boxes:
        m = matrix @ np.array([[1.0, 0.0, y0], [0.0, 1.0, x0], [0.0, 0.0, 1.0]])  # crop -> section (y, x)
        corners = m @ np.array([[0, 0, ch, ch], [0, cw, 0, cw], [1.0, 1.0, 1.0, 1.0]])
        lo = np.floor(corners[:2].min(1) - MARGIN - 3).astype(int)
        hi = np.ceil(corners[:2].max(1) + MARGIN + 3).astype(int)
        lo, hi = np.maximum(lo, 0), np.minimum(hi, (sh, sw))
        if np.any(hi - lo < 2):
            out.append((np.zeros((ch, cw), np.float32), np.zeros((ch, cw), np.uint8)))
            continue
        part = section[lo[0] : hi[0], lo[1] : hi[1]]
        shift = np.array([[1.0, 0.0, -lo[0]], [0.0, 1.0, -lo[1]], [0.0, 0.0, 1.0]])
        mx = (swap @ shift @ m @ swap)[:2]  # (x, y); crop pixels -> part pixels
        flags = cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR
        img = cv2.warpAffine(
            part.astype(np.float32), mx, (cw, ch), flags=flags, borderMode=cv2.BORDER_CONSTANT
        )
        # the zero padding of rotated / shifted sections (and outside the part): exactly 0 where all
        # four pixels interpolated are (a pixel less than the padding, well within MARGIN)
        bad = (img == 0).view(np.uint8)
        flags = cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST
        if mito is not None and to_mask is None:
            inside = (mito[lo[0] : hi[0], lo[1] : hi[1]] > 0).view(np.uint8)
            bad |= cv2.warpAffine(inside, mx, (cw, ch), flags=flags, borderMode=cv2.BORDER_CONSTANT)
        if to_mask is not None:  # crop pixels -> mask pixels
            mm = (swap @ to_mask @ m @ swap)[:2]
            bad |= cv2.warpAffine((mito > 0).view(np.uint8), mm, (cw, ch), flags=flags)
        bad = cv2.dilate(bad, square)
        img = cv2.GaussianBlur(img, (0, 0), FINE_SIGMA) - cv2.GaussianBlur(img, (0, 0), COARSE_SIGMA)
        out.append((img, 1 - bad))
    return out


def pair_step(pa, pb, reach: int = REACH, toward=(0, 0)) -> np.ndarray | None:
    """``(2,)`` (y, x) pixels by which the content of section b lies moved from section a (``b(p) ~
    a(p - d)``), from their crops (:func:`_prepared`): the peak of the cross-correlation summed over
    the crops, over the pixels both weights keep (feathered), at whole shifts climbed to from 0 (each
    step to the best of the 3 x 3 around the current one) within ``reach`` pixels, refined by a
    Gaussian through the peak and its neighbours per axis (a correlation peak does not shrink toward 0
    where the content changes, as a gradient step does). None with too few pixels or the peak at the
    edge of the searched box.

    ``toward`` (whole pixels, y, x; session 26): the step the positions' trend predicts for a background
    that moves with it. The box searched then spans ``reach`` around both 0 and ``toward`` and the
    peak is climbed to from both (the higher one kept), so that a background moving as fast as the
    trend is read, not cut off at the edge of a box around 0 (strong organelle drift: pairs beyond the
    reach, read as "distorted" by :func:`unread`). ``(0, 0)``: the box and the climb as before. Several
    steps (``(m, 2)``; session 28, :func:`background_motion`'s ``"followed"``): the box spans 0 and all of
    them, and the peak is climbed to from each in turn (a later one kept only where strictly higher)."""
    r = int(reach)
    starts = [(int(v[0]), int(v[1])) for v in np.reshape(np.asarray(toward, dtype=int), (-1, 2))]
    ys, xs = [0] + [v[0] for v in starts], [0] + [v[1] for v in starts]
    y0, y1, x0, x1 = min(ys) - r, max(ys) + r, min(xs) - r, max(xs) + r
    my, mx = max(-y0, y1), max(-x0, x1)  # the margin of the crops kept for the shifts searched
    parts, total = [], 0.0
    for (a, wa), (b, wb) in zip(pa, pb):
        w = cv2.GaussianBlur((wa & wb).astype(np.float32), (0, 0), 2.0)
        total += float(w[my:-my, mx:-mx].sum())
        parts.append(((a * w)[my:-my, mx:-mx], b * w))
    if total < 2000:
        return None
    c = np.full((y1 - y0 + 1, x1 - x0 + 1), np.nan)

    def at(i, j):
        if np.isnan(c[i, j]):
            dy, dx = i + y0, j + x0
            c[i, j] = sum(  # einsum: no product array (3x faster than multiplying and summing)
                float(
                    np.einsum(
                        "ij,ij->", aw, bw[my + dy : bw.shape[0] - my + dy, mx + dx : bw.shape[1] - mx + dx]
                    )
                )
                for aw, bw in parts
            )
        return c[i, j]

    def climb(i, j):
        while True:
            around = [
                (y, x)
                for y in (i - 1, i, i + 1)
                for x in (j - 1, j, j + 1)
                if 0 <= y < c.shape[0] and 0 <= x < c.shape[1]
            ]
            best = max(around, key=lambda yx: at(*yx))
            if best == (i, j):
                return i, j
            i, j = best

    i, j = climb(-y0, -x0)
    for ty, tx in starts:
        if (ty, tx) != (0, 0):
            other = climb(ty - y0, tx - x0)
            if at(*other) > at(i, j):
                i, j = other
    if not (0 < i < c.shape[0] - 1 and 0 < j < c.shape[1] - 1) or c[i, j] <= 0:
        return None
    return np.array([i + y0 + _vertex(*c[i - 1 : i + 2, j]), j + x0 + _vertex(*c[i, j - 1 : j + 2])])


def _vertex(m: float, z: float, p: float) -> float:
    """Offset of the peak from the middle of three samples: a Gaussian's where all are positive,
    else the parabola's."""
    if min(m, z, p) > 0:
        m, z, p = math.log(m), math.log(z), math.log(p)
    den = m - 2 * z + p
    return 0.0 if den >= 0 else float(np.clip(0.5 * (m - p) / den, -0.5, 0.5))


def sections_read(planned: list[np.ndarray]) -> set[int]:
    """The sections that the pairs ``(k, k + GAP)`` of the runs ``planned`` (:func:`runs`) read."""
    return {int(k) for run in planned for k in (*run, *(run + GAP))}


def runs(use: np.ndarray, pairs: int = PAIRS, second: bool = False) -> list[np.ndarray]:
    """The first sections of the pairs ``(k, k + GAP)`` measured, per run. A run is a stretch of
    consecutive sections in ``use`` (:data:`BLOCKS` of them, spread evenly over the stack, apart from
    each other), and its pairs are all those ``GAP`` apart within it: ``GAP`` interleaved chains
    whose steps add up to the displacement over the stretch. Together at most ``pairs`` pairs.
    ``second``: the stretches half-way between those, without their sections (a second look,
    :func:`second_look`; empty where the first look left no room, e.g. 80 sections)."""
    use = np.asarray(use, bool)
    ks = np.flatnonzero(use[:-1] & use[1:])
    if len(ks) == 0:
        return []
    length = max(1, min(pairs + BLOCKS * (GAP - 1), len(ks)) // BLOCKS)  # neighbour pairs per stretch
    starts = np.linspace(0, len(ks) - length, BLOCKS)
    taken: set[int] = set()
    if second:
        taken = sections_read(runs(use, pairs))
        starts = starts + (starts[1] - starts[0]) / 2 if len(starts) > 1 else starts[:0]
    out = []
    for start in np.unique(starts.round().astype(int)):
        part = ks[start : start + length]
        stretch = (set(part.tolist()) | set((part + 1).tolist())) - taken
        run = np.array(sorted(k for k in stretch if k + GAP in stretch), dtype=int)
        if len(run):
            out.append(run)
    return out


def background_motion(
    read: Callable[[int], np.ndarray],
    mito: Callable[[int], np.ndarray] | None,
    matrices: np.ndarray,
    shape,
    use: np.ndarray,
    pairs: int = PAIRS,
    workers: int = 1,
    second: bool = False,
    trend=None,
) -> dict:
    """The background's motion per section in the aligned frame (see the module doc).

    ``read(k)``: section ``k`` as uint8; ``mito(k)``: its mitochondria (0/1; the section's size, or
    smaller: read through the scale) or None; ``matrices[k]`` maps the aligned frame to section
    ``k``; pairs ``(k, k + GAP)`` with both in ``use`` (:func:`runs`). Returns ``{"slope" (px per
    section, y, x), "se" (its standard error per axis), "pairs" (measured), "gap"}``; ``slope`` is
    comparable with :func:`.detrend.trend_test`'s slope (the positions' trend): equal where the
    organelles drift, 0 where the sections do. ``trend`` (px per section, y, x; session 26): the
    positions' trend, whose step (rounded to whole pixels where the trend is at least :data:`TOWARD_FROM`
    long, recorded as ``"toward"``) each pair's peak is also searched around
    (:func:`pair_step`); where that is not ``[0, 0]``, ``"around_0"`` holds the
    same result from the box around 0 alone (as without ``trend``)."""
    toward = [0, 0]
    if trend is not None and math.hypot(*trend) * GAP >= TOWARD_FROM:
        toward = [int(np.round(v * GAP)) for v in trend]
    out = {
        "slope": [0.0, 0.0],
        "se": [math.inf, math.inf],
        "pairs": 0,
        "planned": 0,
        "gap": GAP,
        "toward": toward,
    }
    # BLOCKS runs of consecutive pairs, spread over the stack: within a run the steps add up to the
    # displacement between its first and last section, so each section's own distortion counts at
    # the run's two ends only, not at every pair (drift + distorted, elastic, 80 sections, seed 19:
    # standard error 0.16 px per section with pairs spread one by one)
    planned = runs(use, pairs, second)
    out["planned"] = sum(len(r) for r in planned)
    if out["planned"] < MIN_PAIRS:
        return out
    boxes = crops(shape)

    def prepare(k):
        return _prepared(read(k), None if mito is None else mito(k), matrices[k], boxes)

    def run_steps(run):
        # each section of a run read and prepared once (pairs (k, k + GAP) and (k + GAP, k + 2 GAP)
        # share k + GAP); one run per task: no waiting between the runs' sections and pairs
        ready = {k: prepare(k) for k in sorted(sections_read([run]))}
        around_0 = [pair_step(ready[k], ready[k + GAP]) for k in run]
        if toward == [0, 0]:
            return around_0, around_0
        return around_0, [pair_step(ready[k], ready[k + GAP], toward=toward) for k in run]

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mito-bg") as ex:
        found = list(ex.map(run_steps, planned))
        follow = followed(found, toward)
        if follow is not None:
            # the pairs read in neither box, climbed again from the background's own step too (session 28)
            def again(job):
                run, (around_0, both) = job
                todo = [i for i, d in enumerate(both) if d is None]
                if not todo:
                    return around_0, both
                ready = {k: prepare(k) for k in sorted(sections_read([run[todo]]))}
                both = list(both)
                for i in todo:
                    k = run[i]
                    both[i] = pair_step(ready[k], ready[k + GAP], toward=[toward, follow])
                return around_0, both

            found = list(ex.map(again, zip(planned, found)))
    motion = _motion([both for _, both in found], out)
    if follow is not None:
        motion["followed"] = follow
    if toward != [0, 0]:  # the box around 0 alone too: what distorted sections are read with
        motion["around_0"] = {
            k: v for k, v in _motion([zero for zero, _ in found], out).items() if k != "toward"
        }
    return motion


def followed(found: list[tuple[list, list]], toward) -> list[int] | None:
    """Session 28: the background's own step (whole pixels, y, x) from which the pairs that the box
    widened toward the trend's step left unread are climbed again, or None. ``found``: per run, the
    steps read around 0 and in the widened box (None: no step). The trend's step is the organelles'
    hypothesis; where the sections drift too the background moves by the organelles' drift alone,
    which can be longer than the trend and lie elsewhere (a stage drift against an organelle drift of
    1.4 px per section, held-out seed 47: trend (-0.48, 0.82), searched toward [0, 1], background
    (-0.91, 1.21); the pairs beyond 1.5 px in y, 0.17 of them, were unread and flagged the undistorted
    stack as distorted). Taken as the median of the widened box's steps, rounded, where the trend's
    step is searched (``toward`` not ``[0, 0]``), at least :data:`MIN_PAIRS` steps were read, some pair
    was not, and it is neither 0 nor ``toward``."""
    if list(toward) == [0, 0]:
        return None
    read = [d for _, both in found for d in both if d is not None]
    missed = sum(d is None for _, both in found for d in both)
    if not missed or len(read) < MIN_PAIRS:
        return None
    step = [int(np.round(v)) for v in np.median(np.asarray(read), axis=0)]  # a pair's step, as read
    return None if step in ([0, 0], list(toward)) else step


def _motion(found: list[list], out: dict) -> dict:
    """:func:`background_motion`'s result from the steps found per run (None: no step)."""
    steps = [[d / GAP for d in run if d is not None] for run in found]
    measured = sum(len(r) for r in steps)
    means = np.array([np.mean(r, axis=0) for r in steps if len(r)])
    if measured < MIN_PAIRS or len(means) < 3:
        return {**out, "pairs": measured}
    # the runs' mean steps: their mean, and its standard error from their spread (the structures'
    # own apparent motion persists over a few sections, so the pairs within a run are alike)
    return {**out, **_from_runs(means), "pairs": measured}


def _from_runs(means: np.ndarray) -> dict:
    """Slope (the runs' mean steps' mean), its standard error (their spread) and the runs' means."""
    slope = means.mean(axis=0)
    se = means.std(axis=0, ddof=1) / math.sqrt(len(means))
    return {"slope": [float(v) for v in slope], "se": [float(v) for v in se], "runs": means.tolist()}


def second_look(first: dict, more: dict) -> dict:
    """The background measured on both looks' runs together (:func:`runs` ``second``): the first look
    where the second measured too few pairs."""
    if more.get("pairs", 0) < MIN_PAIRS or len(more.get("runs", [])) < 3:
        return first
    means = np.array(first["runs"] + more["runs"], np.float64)
    planned = first.get("planned", 0) + more.get("planned", 0)
    return {**first, **_from_runs(means), "pairs": first["pairs"] + more["pairs"], "planned": planned}


def unread(motion: dict) -> float | None:
    """Share of the pairs planned (:func:`background_motion`) whose crops gave no step: no correlation
    peak within :data:`REACH` (or too few pixels). None where none was planned. Where the sections are
    distorted their texture does not line up within the reach after the alignment (:data:`UNREAD`)."""
    planned = motion.get("planned", 0)
    return None if planned <= 0 else 1.0 - motion.get("pairs", 0) / planned


def chi_square_from_0(motion: dict, floor: float) -> float:
    """``sum((slope / max(se, floor))^2)`` over both axes: how far the background's slope lies from 0 (a
    still background), in the units :func:`classify` reads (``floor`` checked as there)."""
    b, se = np.asarray(motion["slope"], np.float64), np.asarray(motion["se"], np.float64)
    return float(((b / np.maximum(se, check_float("floor", floor, 0.0, 10.0, low_open=True))) ** 2).sum())


def classify(trend_slope, motion: dict, floor: float | None = None) -> tuple[str, float]:
    """``(decision, share)``: is the positions' trend ``trend_slope`` (px per section, y, x) the
    organelles' drift or the sections'? ``motion``: :func:`background_motion`'s. ``share``: the
    part of the trend the background follows (its projection on the trend: 1 organelle drift, 0
    section drift). With the background's slope ``b`` and its standard error, a hypothesis fits
    where ``b`` lies within :data:`AGREE` (chi-square, 2 degrees of freedom) of what it predicts:
    ``"organelles"`` where ``b`` fits the trend and not 0; ``"sections"`` the reverse;
    ``"undecided"`` where both fit (the trend is too small for the background to tell: it is kept
    as solved); ``"both"`` where neither fits (the sections drift and the organelles drift within
    them: only the background's slope is theirs). ``"unmeasured"`` with fewer than
    :data:`MIN_PAIRS` pairs measured. ``floor``: the smallest standard error trusted per axis (None:
    :data:`SE_FLOOR`; over 0, else :class:`InputError`)."""
    s, b, se = (np.asarray(v, np.float64) for v in (trend_slope, motion["slope"], motion["se"]))
    share = float(b @ s / max(float(s @ s), 1e-12))
    if motion["pairs"] < MIN_PAIRS or not np.all(np.isfinite(se)):
        return "unmeasured", share
    se = np.maximum(se, check_float("floor", SE_FLOOR if floor is None else floor, 0.0, 10.0, low_open=True))
    organelles = float((((b - s) / se) ** 2).sum()) < AGREE
    sections = float(((b / se) ** 2).sum()) < AGREE
    if organelles and sections:
        # both fit, but the background may still favour one: where it favours the organelles by
        # FAVOUR in chi-square (a likelihood ratio of 10), the trend test decides as before session 22
        favour = float(((b / se) ** 2).sum() - (((b - s) / se) ** 2).sum())
        return ("undecided-organelles" if favour >= FAVOUR else "undecided"), share
    if organelles or sections:
        return ("organelles" if organelles else "sections"), share
    return "both", share
