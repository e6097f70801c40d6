"""Series smoothing: plates for sections in cutting order made monotonic and evenly spaced.

As DeepSlice does for a series: consecutive sections of one brain are cut at a near-constant
spacing, so their plates lie on a line ``plate = start + step * order``. A robust fit (RANSAC
over the sections' top candidates, refined by least squares on the inliers) finds that line,
increasing or decreasing, whichever explains more sections; then every section takes the plate
of its own top-k nearest to the line, chosen jointly (dynamic programming) so that the picks never
go against the line's direction. A section whose top-k holds nothing near the line takes the
line's own plate.
"""

from __future__ import annotations

import numpy as np

from ...core.errors import InputError

#: Most line hypotheses scored (pairs of candidates of two sections); more pairs are sampled.
MAX_HYPOTHESES = 4000
#: Candidates per section that propose lines (the best ones; all top-k are scored).
PROPOSERS = 3
#: Most candidates per section the smoothing considers (the best ones; rankings are kept whole).
MAX_CANDIDATES = 10
#: Cost of a candidate's rank per place (prefers better-ranked plates at equal distance to the line).
RANK_COST = 0.25


def fit_series_line(candidates: np.ndarray, n_plates: int, seed: int = 0) -> tuple[float, float]:
    """Robust line ``plate = start + step * order`` through the sections' candidates.

    ``candidates``: ``(K, k)`` plate indices per section, best first. Returns ``(start, step)``.
    """
    cand = np.asarray(candidates, dtype=np.float64)
    n_sec, k = cand.shape
    tau = _tolerance(n_plates)
    if n_sec == 1:
        return float(cand[0, 0]), 0.0
    hyps = _hypotheses(cand, seed)
    order = np.arange(n_sec, dtype=np.float64)
    cost = _costs(cand, hyps, order, tau)  # (H,)
    best = hyps[int(np.argmin(cost))]
    # refine on the inliers by least squares, keeping the direction of the best hypothesis
    pred = best[0] + best[1] * order
    dist = np.abs(cand - pred[:, None]) + RANK_COST * np.arange(k)[None, :]
    pick = cand[np.arange(n_sec), np.argmin(dist, axis=1)]
    inlier = np.abs(pick - pred) <= tau
    if inlier.sum() >= 2 and np.ptp(order[inlier]) > 0:
        step, start = np.polyfit(order[inlier], pick[inlier], 1)
        if step * best[1] >= 0 and _costs(cand, np.array([[start, step]]), order, tau)[0] <= cost.min():
            return float(start), float(step)
    return float(best[0]), float(best[1])


def smooth_series(rankings: list[list[tuple[int, float]]], n_plates: int, seed: int = 0) -> dict:
    """Monotonic, evenly spaced picks for sections in cutting order.

    ``rankings``: per section, ``[(plate, distance), ...]`` best first (the same length each).
    Returns ``dict(picks, rankings, start, step, direction)``; ``rankings`` is passed through.
    """
    if not rankings:
        raise InputError("lookup_series needs at least one section.")
    k = min(min(len(r) for r in rankings), MAX_CANDIDATES)
    if k < 1:
        raise InputError("Every section needs at least one ranked plate.")
    cand = np.array([[p for p, _ in r[:k]] for r in rankings], dtype=np.int64)
    start, step = fit_series_line(cand, n_plates, seed)
    line = start + step * np.arange(len(rankings), dtype=np.float64)
    picks = _monotonic_picks(cand, line, step >= 0, n_plates)
    return {
        "picks": [int(p) for p in picks],
        "rankings": rankings,
        "start": start,
        "step": step,
        "direction": "increasing" if step >= 0 else "decreasing",
    }


def _tolerance(n_plates: int) -> float:
    """Plates from the line within which a candidate counts as agreeing with it."""
    return max(2.0, 0.03 * n_plates)


def _hypotheses(cand: np.ndarray, seed: int) -> np.ndarray:
    """``(H, 2)`` lines ``(start, step)`` through pairs of candidates of two different sections."""
    n_sec, k = cand.shape
    m = min(PROPOSERS, k)
    i, j = np.triu_indices(n_sec, 1)
    a, b = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    a, b = a.ravel(), b.ravel()
    total = len(i) * len(a)
    if total > MAX_HYPOTHESES:
        rng = np.random.default_rng(seed)
        pick = rng.choice(total, MAX_HYPOTHESES, replace=False)
        pi, pa = pick // len(a), pick % len(a)
        i, j, a, b = i[pi], j[pi], a[pa], b[pa]
    else:
        i, j = np.repeat(i, len(a)), np.repeat(j, len(a))
        a, b = np.tile(a, total // len(a)), np.tile(b, total // len(b))
    step = (cand[j, b] - cand[i, a]) / (j - i)
    start = cand[i, a] - step * i
    # the line through the best picks (least squares) is always a candidate too
    order = np.arange(n_sec, dtype=np.float64)
    ls_step, ls_start = np.polyfit(order, cand[:, 0], 1)
    return np.concatenate([np.stack([start, step], axis=1), [[ls_start, ls_step]]])


def _costs(cand: np.ndarray, hyps: np.ndarray, order: np.ndarray, tau: float) -> np.ndarray:
    """Truncated distance of each section's nearest candidate to each line, summed: ``(H,)``."""
    n_sec, k = cand.shape
    rank = RANK_COST * np.arange(k)[None, None, :]
    out = np.empty(len(hyps))
    chunk = max(1, (1 << 22) // max(1, n_sec * k))  # bounds the (chunk, K, k) temporary
    for i in range(0, len(hyps), chunk):
        h = hyps[i : i + chunk]
        pred = h[:, 0:1] + h[:, 1:2] * order[None, :]  # (h, K)
        dist = np.abs(cand[None, :, :] - pred[:, :, None]) + rank
        out[i : i + chunk] = np.minimum(dist.min(axis=2), tau + RANK_COST * k).sum(axis=1)
    return out


def _monotonic_picks(cand: np.ndarray, line: np.ndarray, increasing: bool, n_plates: int) -> np.ndarray:
    """Per section, a candidate near the line, never going against ``increasing`` (dynamic programming).

    Each section may also take the line's own plate (rounded, clipped to the atlas) at an extra
    cost, so a monotonic choice always exists.
    """
    n_sec, k = cand.shape
    tau = _tolerance(n_plates)
    own = np.clip(np.round(line), 0, n_plates - 1).astype(np.int64)
    options = np.concatenate([cand, own[:, None]], axis=1)  # (K, k + 1)
    cost = np.abs(options - line[:, None]) + RANK_COST * np.arange(k + 1)[None, :]
    cost[:, k] += tau  # the line's plate only when the top-k has nothing usable
    total = cost[0].copy()
    back = np.zeros((n_sec, k + 1), dtype=np.int64)
    for s in range(1, n_sec):
        prev, cur = options[s - 1][:, None], options[s][None, :]
        ok = (cur >= prev) if increasing else (cur <= prev)  # (k+1 prev, k+1 cur)
        trans = np.where(ok, total[:, None], np.inf)
        back[s] = np.argmin(trans, axis=0)
        total = trans[back[s], np.arange(k + 1)] + cost[s]
    picks = np.empty(n_sec, dtype=np.int64)
    j = int(np.argmin(total))
    for s in range(n_sec - 1, -1, -1):
        picks[s] = options[s, j]
        j = int(back[s, j])
    return picks
