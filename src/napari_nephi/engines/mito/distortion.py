"""Are the sections distorted? The sign of the pair residuals' correlation through a section.

A neighbour pair's sub-pixel tracks (:func:`.features.refine`) leave a residual after the pair's
richest model (the homography): what no projective map explains. Take a section ``m`` and its two
neighbour pairs ``(m - 1, m)`` and ``(m, m + 1)``, and in ``m`` the residual of each, both as the
motion of the content from the lower section to the higher one, in ``m``'s frame:

* where every section carries its own smooth distortion ``d_k`` (cut sections, :func:`em_stack`'s
  ``distortion``), the first residual is ``d_{m-1} - d_m`` and the second ``d_m - d_{m+1}``: they
  share ``d_m`` with opposite signs, so their correlation is negative (-0.5 where the distortion is
  all there is);
* where the content moves on through the stack (mitochondria drifting, tubes cut obliquely changing
  shape), the two residuals point the same way: positive;
* tracking noise added to each pair separately is independent between the pairs: 0;
* **image noise** of section ``m`` enters both pairs' tracks *at the same place* with opposite
  signs, as a distortion would (review 2 of session 29: read at the same point, ``em_stack`` noise
  0.1-0.3 read -0.01 to -0.09 undistorted, inside the distorted range). But it moves a track only
  through the pixels of its Lucas-Kanade window (11 work pixels), while a cutting distortion is smooth
  over tens to hundreds of pixels.

So the residuals are correlated between **points farther apart than the window**: every residual of
the pair ``(m, m + 1)`` in ``m`` with every residual of ``(m - 1, m)`` whose point lies :data:`RING`
(12-30 work pixels) away from it (session 30). The distortion's share survives at that distance, the
image noise's does not (undistorted stacks of identical sections with noise 0.02-0.3 read -0.004 to
+0.010; read at the same point, -0.05 to -0.44). The correlation (:func:`residual_correlation`) is
unitless and does not depend on the image size, the stack length or the number of keypoints (only
its precision does; its jackknife standard error over the sections is recorded), and it is read from
the tracks the neighbour pairs already make: no image is read again. ``elastic="auto"`` (the default
since session 30) runs the elastic step where it is at most :data:`LIMIT` and :data:`SE_FACTOR`
standard errors under 0 (docs/mito.md, sessions 29 and 30).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ...core.errors import InputError
from .features import project

#: :func:`.align.align_stack`'s ``elastic`` default: ``"auto"`` since session 30 (the lead, after review 2 of
#: session 30 A1). 75fb72f made it the default with ``LIMIT`` -0.01 and was taken back (b1d5ce2): undistorted
#: 16 x 192^2 stacks read down to -0.0119 at 3.6 standard errors (192^2 readings lean slightly negative). With
#: the limit at -0.025, none of 312 undistorted small stacks on fresh seeds (100-139: 16-48 x 192^2, 16 x
#: 256^2, 32 x 320^2, 8 x 384^2, noise 0.05-0.3; lowest reading -0.0167) reads distorted, while 64 of 70
#: distorted ones do (distortion 0.25-0.5), as do the benchmark's distorted stacks of 160 sections (-0.046 to
#: -0.071; docs/mito.md, session 30, the lead's check).
DEFAULT_ELASTIC: bool | str = "auto"

#: ``elastic="auto"``: the elastic step runs where the correlation is at most this (session 30: of the
#: ring reading, -0.01 then -0.025 after review 2 A1; session 29's -0.03 was of the same-point one).
LIMIT = -0.025

#: ``elastic="auto"``: and at least this many of its standard errors under 0 (review 1 of session 30, A2):
#: on small, short stacks the reading's spread reaches the limit (16 x 192^2, undistorted, 10 seeds:
#: -0.015..+0.009, the lowest -0.0147 +- 0.0053, 2.8 standard errors), on the benchmark's stacks the
#: distorted readings stand 2-7 standard errors under 0 (docs/mito.md, session 30).
SE_FACTOR = 3.0

#: ``elastic="auto"`` (session 33, opt-in): also distorted where the ring reading less its lag-2 share
#: (:class:`Correlation`: the same ring sums between pairs two sections apart, which a distortion does not
#: move and content moving on through the stack does) is at most :data:`LIMIT` and :data:`SE_FACTOR` of its
#: own standard errors under 0 (since session 34 as many as :func:`corrected_bound` asks for the sections it
#: is read through). Recorded as ``metrics["distortion"]["corrected_rule"]``. The lag-2 sums run
#: through sections 2 .. n - 3 and the corrected reading needs 3 of them, so it is None (never fires) on
#: stacks of fewer than 8 sections (review 1 of session 33, A1).
CORRECTED = False


def corrected_bound(sections: int) -> float | None:
    """How many of its standard errors the corrected reading must lie under 0 (session 34): its jackknife
    standard error comes from the ``sections`` with lag-2 sums, so ``corrected / se`` is read as Student's t
    with ``sections - 1`` degrees of freedom, at the one-sided level of :data:`SE_FACTOR` normal standard
    errors (0.00135): 9.2 through 4 sections, 3.85 through 12, 3.3 through 28, 3.05 through 156 (None under
    3). It replaced session 33's guard (the rule only through 12 such sections): on the 460 small stacks
    of development (seeds 100-145) both give the same decisions (no undistorted stack read distorted; the
    8-section one of seed 119, -0.0255 +- 0.0066 through 4 sections, stands 3.9 of 9.2), and on fresh
    seeds 146-155 (130 stacks) none of 80 undistorted reads distorted, 45 of 50 distorted do (the guard:
    46; the ring rule alone: 41; docs/mito.md, session 34)."""
    if sections < 3:
        return None
    from scipy import stats

    return float(stats.t.isf(stats.norm.sf(SE_FACTOR), sections - 1))


#: Fewest points over the stack (residuals of the upper pairs with a partner in the ring) for a
#: reading; fewer: "unmeasured".
MIN_POINTS = 200

#: Distances, in work pixels, between the points whose residuals are correlated: beyond the
#: Lucas-Kanade window (11 work pixels, :func:`.features.track`) so that a section's image noise, which
#: moves the tracks of both its pairs at the same place, drops out (session 30).
RING = (12.0, 30.0)

#: Points of the upper pair whose ring pairs are taken at once (bounds the memory per section).
CHUNK = 128

#: Radius, in work pixels, within which a residual of one pair is matched to one of the other pair
#: for the same-point correlation (session 29's reading; recorded as ``same_point``, context only).
RADIUS = 2.0


def check_elastic(value) -> bool | str:
    """``elastic``: True, False or ``"auto"`` (any case); anything else is an ``InputError``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    raise InputError(
        f"Option elastic must be true, false or 'auto' (the elastic step where the sections are "
        f"measured to be distorted), got {value!r}."
    )


@dataclass
class PairResidual:
    """One neighbour pair's track residuals, as the motion from section ``lo`` to ``hi = lo + 1``.

    ``p_lo`` (N, 2) (x, y) points in ``lo`` with ``e_lo`` the residual in ``lo``'s frame there;
    ``p_hi`` the same tracks' points in ``hi`` with ``e_hi`` the residual in ``hi``'s frame; ``fit``
    the (x, y) map ``lo -> hi`` (carries the residuals two sections apart, :class:`Correlation`)."""

    lo: int
    p_lo: np.ndarray
    e_lo: np.ndarray
    p_hi: np.ndarray
    e_hi: np.ndarray
    fit: np.ndarray | None = None


def pair_residual(
    a: int, b: int, src: np.ndarray, dst: np.ndarray, fit_xy: np.ndarray
) -> PairResidual | None:
    """The residuals of tracks ``src`` (section ``a``, (x, y)) -> ``dst`` (section ``b``) after the
    (x, y) map ``fit_xy`` (a -> b), oriented from the lower section to the higher; None unless
    ``a`` and ``b`` are neighbours."""
    if abs(a - b) != 1 or len(src) == 0:
        return None
    m = np.asarray(fit_xy, np.float64)
    m_inv = np.linalg.inv(m)
    if a > b:  # orient lower -> higher
        src, dst, m, m_inv = dst, src, m_inv, m
    p_lo, p_hi = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    e_hi = p_hi - project(m, p_lo)
    e_lo = project(m_inv, p_hi) - p_lo
    return PairResidual(min(a, b), p_lo, e_lo, p_hi, e_hi, m)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` without the product array."""
    return float(np.einsum("ij,ij->", a, b))


class Correlation:
    """:func:`residual_correlation` accumulated as the neighbour pairs arrive (:func:`.align.align_stack`):
    a section's sums are taken as soon as the pairs it needs are in, and a pair is dropped once every
    section it serves is counted, so memory does not grow with the stack beyond a few numbers per
    section (the neighbours of a failed section, whose pair never arrives, are held to the end). The
    sums follow the pairs' arrival order, so with several workers the last digits may differ between
    runs (review 2 of session 29, A4 / A5). ``ring`` (inner, outer) and ``radius`` in original pixels.

    Besides the ring reading through each section ``m`` (its two pairs, "lag 1"), the same ring sums
    are taken between pairs two apart (:meth:`_count_lag2`, session 33): the pair ``(m - 2, m - 1)``'s
    residual carried into ``m`` by the pair ``(m - 1, m)``'s map against the pair ``(m, m + 1)``'s,
    and the pair ``(m - 1, m)``'s against the pair ``(m + 1, m + 2)``'s carried back into ``m``. Those
    pairs share no section, so a distortion gives them nothing, while content that moves on through
    the stack (mitochondria that drift or change shape) moves them as it moves the lag-1 pairs."""

    def __init__(self, ring: tuple[float, float], radius: float):
        self.ring = (float(ring[0]), float(ring[1]))
        self.radius = radius
        self.pairs: dict[int, PairResidual | None] = {}  # lower section -> its pair (None: no residuals)
        self.done: set[int] = set()  # middle sections counted or impossible
        self.done2: set[int] = set()  # middle sections whose lag-2 sums are counted or impossible
        self.rows: list[tuple[float, ...]] = []  # per middle: ring sums e1.e2, |e1|^2, |e2|^2, pairs
        self.middles: list[int] = []  # the middle of each row
        self.rows2: dict[int, np.ndarray] = {}  # middle -> the lag-2 ring sums (both sides)
        self.p12 = self.p11 = self.p22 = 0.0  # same-point sums (context)
        self.count = self.same = 0

    def add(self, lo: int, pair: PairResidual | None) -> None:
        """The pair from section ``lo`` to ``lo + 1`` (None where that pair gave no residuals)."""
        self.pairs[lo] = pair
        for m in (lo, lo + 1):
            if m in self.done or m - 1 not in self.pairs or m not in self.pairs:
                continue
            self.done.add(m)
            self._count(m, self.pairs[m - 1], self.pairs[m])
        for m in range(lo - 1, lo + 3):  # the lag-2 sums through m need the pairs m - 2 .. m + 1
            if m in self.done2 or any(k not in self.pairs for k in range(m - 2, m + 2)):
                continue
            self.done2.add(m)
            self._count_lag2(m)
        for k in range(lo - 3, lo + 4):  # a pair serves the middles k and k + 1, and k - 1 .. k + 2 at lag 2
            if k in self.pairs and k in self.done and k + 1 in self.done:
                if all(j in self.done2 or j < 2 for j in range(k - 1, k + 3)):
                    del self.pairs[k]

    def _ring(self, t1: cKDTree, e1: np.ndarray, p2: np.ndarray, e2: np.ndarray) -> tuple[np.ndarray, int]:
        """The ring sums ``(e1.e2, |e1|^2, |e2|^2, point pairs)`` over every point of ``p2`` with every
        point of the tree ``t1`` (residuals ``e1``) in the ring, and how many points of ``p2`` have a
        partner."""
        sums, partners = np.zeros(4), 0
        if t1.n == 0 or len(p2) == 0:
            return sums, partners
        # p2 a block at a time: only a block's point pairs are held at once (dense tracks, ~1000 a
        # pair, make ~20 000 pairs in the ring, a few MB with their residuals)
        for a in range(0, len(p2), CHUNK):
            block = cKDTree(p2[a : a + CHUNK])
            near = t1.sparse_distance_matrix(block, self.ring[1], output_type="ndarray")
            far = near[near["v"] > self.ring[0]]
            del near
            if len(far):
                f1, f2 = e1[far["i"]], e2[a + far["j"]]
                sums += (_dot(f1, f2), _dot(f1, f1), _dot(f2, f2), len(far))
                partners += len(np.unique(far["j"]))
        return sums, partners

    def _count(self, m: int, below: PairResidual | None, above: PairResidual | None) -> None:
        if below is None or above is None or len(below.p_hi) == 0 or len(above.p_lo) == 0:
            return
        t_below = cKDTree(below.p_hi)  # the ring sums and the same-point reading
        sums, partners = self._ring(t_below, below.e_hi, above.p_lo, above.e_lo)
        if sums[3]:
            self.rows.append((float(sums[0]), float(sums[1]), float(sums[2]), int(sums[3])))
            self.middles.append(m)
            self.count += partners
        dist, idx = t_below.query(above.p_lo, distance_upper_bound=self.radius)
        ok = np.isfinite(dist)
        if ok.any():
            e1, e2 = below.e_hi[idx[ok]], above.e_lo[ok]
            self.p12 += float(np.sum(e1 * e2))
            self.p11 += float(np.sum(e1 * e1))
            self.p22 += float(np.sum(e2 * e2))
            self.same += int(ok.sum())

    def _count_lag2(self, m: int) -> None:
        """The lag-2 sums through ``m`` (both sides; none unless both give point pairs)."""
        p = [self.pairs[k] for k in range(m - 2, m + 2)]  # the pairs m - 2, m - 1, m, m + 1
        if any(q is None or q.fit is None or len(q.p_lo) == 0 for q in p):
            return
        below, inner, above = _carried(p[0].p_hi, p[0].e_hi, p[1].fit), p[1], p[2]
        s1, _ = self._ring(cKDTree(below[0]), below[1], above.p_lo, above.e_lo)
        back = _carried(p[3].p_lo, p[3].e_lo, np.linalg.inv(p[2].fit))
        s2, _ = self._ring(cKDTree(inner.p_hi), inner.e_hi, back[0], back[1])
        if s1[3] and s2[3]:
            self.rows2[m] = s1 + s2

    def result(self) -> dict:
        """``value`` (the ring correlation; None when fewer than :data:`MIN_POINTS` points), ``se``
        (its jackknife standard error over the sections, None under 3 sections), ``points``,
        ``sections`` (middles used), ``same_point`` (session 29's reading, context: image noise pulls
        it down), ``rms`` (px, of the residuals in the ring sums: context only, it depends on the
        image size), and (session 33) ``lag2`` (the same correlation between pairs two apart) with
        ``corrected`` (the ring correlation less the lag-2 one, over the sections that have both) and
        its jackknife ``corrected_se`` (None where unmeasured)."""
        table = np.asarray(self.rows, np.float64).reshape(-1, 4)
        rows, n_pairs = table[:, :3], table[:, 3].sum()
        tot = rows.sum(0)
        value = se = lag2 = corrected = corrected_se = None
        corrected_sections = 0
        if self.count >= MIN_POINTS and tot[1] > 0 and tot[2] > 0:
            value = float(tot[0] / np.sqrt(tot[1] * tot[2]))
            rest = tot - rows
            if len(rows) >= 3 and np.all(rest[:, 1:] > 0):
                jack = rest[:, 0] / np.sqrt(rest[:, 1] * rest[:, 2])
                se = float(np.sqrt((len(rows) - 1) * np.mean((jack - jack.mean()) ** 2)))
            lag2, corrected, corrected_se, corrected_sections = _corrected(rows, self.middles, self.rows2)
        same = None
        if self.same and self.p11 > 0 and self.p22 > 0:
            same = float(self.p12 / np.sqrt(self.p11 * self.p22))
        return {
            "value": value,
            "se": se,
            "points": self.count,
            "sections": len(rows),
            "same_point": same,
            "rms": float(np.sqrt((tot[1] + tot[2]) / (2 * n_pairs))) if n_pairs else None,
            "lag2": lag2,
            "corrected": corrected,
            "corrected_se": corrected_se,
            "corrected_sections": corrected_sections,
        }


def _carried(p: np.ndarray, e: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points ``p`` (x, y) and their residuals ``e`` carried by the (x, y) map ``fit`` into the next
    section's frame (the residuals by the map's linear part: a turn of a few degrees)."""
    return project(fit, p), e @ (fit[:2, :2] / fit[2, 2]).T


def _corrected(rows: np.ndarray, middles: list[int], rows2: dict) -> tuple:
    """``(lag-2 correlation, ring less lag-2 correlation, its jackknife standard error, middles)`` over
    the middles with both sums (Nones under 3 such middles)."""
    at = {m: i for i, m in enumerate(middles)}
    common = [m for m in sorted(rows2) if m in at]
    if len(common) < 3:
        return None, None, None, len(common)
    a = rows[[at[m] for m in common]]
    b = np.asarray([rows2[m][:3] for m in common], np.float64)
    ta, tb = a.sum(0), b.sum(0)
    if min(ta[1], ta[2], tb[1], tb[2]) <= 0:
        return None, None, None, len(common)
    lag2 = float(tb[0] / np.sqrt(tb[1] * tb[2]))
    value = float(ta[0] / np.sqrt(ta[1] * ta[2])) - lag2
    ra, rb = ta - a, tb - b
    if not (np.all(ra[:, 1:] > 0) and np.all(rb[:, 1:] > 0)):
        return lag2, value, None, len(common)
    jack = ra[:, 0] / np.sqrt(ra[:, 1] * ra[:, 2]) - rb[:, 0] / np.sqrt(rb[:, 1] * rb[:, 2])
    se = float(np.sqrt((len(common) - 1) * np.mean((jack - jack.mean()) ** 2)))
    return lag2, value, se, len(common)


def residual_correlation(
    pairs: dict[int, PairResidual], ring: tuple[float, float], radius: float = RADIUS
) -> dict:
    """The correlation of the residuals of the two neighbour pairs through every section.

    ``pairs``: lower section -> its pair to the next section. For every section ``m`` with both
    pairs, each point of the pair ``(m, m + 1)`` in ``m`` is paired with every point of the pair
    ``(m - 1, m)`` in ``m`` farther than ``ring[0]`` and at most ``ring[1]`` away (original pixels);
    over all such pairs of the stack the correlation is ``sum(e1 . e2) / sqrt(sum |e1|^2 sum |e2|^2)``.
    ``same_point``: the same with each point matched to the nearest within ``radius`` (session 29).
    Returns :meth:`Correlation.result`."""
    acc = Correlation(ring, radius)
    for lo in sorted(pairs):
        acc.add(lo, pairs[lo])
    return acc.result()


def decide(elastic, reading: dict, limit: float = LIMIT, corrected: bool | None = None) -> dict:
    """``elastic="auto"``'s decision from :func:`residual_correlation`'s ``reading``: distorted where the
    correlation is at most ``limit`` and at least :data:`SE_FACTOR` of its standard errors under 0, or,
    with ``corrected`` (default :data:`CORRECTED`), where the lag-corrected reading (``corrected``,
    session 33) is at most ``limit`` and :func:`corrected_bound` of its own standard errors under 0
    (Student's t over the sections it is read through; session 34). The record: ``correlation``,
    ``se``, ``limit``, ``se_factor``, ``points``, ``sections``, ``same_point``, ``rms``, ``ring`` (work
    pixels), ``lag2``, ``corrected``, ``corrected_se``, ``corrected_sections``, ``corrected_bound``,
    ``corrected_rule`` (whether the lag-corrected reading was asked), ``read_by`` (``"ring"``,
    ``"corrected"`` or None: which reading found the distortion) and ``distorted`` (whether the elastic
    step runs; an unmeasured stack, too few points or under 3 sections for the standard error, is left
    undistorted)."""
    corrected = CORRECTED if corrected is None else bool(corrected)
    value, se = reading["value"], reading["se"]
    ring = value is not None and se is not None and value <= limit and value <= -SE_FACTOR * se
    c, c_se = reading.get("corrected"), reading.get("corrected_se")
    bound = corrected_bound(reading.get("corrected_sections", 0))
    lag = (
        corrected
        and bound is not None
        and c is not None
        and c_se is not None
        and c <= limit
        and c <= -bound * c_se
    )
    return {
        "elastic": elastic, "correlation": value, "se": se, "limit": limit, "se_factor": SE_FACTOR,
        "points": reading["points"], "sections": reading["sections"], "same_point": reading["same_point"],
        "rms": reading["rms"], "ring": list(RING), "lag2": reading.get("lag2"), "corrected": c,
        "corrected_se": c_se, "corrected_sections": reading.get("corrected_sections", 0),
        "corrected_bound": bound, "corrected_rule": corrected,
        "read_by": "ring" if ring else "corrected" if lag else None, "distorted": bool(ring or lag),
    }  # fmt: skip
