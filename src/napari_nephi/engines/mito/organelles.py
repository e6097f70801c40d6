"""The mitochondria's drift read against the tissue right around them (session 32, a default).

Under the elastic step the drift decision asks whose trend the positions show: the organelles' (cut
obliquely, they drift through the tissue) or the sections' (stage drift). The background reading
(:mod:`.background`) answers it by the motion of the whole rest of the image in the aligned frame,
but on distorted sections every section carries its own smooth distortion (1-2 px), and the
background's slope over the stack was off the true one by 0.1-0.35 px per section (2.3-2.6 of its
standard errors on the benchmark's 160-section stacks; docs/mito.md, session 31).

A smooth distortion is nearly the same for a mitochondrion and for the tissue a few tens of pixels
around it (the cutting distortions are smooth over hundreds of pixels). So, for neighbouring sections
``(k, k + 1)`` placed in the aligned frame, small tiles (:data:`TILE`) are laid along each
mitochondrion's outline, and in each tile the step of the mitochondrion's pixels and the step of the
tissue's are read apart (normalised cross-correlation, masked, within :data:`REACH`); their difference
is the mitochondrion's motion through the tissue, the distortion and the placement's own error gone
with the difference. The median over a mitochondrion's tiles, averaged over mitochondria and pairs, is
the population's drift per section (zero where only the sections drift); its standard error comes from
:data:`BLOCKS` blocks of consecutive pairs, as the background's does.

What it reads is the organelles' motion, not the placement's error: ``-slope`` is taken for the
placement's error on the assumption that the alignment followed the mitochondria (keypoints on them;
on the benchmark's stacks the placement followed 0.77-1.0 of it), and ``align._auto_decision`` classifies
it against the positions' trend as it does the background's slope (docs/mito.md, session 32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from ...core.errors import InputError

# as the background's: the band-pass, the margin around the mitochondria (both sections) left out of
# the tissue's part of a tile, the blocks of consecutive pairs whose means give the standard error,
# and the chi-square 9.21 from which the drift stands out of 0. That is p 0.01 for a known standard
# error; from 8 block means (t with 7 degrees of freedom per axis) a stack whose mitochondria do not
# drift reaches it about 5 % of the time (review 1 of session 32, 1e6 draws of t7^2 + t7^2)
from .background import AGREE, BLOCKS, COARSE_SIGMA, FINE_SIGMA, MARGIN

#: Side (pixels, full resolution) of the tiles laid along each mitochondrion's outline, one per half
#: tile of outline; the largest step (pixels) searched per tile (distortion differences between
#: sections are 2-3 px rms).
TILE, REACH = 96, 8
#: Fewest pixels of a mitochondrion (in each section of a pair) for it to be read, and fewest pixels
#: of either part of a tile; the lowest normalised correlation peak that gives a step.
MIN_AREA, MIN_PART, MIN_PEAK = 2000, 400, 0.1
#: Fewest (pair, mitochondrion) readings for a result.
MIN_READINGS = 16
#: The default of ``align_stack(organelle_reading=...)``: "local" since session 32 (the lead's held-out
#: seeds 73 / 74: stage-drift+drift+distorted 0.596 -> 0.947, the other distorted rows level; docs/mito.md);
#: "background" decides as before.
DEFAULT_READING = "local"
READINGS = ("background", "local", "local-grid")
_SWAP = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)


def _placed(section: np.ndarray, matrix: np.ndarray, shape, nearest: bool = False) -> np.ndarray:
    """``section`` resampled into the aligned frame (``matrix`` maps it to the section)."""
    h, w = int(shape[0]), int(shape[1])
    flags = cv2.WARP_INVERSE_MAP | (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    mx = (_SWAP @ matrix @ _SWAP)[:2]
    return cv2.warpAffine(section, mx, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT)


def _vertex(m: float, z: float, p: float) -> float:
    den = m - 2 * z + p
    return 0.0 if den >= 0 else float(np.clip(0.5 * (m - p) / den, -0.5, 0.5))


def tile_step(a: np.ndarray, weight: np.ndarray, b: np.ndarray, y0: int, x0: int) -> np.ndarray | None:
    """``(2,)`` (y, x) step by which the content of ``a`` under ``weight`` in the tile at ``(y0, x0)``
    lies moved in ``b`` (``b(p) ~ a(p - d)``): the peak of the masked normalised correlation within
    :data:`REACH`, refined per axis. None with too few pixels, a weak peak or the peak at the edge."""
    y1, x1 = y0 + TILE, x0 + TILE
    w = np.ascontiguousarray(weight[y0:y1, x0:x1], dtype=np.float32)
    if w.sum() < MIN_PART:
        return None
    t = np.ascontiguousarray(a[y0:y1, x0:x1])
    img = np.ascontiguousarray(b[y0 - REACH : y1 + REACH, x0 - REACH : x1 + REACH])
    c = cv2.matchTemplate(img, t, cv2.TM_CCORR_NORMED, mask=w)
    c = np.nan_to_num(c, nan=-1.0, posinf=-1.0, neginf=-1.0)
    i, j = np.unravel_index(int(np.argmax(c)), c.shape)
    if not (0 < i < c.shape[0] - 1 and 0 < j < c.shape[1] - 1) or c[i, j] < MIN_PEAK:
        return None
    return np.array([i - REACH + _vertex(*c[i - 1 : i + 2, j]), j - REACH + _vertex(*c[i, j - 1 : j + 2])])


#: How the tissue's step is read for a tile of a mitochondrion's outline (session 34): ``"tile"``, from the
#: tissue's pixels of that tile (session 32); ``"grid"``, the median of the steps of tissue tiles laid on a
#: grid :data:`GRID` px apart whose centres lie within :data:`NEAR` px of the tile's centre. The tissue's own
#: content is not the same from one section to the next (membranes and vesicles cut anew, granular texture),
#: so one tile's tissue step is off the sections' distortion by 1.4 px (median; rms 2.7) on the benchmark's
#: stacks, and that is most of the reading's error; the grid's median is off by 0.8 (rms 1.3; docs/mito.md,
#: session 34). ``align_stack(organelle_reading="local-grid")`` (opt-in) reads with the grid.
TISSUE_READS = ("tile", "grid")
GRID, NEAR = 48, 144

#: What ``align._auto_decision`` removes where the local reading decides "both" (session 36): ``"drift"``,
#: the mitochondria's drift through the tissue, negated (sessions 32-35: the placement taken to have
#: followed all of it); ``"placement"``, :func:`relative_motion`'s ``placement_error``, the placement's
#: error slope read at the mitochondria (their apparent step in the aligned frame less their drift through
#: the tissue), whatever share of their drift the placement followed (docs/mito.md, session 36). A diagnosis
#: switch: "placement" failed its rule (sdd 160/63, forced on the saved placement: Dice ref 0.9178 -> 0.8963;
#: it keeps all of the reading's own noise, which the unfollowed share partly cancelled there).
BOTH_SLOPE = "drift"
BOTH_SLOPES = ("drift", "placement")

#: Smallest standard error (px per section) trusted per axis where the local reading is classified against the
#: trend (``align._auto_decision``, :func:`.background.classify`). Session 38: kept at 0.02 when the
#: background's own floor (:data:`.background.SE_FLOOR`) is set apart: the local reading's se comes from its
#: many readings (e.g. 1577 on stage-drift+drift+distorted 88: (0.059, 0.049)), not from 8 runs' spread.
SE_FLOOR = 0.02

#: :func:`match`: the least share of the smaller of two mitochondria that must overlap the other.
MIN_OVERLAP = 0.5


def match(b_lab: np.ndarray, mine: np.ndarray, b_area: np.ndarray | None = None) -> int:
    """The label of ``b_lab`` that covers most of the pixels of ``mine`` (0/1), where that overlap is at
    least :data:`MIN_OVERLAP` of the smaller of the two (0 where none is; review 1 of session 33, A4: a
    mitochondrion touching another by a few pixels is not it). The two sections are labelled apart
    (:func:`cv2.connectedComponents`), so a mitochondrion's number in one says nothing of its number in
    the other (review 2 of session 32, A2: matched by number, 2 of 98 generator mitochondria were
    checked against another one). ``b_area``: ``np.bincount(b_lab.ravel())``, if already counted."""
    under = np.bincount(b_lab[mine > 0], minlength=1)
    size = int(under.sum())  # mine's pixels, each under some label of b_lab (0 included)
    under[0] = 0
    if not under.any():
        return 0
    j = int(np.argmax(under))
    area = np.bincount(b_lab.ravel()) if b_area is None else b_area
    return j if under[j] >= MIN_OVERLAP * min(size, int(area[j])) else 0


def outline_tiles(mine: np.ndarray, h: int, w: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y0, x0)`` of the tiles laid along the outline of ``mine`` (0/1): one per half
    tile of outline, in the order :func:`cv2.findContours` walks it, those whose search box lies inside
    ``(h, w)`` (session 46: apart from :func:`pair_motion`, for ``benchmarks/mito_local_truth.py``)."""
    outline, _ = cv2.findContours(mine, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    chosen: list[np.ndarray] = []
    for p in np.concatenate([c[:, 0, ::-1] for c in outline]):  # (y, x), one per half tile
        if all(np.abs(p - q).max() >= TILE // 2 for q in chosen):
            chosen.append(p)
    out = []
    for p in chosen:
        y0, x0 = int(p[0]) - TILE // 2, int(p[1]) - TILE // 2
        if not (y0 < REACH or x0 < REACH or y0 + TILE + REACH > h or x0 + TILE + REACH > w):
            out.append((y0, x0))
    return out


def pair_motion(
    a, a_lab, b, b_lab, valid, tissue_read: str = "tile", parts: bool = False, labels: bool = False
) -> list[np.ndarray]:
    """Per mitochondrion read in both sections, the median over its outline's tiles of (its step -
    the tissue's step), (y, x) pixels; with ``parts`` (session 36) a ``(4,)`` array, that and the median
    of its own step (the mitochondrion's apparent step in the aligned frame, the tissue's left out).
    ``a``, ``b``: band-passed sections in the aligned frame;
    ``a_lab``, ``b_lab``: their mitochondria's labels there; ``valid``: pixels inside both sections.
    A mitochondrion is read where it and the one of ``b`` that overlaps it most (:func:`match`) both
    have :data:`MIN_AREA` pixels (session 33; before, ``b``'s of the same number). ``tissue_read``:
    where the tissue's step comes from, ``"tile"`` or ``"grid"`` (:data:`TISSUE_READS`, session 34).
    ``labels`` (session 46): each item ``(i, j, value)``, the mitochondrion's label in
    ``a_lab`` and the one of ``b_lab`` it was matched to, for tracks through depth."""
    if tissue_read not in TISSUE_READS:
        raise InputError(f"tissue_read must be one of {TISSUE_READS}, got {tissue_read!r}.")
    square = np.ones((2 * MARGIN + 1, 2 * MARGIN + 1), np.uint8)
    near = cv2.dilate(((a_lab > 0) | (b_lab > 0)).view(np.uint8), square)
    tissue = (valid & (1 - near)).astype(np.float32)
    h, w = a.shape
    a_area, b_area = np.bincount(a_lab.ravel()), np.bincount(b_lab.ravel())
    out = []
    grid: dict[tuple[int, int], np.ndarray | None] = {}

    def near_tissue(cy: int, cx: int) -> np.ndarray | None:  # "grid": the median of the tissue tiles near
        got = []
        for gy in range(max(0, (cy - NEAR - TILE // 2) // GRID), (cy + NEAR) // GRID + 1):
            for gx in range(max(0, (cx - NEAR - TILE // 2) // GRID), (cx + NEAR) // GRID + 1):
                y0, x0 = gy * GRID, gx * GRID
                if math.hypot(y0 + TILE // 2 - cy, x0 + TILE // 2 - cx) > NEAR:
                    continue
                if (gy, gx) not in grid:
                    inside = y0 >= REACH and x0 >= REACH and y0 + TILE + REACH <= h and x0 + TILE + REACH <= w
                    grid[gy, gx] = tile_step(a, tissue, b, y0, x0) if inside else None
                if grid[gy, gx] is not None:
                    got.append(grid[gy, gx])
        return np.median(np.asarray(got), axis=0) if len(got) >= 3 else None

    for i in np.flatnonzero(a_area[1:] >= MIN_AREA) + 1:
        mine = (a_lab == i).astype(np.uint8)
        j = match(b_lab, mine, b_area)
        if j == 0 or int(b_area[j]) < MIN_AREA:
            continue
        weight = (cv2.dilate(mine, np.ones((7, 7), np.uint8)) & valid).astype(np.float32)
        steps = []
        for y0, x0 in outline_tiles(mine, h, w):
            mito = tile_step(a, weight, b, y0, x0)
            if mito is None:
                continue
            if tissue_read == "grid":
                around = near_tissue(y0 + TILE // 2, x0 + TILE // 2)
            else:
                around = tile_step(a, tissue, b, y0, x0)
            if around is not None:
                steps.append(np.concatenate([mito - around, mito]))
        if steps:
            value = np.median(np.asarray(steps), axis=0)[: 4 if parts else 2]
            out.append((int(i), int(j), value) if labels else value)
    return out


def relative_motion(
    read: Callable[[int], np.ndarray],
    mito: Callable[[int], np.ndarray],
    matrices: np.ndarray,
    shape,
    use: np.ndarray,
    workers: int = 1,
    tissue: str = "tile",
    tracks: bool = False,
    border: int | None = None,
) -> dict:
    """The mitochondria's drift through the tissue around them, px per section (y, x) in the aligned
    frame (see the module doc). ``read(k)``: section ``k`` (uint8); ``mito(k)``: its mitochondria (0/1,
    any size: resized to the section's); ``matrices[k]`` maps the aligned frame to section ``k``; pairs
    ``(k, k + 1)`` with both in ``use``; ``tissue``: how the tissue's step is read (:data:`TISSUE_READS`).
    Returns ``{"slope", "se", "readings", "pairs", "chi2", "drifts", "tissue", "placement_error",
    "placement_error_se"}``: ``placement_error`` (session 36) the mean over readings of the mitochondrion's
    own step in the aligned frame less its drift (the placement's error slope at the mitochondria, in the
    sign of ``-slope``) where enough were read; ``readings`` (pair, mitochondrion) values, ``pairs``
    neighbour pairs with one,
    ``chi2`` the slope's squared length in standard errors, ``drifts`` whether it stands out of 0
    (:data:`AGREE`: about 5 % false alarms, see above); an ``inf`` standard error where fewer than
    :data:`MIN_READINGS` were read.

    ``tracks`` (session 46, ``align_stack(kept_reading="local-tracks")``): the mitochondria are followed
    through depth (a reading of pair ``(k, k + 1)`` matched label ``j`` of section ``k + 1``, which is label
    ``i`` of the next pair's reading of it: one track) and the se is the larger, per axis, of the blocks' and
    the tracks' (:func:`track_se`). Each mitochondrion's readings share what is read around it on every pair;
    blocks of pairs all hold the same mitochondria and so miss it. Adds ``se_blocks``, ``se_tracks`` and
    ``tracks`` (their number) to the result. ``border`` (session 46): pixels of the sections' borders left out
    (None: 4, as before). Each tile's correlation searches :data:`REACH` (8) px of a band-passed section, so
    with 4 px a tissue tile on a section's border reads the border: 1-1.5 px outward, pair after pair, on the
    truth placement (docs/mito.md, session 46); ``"local-tracks"`` leaves :data:`MARGIN` (12) out."""
    if tissue not in TISSUE_READS:  # up front, not in a worker once a pair is read (review 2, A1)
        raise InputError(f"tissue must be one of {TISSUE_READS}, got {tissue!r}.")
    use = np.asarray(use, bool)
    h, w = int(shape[0]), int(shape[1])
    ks = np.flatnonzero(use[:-1] & use[1:])
    # the sections' borders left out: 4 px (before session 46), or ``border`` px (session 46)
    edge = np.ones((9, 9) if border is None else (2 * int(border) + 1,) * 2, np.uint8)

    def prepare(k):
        section = read(k)
        m = (mito(k) > 0).astype(np.uint8)
        if m.shape != section.shape:
            m = cv2.resize(m, (section.shape[1], section.shape[0]), interpolation=cv2.INTER_NEAREST)
        img = _placed(section, matrices[k], (h, w))
        inside = (img > 0).view(np.uint8)
        lab = cv2.connectedComponents(_placed(m, matrices[k], (h, w), nearest=True))[1]
        band = cv2.GaussianBlur(img.astype(np.float32), (0, 0), FINE_SIGMA)
        band -= cv2.GaussianBlur(img.astype(np.float32), (0, 0), COARSE_SIGMA)
        return band, lab, inside

    def chunk(part):
        out, ready = [], {}
        for k in part:
            for j in (k, k + 1):
                if j not in ready:
                    ready[j] = prepare(j)
            (a, la, ia), (b, lb, ib) = ready[k], ready[k + 1]
            valid = cv2.erode(ia & ib, edge)
            # with tracks (k, (i, j, value)): the labels link the pair's readings to the next pair's
            reads = pair_motion(a, la, b, lb, valid, tissue, parts=True, labels=tracks)
            out.extend((int(k), r) for r in reads)
            ready.pop(k)
        return out

    parts = [p for p in np.array_split(ks, max(1, min(len(ks), 4 * max(1, workers)))) if len(p)]
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mito-organelles") as ex:
        found = [r for part in ex.map(chunk, parts) for r in part]
    track_of = None
    if tracks:
        track_of = _tracks([(k, i, j) for k, (i, j, _) in found])
        found = [(k, v) for k, (_, _, v) in found]
    result = {"slope": [0.0, 0.0], "se": [math.inf, math.inf], "readings": len(found), "drifts": False}
    result["tissue"] = tissue  # how the tissue's step was read (session 34; review 1 of session 34)
    result["pairs"] = len({k for k, _ in found})
    if len(found) < MIN_READINGS:
        result["chi2"] = 0.0
        return result
    at = np.array([k for k, _ in found], dtype=np.float64)
    both = np.array([v for _, v in found])
    edges = np.linspace(at.min(), at.max() + 1, BLOCKS + 1)

    def mean_se(values):
        means = np.array([values[(at >= lo) & (at < hi)].mean(axis=0) for lo, hi in zip(edges[:-1], edges[1:])
                          if np.any((at >= lo) & (at < hi))])  # fmt: skip
        se = means.std(axis=0, ddof=1) / math.sqrt(len(means)) if len(means) >= 3 else np.full(2, math.inf)
        return values.mean(axis=0), se

    slope, se = mean_se(np.ascontiguousarray(both[:, :2]))
    if track_of is not None:  # session 46: the larger of the blocks' and the tracks' se, per axis
        by_track = track_se(both[:, :2], track_of)
        result.update(se_blocks=[float(v) for v in se], se_tracks=[float(v) for v in by_track])
        result["tracks"] = len(set(track_of.tolist()))
        se = np.maximum(se, by_track)
    chi2 = float(np.sum((slope / np.maximum(se, 1e-9)) ** 2))
    result.update(
        slope=[float(v) for v in slope], se=[float(v) for v in se], chi2=chi2, drifts=bool(chi2 >= AGREE)
    )
    # session 36: the placement's error slope read at the mitochondria, their apparent step in the aligned
    # frame less their drift through the tissue, per reading (see BOTH_SLOPE)
    error, error_se = mean_se(np.ascontiguousarray(both[:, 2:] - both[:, :2]))
    result.update(placement_error=[float(v) for v in error], placement_error_se=[float(v) for v in error_se])
    return result


#: Session 46: fewest tracks (mitochondria followed through depth) for :func:`track_se`'s se (else ``inf``).
MIN_TRACKS = 5


def _tracks(readings: list[tuple[int, int, int]]) -> np.ndarray:
    """Track number per reading ``(k, i, j)`` (pair ``(k, k + 1)``, label ``i`` of section ``k`` matched to
    label ``j`` of section ``k + 1``): readings ``(k, i, j)`` and ``(k + 1, j, j')`` are one mitochondrion
    followed through depth. Labels are per section (:func:`cv2.connectedComponents`), so only such links join
    them."""
    parent = list(range(len(readings)))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    starts = {(k, i): n for n, (k, i, _) in enumerate(readings)}
    for n, (k, _, j) in enumerate(readings):
        m = starts.get((k + 1, j))
        if m is not None:
            parent[root(m)] = root(n)
    roots = [root(n) for n in range(len(readings))]
    numbers = {r: t for t, r in enumerate(dict.fromkeys(roots))}
    return np.array([numbers[r] for r in roots], dtype=np.int64)


def track_se(values: np.ndarray, track_of: np.ndarray) -> np.ndarray:
    """``(2,)`` standard error of the mean of ``values`` (``(n, 2)``, one per reading) with the readings of
    one track as one cluster (the cluster-robust se of a mean, with the small-sample factor ``T / (T - 1)``):
    ``sqrt(T / (T - 1) * sum_t (sum of track t's deviations from the mean)^2) / n``. ``inf`` with fewer than
    :data:`MIN_TRACKS` tracks."""
    values = np.asarray(values, np.float64)
    ids = np.unique(track_of)
    if len(ids) < MIN_TRACKS:
        return np.full(values.shape[1], math.inf)
    dev = values - values.mean(axis=0)
    sums = np.array([dev[track_of == t].sum(axis=0) for t in ids])
    t = len(ids)
    return np.sqrt(t / (t - 1) * (sums**2).sum(axis=0)) / len(values)
