"""Drift correction by detrending (``drift_correction="detrend"``): a slow trend of the section
positions through depth is taken to be drift, not misalignment.

Keypoints place every section precisely relative to its neighbours, but when the structures
they sit on move steadily through depth (mitochondria or other organelles cut obliquely), every
pair sees that common motion as misalignment, and any pair-based placement (chained or global)
follows it: the error grows with the distance from the reference section.

In serial-section TEM every section is cut, picked up and imaged on its own, so the true
placements of the sections scatter from section to section but do not trend through depth.
A slow, consistent trend of the solved positions over many sections is therefore more likely
the organelles' motion than misalignment. This module measures where the centre of every
section lands in the aligned frame, fits a trend through depth (a straight line over the whole
stack, or a Gaussian-weighted local line over ``window`` sections), robustly (Huber weights),
and translates every section by minus its trend relative to the reference section, which stays
where it is. Rotations are left alone.

Trade-off: the correction is wrong for stacks whose sections do drift as a whole (stage drift
in FIB-SEM or serial block-face SEM, where the block does not move between images but the beam
or stage does): ``"detrend"`` removes it there too. ``"auto"`` (the default since session 22) asks
the rest of the image first (:mod:`.background`): where the sections drift, the background stays
put once aligned, and the trend is kept. It also takes out the linear part of the scatter of the
true placements: with placements scattering by ``sigma`` pixels around a fixed position, the
correction at the far end of ``n`` sections is off by about ``3.5 sigma / sqrt(n)``, so it
suits stacks whose sections were imaged roughly centred on the same tissue.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_solve_banded, cholesky_banded
from scipy.optimize import minimize, nnls

from ...core.errors import InputError
from ...core.options import check_float
from .features import check_choice

#: Values of ``drift_correction``.
DRIFT_CORRECTIONS = ("none", "detrend", "auto")

#: ``drift_correction`` by default (engine, CLI, widget): ``"auto"`` since session 22, when it
#: learned to tell the organelles' drift from the sections' (:mod:`.background`); ``"none"`` before.
DEFAULT_DRIFT_CORRECTION = "auto"

#: ``drift_correction="auto"`` detrends only where a trend as large as the fitted one would come
#: from the sections' own scatter and wander less often than this (:func:`trend_test`). Where both
#: are present the fitted wander is often too small and the real false rate is higher (measured
#: 1-26 %, review 1 of session 19; docs/mito.md): a wrong detrend costs about 0.02 Dice on a
#: jittered stack, a missed one 0.3 on a drifting, distorted one. Session 20's likelihood-ratio
#: test is calibrated there but misses such drift (:func:`trend_test`).
AUTO_P = 1e-3

#: Session 22: ``drift_correction="auto"`` asks the rest of the image whose trend it is
#: (:func:`.background.classify`) wherever the trend test's ``p`` is below this; the variogram test
#: alone decided at :data:`AUTO_P` before (and still does where the background favours the organelles
#: without deciding, ``"undecided-organelles"``; where it cannot be measured the placement is kept).
#: The background's answer is independent evidence, so the screen can be loose: a trend of scatter
#: and wander that passes it is kept where the background does not move.
SCREEN_P = 0.05

#: Session 37: the trend test whose ``p`` the screen (:data:`SCREEN_P`) reads (``align._auto_decision``):
#: ``"variogram"`` (:func:`variogram_test`'s, up to session 36) or ``"either"`` (the smaller of the
#: variogram's and :func:`likelihood_test`'s, without a correction for testing twice; opt-in, with
#: :data:`.background.SECOND_LOOK` ``"kept"`` the session 37 candidate the lead decides on). Under heavy
#: per-section scatter the variogram fits the scatter's own variogram noise as wander and stops a real drift
#: (drift + jitter, 20 px of scatter, seed 88: wander 2.45 px per section, p 0.26; the likelihood's p 0.030,
#: so a Bonferroni screen at 0.025 would not pass it). What the wider screen lets through is decided by the
#: background: simulated, the screen's own pass rate rose by at most 0.06 and the final false rate by at most
#: 0.3 percentage points on nulls, 0.7 on a still background under stage drift (docs/mito.md, session 37).
#: AUTO_P is still read on the variogram's p.
SCREEN_TESTS = ("variogram", "either")
SCREEN_TEST = "variogram"

#: ``drift_correction="auto"`` leaves alone a trend that moves the sections by less than this (pixels)
#: over the whole stack: there is nothing to correct, and the background is not read again.
MIN_TREND = 1.0

#: What a serial-section TEM stack whose organelles may drift needs (the CLI's ``--serial-sections``,
#: the EM widget's *serial-section TEM* button; docs/mito.md, session 20): the reference in the
#: middle, from which what no pair sees (a common turn of the organelles, the pairs' wander) grows,
#: and ``"auto"`` (the default since session 22, so the preset now adds the middle reference only).
#: Lead's held-out seeds 17 / 18, 160 sections (session 21): drift 0.977 / 0.974 (reference 0 with
#: ``"auto"``: 0.972 / 0.961), drift + distorted with ``elastic=True`` 0.960 / 0.951, today's stack
#: 0.976 / 0.970 (reference 0: 0.970 / 0.952). Not the default: the middle reference lost on today's
#: stack seeds 0 / 10 / 13 (session 20: 0.967 -> 0.953, 0.977 -> 0.973, 0.963 -> 0.960), and the
#: aligned stack would lie in another section's frame.
SERIAL_SECTIONS = {"reference": "middle", "drift_correction": "auto"}

#: ``reference`` by default (engine, CLI, widget; session 24): ``"auto"``: section 0, except where
#: the drift correction detrends (``"auto"``'s decision, or ``"detrend"``): there the aligned stack is
#: put in the frame of the placed section nearest the middle (:func:`recentred`) before the trend is
#: removed. What no pair sees (the mitochondria's common turn, which the keypoints read as the
#: sections' rotation: seed 28 -12.4 mdeg per pair, -2.2 degrees at section 159) grows from the
#: reference; the middle halves the lever. Drift stacks, 160 sections, the engine's ``"auto"`` at
#: reference 0 -> re-referenced: docs/mito.md, session 24. Only where the stack is detrended: the
#: middle reference lost on undrifted stacks (session 20: today's seed 0 0.967 -> 0.953), which
#: ``"auto"`` leaves in section 0's frame, bit for bit.
DEFAULT_REFERENCE = "auto"

#: Fewer sections placed by a real match than this: no detrending (a line through two or three
#: positions fits them exactly and would remove every real translation between them).
MIN_SECTIONS = 10

#: The shortest ``drift_window`` (Gaussian sigma, sections): a Gaussian of sigma w holds about
#: ``sqrt(2 pi) w = 2.5 w`` sections' weight, so below 4 even a stack without gaps has fewer
#: than :data:`MIN_SECTIONS` under it and the local line would remove real translations.
MIN_WINDOW = 4.0


def check_drift_options(drift_correction, drift_window) -> tuple[str, float]:
    """Validated ``(drift_correction, drift_window)`` of :func:`~.align.align_stack`."""
    if drift_correction is None or drift_correction is False:
        drift_correction = "none"
    if not isinstance(drift_correction, str):
        raise InputError(
            f"drift_correction must be one of {', '.join(DRIFT_CORRECTIONS)}, got {drift_correction!r}."
        )
    method = check_choice(drift_correction, DRIFT_CORRECTIONS, "drift_correction")
    window = check_float("drift_window", drift_window, 0.0, 1e6)
    if window > 0 and method == "none":
        raise InputError(
            f"drift_window={window:g} has no effect without drift correction; pass "
            "drift_correction='detrend' (--drift-correction detrend) to use it, or leave drift_window at 0."
        )
    if 0 < window < MIN_WINDOW:
        raise InputError(
            f"drift_window={window:g} sections is too short for a trend: a Gaussian of sigma "
            f"{window:g} weighs about {2.5 * window:.0f} sections, fewer than the {MIN_SECTIONS} a "
            "trend needs (through fewer it would remove the sections' own placement); use 0 (one "
            f"straight line over the stack) or at least {MIN_WINDOW:g}."
        )
    return method, window


def section_centres(matrices: np.ndarray, shape) -> np.ndarray:
    """``(n, 2)`` (y, x) positions in the aligned frame of the centre of every section
    (``matrices[k]`` maps the aligned frame to section ``k``)."""
    c = np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0, 1.0])
    p = np.linalg.solve(matrices, np.broadcast_to(c, (len(matrices), 3))[..., None])[..., 0]
    return p[:, :2] / p[:, 2:3]


def windows(use: np.ndarray, window: float) -> np.ndarray:
    """Gaussian sigma (sections) of the local line at every section: ``window``, widened (by
    factors of 1.25, up to the stack length) where the sections marked in ``use`` weigh less
    than :data:`MIN_SECTIONS` under it: at the ends of the stack (one-sided, half the weight)
    and in or beside long runs of failed or blank sections. 0 everywhere for ``window`` 0."""
    n = len(use)
    sig = np.full(n, float(window))
    if window <= 0:
        return sig
    k = np.arange(n, dtype=np.float64)
    placed = np.asarray(use, bool)
    for c in range(n):
        while sig[c] < n and np.exp(-0.5 * ((k[placed] - c) / sig[c]) ** 2).sum() < MIN_SECTIONS:
            sig[c] *= 1.25
    return sig


def trend(positions: np.ndarray, use: np.ndarray, window: float = 0.0, iterations: int = 10) -> np.ndarray:
    """``(n, 2)`` slow trend of ``positions`` through depth: a robust straight line over the
    sections marked in ``use`` (``window`` 0), or at every section the value of a line fitted
    with Gaussian weights of sigma ``window`` sections around it (widened where fewer than
    :data:`MIN_SECTIONS` placed sections lie under it, :func:`windows`). Huber weights on the
    residuals (threshold 2.5 robust standard deviations of the first fit's residuals, at
    least 1 pixel) keep sections placed far off (e.g. failed pairs) from pulling it."""
    n = len(positions)
    k = np.arange(n, dtype=np.float64)
    robust = use.astype(np.float64)
    out = np.zeros((n, 2))
    huber = None
    sigma = windows(use, window)
    for _ in range(iterations):
        out = _fit(k, positions, robust, sigma)
        res = np.linalg.norm(positions - out, axis=1)
        if huber is None:
            huber = max(1.0, 2.5 * 1.4826 * float(np.median(res[use]))) if use.any() else 1.0
        new = np.where(res > huber, huber / np.maximum(res, 1e-12), 1.0) * use
        if np.allclose(new, robust, atol=1e-4):
            break
        robust = new
    return out


#: Longest lag (sections) of the variogram that :func:`variogram_test` fits.
TEST_LAGS = 16


def trend_test(positions: np.ndarray, use: np.ndarray) -> dict:
    """Is the straight-line trend of ``positions`` ``(n, 2)`` through depth more than the
    sections' own scatter and wander explain? The decision is :func:`variogram_test`'s (session
    19); :func:`likelihood_test` (session 20) is reported beside it (``q_likelihood``), and the
    screen of ``"auto"`` can read it too (:data:`SCREEN_TEST` ``"either"``, opt-in, session 37).

    Why not the likelihood, which is calibrated where the variogram is not (3.5 px of scatter and
    a walk of 0.3 px per section: 0 of 30 simulated stacks detrended against 10 of 30): it misses
    drift the variogram finds, and a miss costs far more (about 0.3 Dice) than a wrong detrend
    (about 0.02): on drift + distorted seed 8 with ``elastic=True`` and the middle reference its
    ``q`` was 9.2 where the variogram's was 25.9, and requiring both left the stack at Dice 0.797
    (docs/mito.md, session 20). Sections whose position is not finite do not count. Returns
    :func:`variogram_test`'s dict with ``q_variogram`` (= ``q``) and ``q_likelihood`` added."""
    use = np.asarray(use, bool) & np.isfinite(np.asarray(positions, np.float64)).all(axis=1)
    v = variogram_test(positions, use)
    return {**v, "q_variogram": v["q"], "q_likelihood": likelihood_test(positions, use)["q"]}


def variogram_test(positions: np.ndarray, use: np.ndarray) -> dict:
    """The trend test of session 19 (see :func:`trend_test`).

    Null model, per axis: the positions scatter independently about a fixed place (placement
    jitter, variance ``s2``) plus a slow wander without direction (a random walk of errors along
    the stack, step variance ``w2``). Both come from the residuals about the least-squares line
    over the sections in ``use``: their mean squared difference ``l`` sections apart is
    ``2 s2 + l (1 - l / m) w2`` (``m`` sections spanned; the line takes up part of a walk),
    fitted (non-negative least squares) over lags 1 to :data:`TEST_LAGS` (a quarter of the
    stack at most). Under that null the slope over ``m`` sections has variance
    ``12 s2 / m^3 + 6 w2 / (5 m)`` (the second term: a line fitted to a random walk); ``q``, the
    sum over both axes of the squared slope over that variance, nominally follows a chi-square
    with 2 degrees of freedom, so ``p = exp(-q / 2)``. Where scatter and wander are both
    present the fitted ``w2`` is often too small and ``p`` too small (review 1 of session 19).
    Sections placed far off by a failed pair make the residuals larger, which only makes a trend
    harder to find. Returns ``{"q", "p", "slope" (px per section, y, x), "scatter" and "wander"
    (px: root mean over the axes of s2 and w2), "sections"}``."""
    use = np.asarray(use, bool)
    ku = np.flatnonzero(use).astype(np.float64)
    pos = np.asarray(positions, np.float64)[use]
    m = ku[-1] - ku[0] + 1 if len(ku) else 0.0
    out = {"q": 0.0, "p": 1.0, "slope": [0.0, 0.0], "scatter": 0.0, "wander": 0.0, "sections": int(use.sum())}
    lags = int(min(TEST_LAGS, m // 4))
    if len(ku) < MIN_SECTIONS or lags < 2:
        return out
    kc = ku - ku.mean()
    slope = (kc[:, None] * (pos - pos.mean(0))).sum(0) / (kc**2).sum()
    res = pos - pos.mean(0) - kc[:, None] * slope
    full = np.full((int(m), 2), np.nan)
    full[(ku - ku[0]).astype(int)] = res
    rows, vals = [], []
    for lag in range(1, lags + 1):
        d = full[lag:] - full[:-lag]
        ok = np.isfinite(d[:, 0])
        if ok.sum() >= 3:
            rows.append([2.0, lag * (1.0 - lag / m)])  # a walk less its line: shorter far apart
            vals.append((d[ok] ** 2).mean(0))
    if len(rows) < 2:
        return out
    s2w2 = np.stack([nnls(np.array(rows), np.array(vals)[:, i])[0] for i in range(2)])  # (axis, [s2, w2])
    s2, w2 = s2w2[:, 0], s2w2[:, 1]
    se2 = np.maximum(12 * s2 / m**3 + 6 * w2 / (5 * m), 1e-12)
    q = float(np.sum(slope**2 / se2))
    out.update(
        q=q, p=float(np.exp(-q / 2)), slope=[float(v) for v in slope],
        scatter=float(np.sqrt(s2.mean())), wander=float(np.sqrt(w2.mean())),
    )  # fmt: skip
    return out


def likelihood_test(positions: np.ndarray, use: np.ndarray) -> dict:
    """A likelihood-ratio test for a trend (session 20, see :func:`trend_test`).

    Null model, per axis: independent scatter (variance ``s2``) plus a random walk (step
    variance ``w2``); the alternative adds a constant drift ``mu`` per section. The steps between
    consecutive sections in ``use`` (``g`` sections apart across left-out ones) are then Gaussian
    with mean ``mu g``, variance ``2 s2 + g w2`` and covariance ``-s2`` between neighbouring steps
    (they share a position): a tridiagonal covariance, so the exact likelihood costs O(n)
    (banded Cholesky) and weighs every lag, not only the short ones. ``s2`` and ``w2`` are fitted
    by maximum likelihood under each model; ``q``, twice the log-likelihood ratio summed over both
    axes, is nominally chi-square with 2 degrees of freedom, ``p = exp(-q / 2)``. Returns ``{"q",
    "p", "slope" (the fitted drift, px per section, y, x), "scatter" and "wander" (px: root mean
    over the axes of the null's s2 and w2), "sections"}``."""
    use = np.asarray(use, bool)
    ku = np.flatnonzero(use).astype(np.float64)
    pos = np.asarray(positions, np.float64)[use]
    out = {"q": 0.0, "p": 1.0, "slope": [0.0, 0.0], "scatter": 0.0, "wander": 0.0, "sections": int(use.sum())}
    if len(ku) < MIN_SECTIONS:
        return out
    gaps = np.diff(ku)
    q, slope, s2w2 = 0.0, [], []
    for axis in range(pos.shape[1]):
        steps = np.diff(pos[:, axis])
        null, drift = _ml_fit(steps, gaps, False), _ml_fit(steps, gaps, True)
        q += max(0.0, 2.0 * (null[0] - drift[0]))
        slope.append(drift[2])
        s2w2.append(null[1])
    s2, w2 = np.array(s2w2).T
    out.update(
        q=q, p=float(np.exp(-q / 2)), slope=[float(v) for v in slope],
        scatter=float(np.sqrt(s2.mean())), wander=float(np.sqrt(w2.mean())),
    )  # fmt: skip
    return out


def _step_factor(s2: float, w2: float, gaps: np.ndarray) -> np.ndarray:
    """Lower banded Cholesky factor of the steps' covariance (:func:`trend_test`)."""
    ab = np.zeros((2, len(gaps)))
    ab[0] = 2.0 * s2 + gaps * w2
    ab[1, :-1] = -s2
    return cholesky_banded(ab, lower=True)


def _neg_log_likelihood(theta, steps, gaps, drift: bool) -> float:
    s2, w2 = np.exp(theta)
    c = _step_factor(s2, w2, gaps)
    r = steps
    if drift:
        xg = cho_solve_banded((c, True), gaps)
        r = steps - gaps * (xg @ steps) / (xg @ gaps)
    return float(np.log(c[0]).sum() + 0.5 * r @ cho_solve_banded((c, True), r))


def _ml_fit(steps: np.ndarray, gaps: np.ndarray, drift: bool) -> tuple[float, tuple[float, float], float]:
    """``(negative log-likelihood, (s2, w2), drift per section)`` at the maximum likelihood of
    the steps (:func:`trend_test`), from three starts (scatter, walk, both)."""
    v = max(float(np.mean(steps**2)), 1e-12)
    lv = np.log(v)
    bounds = [(lv - 25.0, lv + 3.0)] * 2  # s2 and w2 from 1e-11 to 20 times the steps' power
    best = None
    for start in ((lv - 0.7, lv - 4.6), (lv - 4.6, lv), (lv - 1.4, lv - 0.7)):
        res = minimize(
            _neg_log_likelihood, start, args=(steps, gaps, drift), method="L-BFGS-B", bounds=bounds
        )
        if best is None or res.fun < best.fun:
            best = res
    s2, w2 = (float(v) for v in np.exp(best.x))
    mu = 0.0
    if drift:
        c = _step_factor(s2, w2, gaps)
        xg = cho_solve_banded((c, True), gaps)
        mu = float((xg @ steps) / (xg @ gaps))
    return float(best.fun), (s2, w2), mu


def _fit(k, positions, weights, sigma):
    if not len(sigma) or sigma[0] <= 0:
        centres, weight_rows = [None], [weights]
    else:
        centres = list(k)
        # relative to the largest Gaussian weight among the counted sections: far from all of
        # them (a long blank run) the weights would otherwise underflow to 0 and leave no trend
        counted = weights > 0
        weight_rows = []
        for c, window in zip(k, sigma):
            e = -0.5 * ((k - c) / window) ** 2
            top = e[counted].max() if counted.any() else 0.0
            weight_rows.append(weights * np.exp(np.minimum(e - top, 0.0)))
    out = np.zeros_like(positions)
    for i, wgt in enumerate(weight_rows):
        total = wgt.sum()
        if total <= 0:
            continue
        km = (wgt * k).sum() / total
        pm = (wgt[:, None] * positions).sum(0) / total
        var = (wgt * (k - km) ** 2).sum()
        # a slope only from sections spread over more than a section (else the level is held)
        slope = (wgt[:, None] * (k - km)[:, None] * (positions - pm)).sum(0) / var if var > total else 0.0
        if centres[i] is None:
            return pm + np.outer(k - km, slope)
        out[i] = pm + (centres[i] - km) * slope
    return out


def reference_level(residuals: np.ndarray, use: np.ndarray, ref: int) -> np.ndarray:
    """``(2,)`` (y, x): how far the reference section's own level lies from the trend, i.e. the
    slow wander of ``residuals`` (positions less their trend) at the reference, without its scatter.

    Session 21. The placement errors wander along the stack (a random walk of the pair errors), and
    the sections' true placements scatter about a fixed place (serial sections picked up one by
    one). Keeping the reference in place put every other section off by the wander's level there
    (drift + distorted seed 8, middle reference, ``elastic=True``, 160 sections: 3.0 px in y, Dice
    0.930; 0.952 with this level). But the level of the scatter is real (a jittered stack's
    reference sits 4-35 px from the line): only the wander's share is taken. Per axis, scatter
    ``s2`` and wander ``w2`` are fitted by maximum likelihood (:func:`likelihood_test`'s drift
    model); the level is the steady-state smoother of a random walk under white noise at the
    reference: weights ``rho**|k - ref|``, ``rho = 2 / (2 + r + sqrt(r^2 + 4 r))``, ``r = w2 / s2``
    (the residual at the reference alone where there is no scatter, their mean, ~0, where there is
    no wander)."""
    use = np.asarray(use, bool) & np.isfinite(residuals).all(axis=1)
    out = np.zeros(2)
    if use.any():  # sections placed far off (failed pairs) are left out, as :func:`trend`'s Huber weights do
        norm = np.linalg.norm(residuals, axis=1)
        use &= norm <= max(1.0, 2.5 * 1.4826 * float(np.median(norm[use])))
    ku = np.flatnonzero(use).astype(np.float64)
    if len(ku) < MIN_SECTIONS:
        return out
    res = np.asarray(residuals, np.float64)[use]
    for axis in range(2):
        s2, w2 = _ml_fit(np.diff(res[:, axis]), np.diff(ku), True)[1]
        r = w2 / max(s2, 1e-12)
        rho = 2.0 / (2.0 + r + np.sqrt(r * r + 4.0 * r))
        # in log space, relative to the nearest placed section: ``rho**|k - ref|`` underflows to 0
        # where rho is tiny (no scatter fitted) and no placed section lies near the reference
        # (review 2 of session 21); the nearest placed sections alone then
        dist = np.abs(ku - ref) - np.abs(ku - ref).min()
        wgt = np.exp(dist * np.log(rho)) if rho > 0 else (dist == 0).astype(np.float64)
        out[axis] = float((wgt * res[:, axis]).sum() / wgt.sum())
    return out


def recentred(matrices: np.ndarray, use, ref: int, frames=None) -> tuple[np.ndarray, int]:
    """``(matrices in the frame of the section in use nearest the middle of the stack, that section)``
    (``reference="auto"`` where the stack is detrended, :data:`DEFAULT_REFERENCE`): ``matrices[k]
    @ inv(frames[new])``, so the new reference's map (``frames``, default ``matrices``: where it lies
    with its elastic field's affine part, :func:`.elastic.field_affine_matrices`) is the identity and
    every section keeps its place relative to the others. ``matrices`` and ``ref`` unchanged where that
    section is ``ref``."""
    mats = np.asarray(matrices, dtype=np.float64)
    placed = np.flatnonzero(np.asarray(use, bool))
    if not len(placed):
        return mats, ref
    new = int(placed[np.argmin(np.abs(placed - (len(mats) - 1) / 2.0))])
    if new == ref:
        return mats, ref
    out = mats @ np.linalg.inv(mats[new] if frames is None else np.asarray(frames, np.float64)[new])
    return out / out[:, 2:3, 2:3], new


def detrend(
    matrices: np.ndarray, shape, ref: int, use=None, window: float = 0.0, slope=None
) -> tuple[np.ndarray, np.ndarray]:
    """``(matrices translated so that the section centres lose their trend through depth, the
    (n, 2) (y, x) shift applied to every section in the aligned frame)``. The sections' level is put
    where the reference's own level is (:func:`reference_level`; up to session 20 the reference kept
    its map and the line its value there). ``use``: sections that count for the trend (default all).
    ``slope`` (px per section, y, x; session 22): only a straight drift of that slope is removed, the
    rest of the positions' trend is kept (the organelles' share where the sections drift too,
    :func:`.background.classify`); the reference keeps its place then."""
    mats = np.asarray(matrices, dtype=np.float64)
    n = len(mats)
    use = np.ones(n, bool) if use is None else np.asarray(use, bool)
    if slope is None:
        pos = section_centres(mats, shape)
        t = trend(pos, use, window)
        shift = t - t[ref] - reference_level(pos - t, use, ref)
    else:
        shift = np.outer(np.arange(n, dtype=np.float64) - ref, np.asarray(slope, np.float64))
    out = mats.copy()
    for k in range(n):
        move = np.eye(3)
        move[:2, 2] = shift[k]  # section k's content moves by -shift: it is sampled at p + shift
        out[k] = mats[k] @ move
    return out, shift
