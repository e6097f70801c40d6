"""Are the sections distorted? The sign of the pair residuals' correlation through a section.

A neighbour pair's sub-pixel tracks (:func:`.features.refine`) leave a residual after the pair's
richest model (the homography): what no projective map explains. Take a section ``m`` and its two
neighbour pairs ``(m - 1, m)`` and ``(m, m + 1)``, and at the same place of ``m`` the residual of
each, both as the motion of the content from the lower section to the higher one, in ``m``'s frame:

* where every section carries its own smooth distortion ``d_k`` (cut sections, :func:`em_stack`'s
  ``distortion``), the first residual is ``d_{m-1} - d_m`` and the second ``d_m - d_{m+1}``: they
  share ``d_m`` with opposite signs, so their correlation is negative (-0.5 where the distortion is
  all there is);
* where the content moves on through the stack (mitochondria drifting, tubes cut obliquely changing
  shape), the two residuals point the same way: positive;
* tracking noise added to each pair separately is independent between the pairs: 0. **Image noise
  is not**: the noise of section ``m`` enters both pairs' tracks at the same place with opposite
  signs, as a distortion would, so noisy undistorted stacks read negative too (review 2 of session
  29: ``em_stack`` noise 0.1-0.3 reads -0.01 to -0.09 undistorted, inside the distorted range).

So the correlation (:func:`residual_correlation`) is a unitless number that does not depend on the
image size, the stack length or the number of keypoints (only its precision does), and it is read
from the tracks the neighbour pairs already make: no image is read again. ``elastic="auto"`` runs
the elastic step where it is at most :data:`LIMIT` (docs/mito.md, session 29). It is opt-in (the
default is ``elastic=False``) until the reading tells image noise from distortion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ...core.errors import InputError
from .features import project

#: :func:`.align.align_stack`'s ``elastic`` default: off. ``"auto"`` is opt-in: image noise reads as
#: distortion (module docstring), so on noisy undistorted stacks it ran the elastic step at ~10-40x the
#: CPU and lost up to 0.011 Dice (review 2 of session 29).
DEFAULT_ELASTIC: bool | str = False

#: ``elastic="auto"``: the elastic step runs where the correlation is at most this (session 29).
LIMIT = -0.03

#: Fewest matched residual pairs (points) over the stack for a reading; fewer: "unmeasured".
MIN_POINTS = 200

#: Radius, in work pixels, within which a residual of one pair is matched to one of the other pair.
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
    ``p_hi`` the same tracks' points in ``hi`` with ``e_hi`` the residual in ``hi``'s frame."""

    lo: int
    p_lo: np.ndarray
    e_lo: np.ndarray
    p_hi: np.ndarray
    e_hi: np.ndarray


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
    return PairResidual(min(a, b), p_lo, e_lo, p_hi, e_hi)


class Correlation:
    """:func:`residual_correlation` accumulated as the neighbour pairs arrive (:func:`.align.align_stack`):
    a section's sums are taken as soon as both its pairs are in, and a pair is dropped once both its
    sections are counted, so memory does not grow with the stack (the neighbours of a failed section,
    whose pair never arrives, are held to the end). The sums follow the pairs' arrival order, so with
    several workers the last digits may differ between runs (review 2 of session 29, A4 / A5)."""

    def __init__(self, radius: float):
        self.radius = radius
        self.pairs: dict[int, PairResidual | None] = {}  # lower section -> its pair (None: no residuals)
        self.done: set[int] = set()  # middle sections counted or impossible
        self.s12 = self.s11 = self.s22 = 0.0
        self.count = self.used = 0

    def add(self, lo: int, pair: PairResidual | None) -> None:
        """The pair from section ``lo`` to ``lo + 1`` (None where that pair gave no residuals)."""
        self.pairs[lo] = pair
        for m in (lo, lo + 1):
            if m in self.done or m - 1 not in self.pairs or m not in self.pairs:
                continue
            self.done.add(m)
            self._count(self.pairs[m - 1], self.pairs[m])
        for k in (lo - 1, lo, lo + 1):  # a pair serves the middles k and k + 1
            if k in self.pairs and k in self.done and k + 1 in self.done:
                del self.pairs[k]

    def _count(self, below: PairResidual | None, above: PairResidual | None) -> None:
        if below is None or above is None or len(below.p_hi) == 0 or len(above.p_lo) == 0:
            return
        dist, idx = cKDTree(below.p_hi).query(above.p_lo, distance_upper_bound=self.radius)
        ok = np.isfinite(dist)
        if not ok.any():
            return
        e1, e2 = below.e_hi[idx[ok]], above.e_lo[ok]
        self.s12 += float(np.sum(e1 * e2))
        self.s11 += float(np.sum(e1 * e1))
        self.s22 += float(np.sum(e2 * e2))
        self.count += int(ok.sum())
        self.used += 1

    def result(self) -> dict:
        """``value`` (None when fewer than :data:`MIN_POINTS` points matched), ``points``, ``sections``
        (middles used), ``rms`` (px, of the residuals used: context only, it depends on the image size)."""
        s11, s22, count = self.s11, self.s22, self.count
        value = self.s12 / np.sqrt(s11 * s22) if count >= MIN_POINTS and s11 > 0 and s22 > 0 else None
        rms = float(np.sqrt((s11 + s22) / (2 * count))) if count else None
        return {
            "value": None if value is None else float(value),
            "points": count,
            "sections": self.used,
            "rms": rms,
        }


def residual_correlation(pairs: dict[int, PairResidual], radius: float) -> dict:
    """The correlation of the residuals of the two neighbour pairs through every section.

    ``pairs``: lower section -> its pair to the next section. For every section ``m`` with both
    pairs, each point of the pair ``(m, m + 1)`` in ``m`` is matched to the nearest point of the pair
    ``(m - 1, m)`` in ``m`` within ``radius`` (original pixels); over all matched points of the stack
    the correlation is ``sum(e1 . e2) / sqrt(sum |e1|^2 sum |e2|^2)``. Returns
    :meth:`Correlation.result`."""
    acc = Correlation(radius)
    for lo in sorted(pairs):
        acc.add(lo, pairs[lo])
    return acc.result()


def decide(elastic, reading: dict, limit: float = LIMIT) -> dict:
    """``elastic="auto"``'s decision from :func:`residual_correlation`'s ``reading``: the record
    (``correlation``, ``limit``, ``points``, ``sections``, ``distorted``: whether the elastic step
    runs; an unmeasured stack, too few matched points, is left undistorted)."""
    value = reading["value"]
    distorted = value is not None and value <= limit
    return {
        "elastic": elastic, "correlation": value, "limit": limit, "points": reading["points"],
        "sections": reading["sections"], "rms": reading["rms"], "distorted": bool(distorted),
    }  # fmt: skip
