"""Synthetic serial-section electron microscopy stacks with mitochondria masks.

Test and demo data for the ``mito`` engine (EM section alignment with keypoints inside
mitochondria). Structures are 3D objects cut by every section, so consecutive sections agree
and change slowly:

* cytoplasm: a grey level with slowly varying shading and a fine granular texture;
* membranes: thin dark curves, the zero set of a smooth 3D random field;
* vesicles: small dark blobs that persist over a few sections (about 70 per section);
* mitochondria: elongated capsules (darker than cytoplasm) with a dark outer membrane and
  lighter cristae stripes across the long axis, meandering, turning and tapering through depth;
* no net motion: every organelle moves on its own, along a smooth bounded path (slow
  sinusoids with random phases), and the least-squares rigid motion of the whole population
  of mitochondria is removed in every section (vesicle drifts are zero-mean). A common motion
  of everything between sections would be indistinguishable from misalignment, and a
  neighbour-to-neighbour aligner would rightly follow it and accumulate it through depth;
* noise: a slight blur and Gaussian noise per section.

Two options bring back what real stacks have and the default stack has not (both 0 by default,
which leaves the default stack exactly as before):

* ``organelle_drift``: every mitochondrion also moves on a straight path through depth, with a
  common mean velocity of the population (as organelles cut obliquely do) plus its own; the
  rest of the tissue (membranes, vesicles, texture) stays in place. The truth is still the
  unrotated stack, so an aligner that follows the mitochondria accumulates the drift. With
  ``tissue_drift`` the rest of the tissue moves with the population's mean velocity too;
* ``distortion``: every acquired section is deformed smoothly before its rotation
  (compression along one cutting direction by a per-section factor, plus a smooth local warp);
  the unrotated stack and masks stay undistorted (the truth).

Sizes are given for a 256 x 256 section and scale with ``sqrt(H * W) / 256``, so a larger
section looks the same at a finer pixel size. Everything is vectorised numpy / OpenCV; a full
Lucchi++-sized stack (160 x 768 x 1024, rotated, padded 250 px) takes seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage

from ..core.device import check_memory
from ..core.errors import InputError
from ..core.options import check_bool, check_float, check_int, check_int_list

__all__ = ["em_stack", "rotation_matrix"]


#: Sinusoids per wander (path, turn and cristae phase of every mitochondrion).
_TERMS = 3
#: Range of the wander periods, in sections: slow enough to look like a smooth path.
_PERIODS = (25.0, 150.0)


def _wander(rng, amplitude: float, dims: int):
    """Random smooth, bounded, zero-mean wander: ``_TERMS`` sinusoids with random phases.

    Returns ``(amplitudes (K, dims), angular frequencies (K,), phases (K, dims))`` for
    :func:`_wander_at`; the root-mean-square value of each dimension is ``amplitude``.
    """
    freq = 2 * np.pi / rng.uniform(*_PERIODS, _TERMS)
    amp = rng.uniform(0.5, 1.5, (_TERMS, dims))
    amp *= amplitude * math.sqrt(2.0 / _TERMS) / np.sqrt((amp**2).mean(0, keepdims=True))
    return amp, freq, rng.uniform(0, 2 * np.pi, (_TERMS, dims))


def _wander_at(w, k: float) -> np.ndarray:
    amp, freq, phase = w
    return (amp * np.sin(freq[:, None] * k + phase)).sum(0)


@dataclass
class _Mito:
    """One mitochondrion: a capsule whose centre, direction and cristae wander through depth.

    Every wander is bounded and zero-mean (sums of slow sinusoids with random phases), as for
    an organelle that meanders through a tissue block; the motion of the whole population is
    removed afterwards by :func:`_remove_common_motion` (``correction``), because a net
    motion of every organelle between two sections is indistinguishable from misalignment.
    """

    centre: np.ndarray  # (y, x) rest position
    path: tuple  # _wander of the centre, (y, x) pixels
    angle: float  # rest direction of the long axis (radians, (y, x) convention)
    turn: tuple  # _wander of the direction, radians
    half_length: float
    radius: float
    zc: float
    half_extent: float  # sections
    phase: float
    cristae: tuple  # _wander of the cristae phase, radians
    period: float
    #: per-section rigid correction ``(theta (n,), t (n, 2), pivot (2,))``, shared by all
    correction: tuple | None = None
    #: linear drift ``(velocity (2,) px per section, section where it is zero)``, added after
    #: the correction (``organelle_drift``)
    drift: tuple | None = None

    def at(self, k: float):
        """Centre, angle, half-length, radius and cristae phase in section ``k``."""
        dz = k - self.zc
        taper = float(np.clip((self.half_extent - abs(dz)) / (0.3 * self.half_extent), 0.0, 1.0))
        centre = self.centre + _wander_at(self.path, k)
        angle = self.angle + float(_wander_at(self.turn, k)[0])
        if self.correction is not None:
            theta, t, pivot = self.correction
            i = int(np.clip(round(k), 0, len(theta) - 1))
            co, si = math.cos(theta[i]), math.sin(theta[i])
            # undo the population's rigid motion: R(theta)^T (centre - pivot - t) + pivot
            d = centre - pivot - t[i]
            centre = pivot + np.array([co * d[0] + si * d[1], -si * d[0] + co * d[1]])
            angle -= float(theta[i])
        if self.drift is not None:
            centre = centre + self.drift[0] * (k - self.drift[1])
        return (
            centre,
            angle,
            self.half_length * taper,
            self.radius * math.sqrt(taper),
            self.phase + float(_wander_at(self.cristae, k)[0]),
        )

    def axis_points(self, k: float, count: int = 7) -> np.ndarray:
        centre, angle, half, _, _ = self.at(k)
        t = np.linspace(-half, half, count)[:, None]
        return centre[None] + t * np.array([math.cos(angle), math.sin(angle)])[None]

    def rest_points(self, count: int = 7) -> np.ndarray:
        """Points on the long axis at the rest position and direction, full length."""
        t = np.linspace(-self.half_length, self.half_length, count)[:, None]
        return self.centre[None] + t * np.array([math.cos(self.angle), math.sin(self.angle)])[None]


def _rigid_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares rotation ``theta`` ((y, x) convention) and translation: ``dst ~ R src + t``."""
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, d]) @ u.T
    return math.atan2(r[1, 0], r[0, 0]), cd - r @ cs


def _remove_common_motion(mitos: list[_Mito], n: int, s: float) -> None:
    """Make the population of mitochondria free of net rigid motion through depth.

    For every section, the least-squares rigid map from the rest positions of the mitochondria
    present (points along their long axes, so their own turning counts too) to their
    positions in that section is fitted, and its inverse is applied to all of them there.
    What remains is each mitochondrion's own motion relative to the others.
    """
    if len(mitos) < 2:
        return
    rest = [m.rest_points() for m in mitos]
    pivot = np.concatenate(rest).mean(0)
    theta, shift = np.zeros(n), np.zeros((n, 2))
    for k in range(n):
        src, dst = [], []
        for m, r in zip(mitos, rest):
            if m.at(k)[3] >= 1.5 * s:  # drawn in this section
                src.append(r - pivot)
                dst.append(m.axis_points(k) - pivot)
        if len(src) >= 2:
            theta[k], shift[k] = _rigid_fit(np.concatenate(src), np.concatenate(dst))
    for m in mitos:
        m.correction = (theta, shift, pivot)


def rotation_matrix(angle: float, shape: Sequence[int]) -> np.ndarray:
    """Homogeneous 3x3 (y, x) rotation by ``angle`` radians about the centre of ``shape``.

    ``M = T(c) R(angle) T(-c)`` with ``R = [[cos, -sin], [sin, cos]]`` and
    ``c = ((H - 1) / 2, (W - 1) / 2)``.
    """
    c = np.array([(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0])
    co, si = math.cos(angle), math.sin(angle)
    r = np.array([[co, -si], [si, co]])
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = c - r @ c
    return m


def _grf(shape, sigma, rng) -> np.ndarray:
    """Gaussian random field with unit standard deviation."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-6)


def _upsample(low: np.ndarray, shape) -> np.ndarray:
    return cv2.resize(low, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _make_mitos(n_mito, n_sections, shape, s, rng) -> list[_Mito]:
    h, w = shape
    mitos: list[_Mito] = []
    probes = np.unique(np.linspace(0, n_sections - 1, min(n_sections, 9)).round())
    tries = 0
    while len(mitos) < n_mito and tries < 60 * max(n_mito, 1):
        tries += 1
        radius = rng.uniform(6.0, 9.5) * s
        half_length = rng.uniform(0.5, 3.5) * radius
        margin = radius + 0.5 * half_length + 3.0 * s
        if h <= 2 * margin or w <= 2 * margin:
            continue
        m = _Mito(
            centre=np.array([rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)]),
            path=_wander(rng, 1.2 * s, 2),  # ~0.17 s px per section (rms), 1.2 s px rms per axis
            angle=rng.uniform(-np.pi, np.pi),
            turn=_wander(rng, 0.08, 1),  # about 0.01 radians per section
            half_length=half_length,
            radius=radius,
            zc=(n_sections - 1) / 2.0 + rng.uniform(-0.35, 0.35) * n_sections,
            half_extent=max(10.0, rng.uniform(0.8, 2.5) * n_sections),
            phase=rng.uniform(0, 2 * np.pi),
            cristae=_wander(rng, 1.5, 1),  # stripes shift by up to most of a period
            period=rng.uniform(6.0, 9.0) * s,
        )
        # keep capsules apart in every probed section (axis-to-axis distance > radii + gap)
        ok = True
        for other in mitos:
            for k in probes:
                a, b = m.axis_points(k), other.axis_points(k)
                dist = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min()
                if dist < m.radius + other.radius + 4.0 * s:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            mitos.append(m)
    _remove_common_motion(mitos, n_sections, s)
    return mitos


def _make_vesicles(n: int, shape, s: float, rng) -> dict:
    """Vesicles: random positions, each alive for 2-6 sections, drifting slightly.

    Their number grows with the stack so that about 70 are alive in every section whatever
    its length, and their drifts are zero-mean (no net motion of the population).
    """
    h, w = shape
    count = int(round(18 * (n + 4)))
    pos = rng.uniform((0, 0), (h, w), (count, 2))
    start = rng.uniform(-4.0, n, count)
    stop = start + rng.uniform(2.0, 6.0, count)
    drift = rng.normal(0.0, 0.3 * s, (count, 2))
    drift -= drift.mean(0)
    return {"pos": pos, "start": start, "stop": stop, "drift": drift}


def _vesicles_at(v: dict, k: int) -> np.ndarray:
    """``(m, 2)`` (y, x) centres of the vesicles alive in section ``k``."""
    alive = (v["start"] <= k) & (k < v["stop"])
    return v["pos"][alive] + v["drift"][alive] * (k - v["start"][alive])[:, None]


def _draw_mito(img, mask, mito: _Mito, k: int, label: int, s: float) -> None:
    h, w = img.shape
    centre, angle, half, radius, phase = mito.at(k)
    if radius < 1.5 * s:
        return
    ext = half + radius + 2.0
    y0, y1 = max(int(centre[0] - ext), 0), min(int(centre[0] + ext) + 2, h)
    x0, x1 = max(int(centre[1] - ext), 0), min(int(centre[1] + ext) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(centre[0]))[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(centre[1]))[None, :]
    co, si = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    t = dy * co + dx * si  # along the long axis
    n = -dy * si + dx * co  # across it
    sd = np.hypot(np.maximum(np.abs(t) - np.float32(half), 0), n) - np.float32(radius)
    alpha = np.clip(0.5 - sd, 0.0, 1.0)
    # cristae: wavy light stripes across the long axis, inside the inner membrane
    stripes = np.cos(
        (2 * np.pi / mito.period) * t + np.float32(phase) + 1.3 * np.sin(n * np.float32(1.6 / radius))
    )
    cristae = np.clip((stripes - 0.55) / 0.45, 0.0, 1.0) * np.clip((-sd - 3.0 * s) / (1.5 * s), 0.0, 1.0)
    value = 0.27 + 0.17 * cristae
    membrane = np.clip((sd + 2.2 * s) / (0.8 * s), 0.0, 1.0)  # 1 on the outer membrane
    value = value * (1 - membrane) + 0.15 * membrane
    sub = img[y0:y1, x0:x1]
    sub *= 1 - alpha
    sub += alpha * value
    mask[y0:y1, x0:x1][sd < 0] = label


def em_stack(
    n_sections: int = 8,
    shape: Sequence[int] = (256, 256),
    n_mito: int | None = None,
    seed: int | None = 0,
    rotate: bool = True,
    pad: int | None = None,
    noise: float = 0.05,
    organelle_drift: float = 0.0,
    distortion: float = 0.0,
    placement_shift: float = 0.0,
    tissue_drift: bool = False,
    placement_trend: float = 0.0,
) -> dict:
    """A synthetic EM stack with mitochondria instance masks, optionally rotated per section.

    Parameters
    ----------
    n_sections
        Number of sections (the stack's first axis).
    shape
        ``(y, x)`` size of one section before padding.
    n_mito
        Number of mitochondria (3D objects) to place; ``None`` means 10. Fewer are placed when
        they do not fit without touching. Some may be absent from sections near their ends.
    seed
        Seed of :func:`numpy.random.default_rng`; the result is fully determined by it.
    rotate
        Rotate every section by a random angle in ``(-pi, pi)`` about its centre (after padding).
    pad
        Zero border added on every side of every section. ``None``: with ``rotate``, the
        smallest border that keeps rotated corners inside (``ceil(hypot(H, W) / 2 - min(H, W) / 2)``,
        plus the largest ``placement_shift`` translation drawn; the Lucchi++ protocol used 250 px
        for 768 x 1024), else ``ceil(3 * placement_shift)`` (0 without it), so that shifted
        sections keep their edges.
    noise
        Standard deviation of the Gaussian noise, in units of the full intensity range.
    organelle_drift
        Mean speed of the mitochondria population, in ``scale`` pixels per section (0: no net
        motion, the default). Each mitochondrion moves on a straight path through depth with
        the population velocity (random direction, this speed) plus its own (normal, 0.3x
        this speed per axis), zero at the middle section; membranes, vesicles and texture
        stay in place. (The generator before 2026-11-21 drew every mitochondrion's drift from
        ``N(0, 0.25 scale)`` per axis: with 10 mitochondria a net motion of about 0.08.)
    distortion
        Non-linear section distortion, in ``scale`` pixels (0: none, the default): every
        acquired section is compressed along one cutting direction (the same for the stack)
        by a factor ``1 - c`` with ``c ~ N(0, 0.005 * distortion)`` and displaced by a smooth
        random field (correlation length ~60 ``scale`` px) of this root-mean-square amplitude
        per axis. ``unrotated_stack`` and ``unrotated_masks`` stay undistorted.
    placement_shift
        Root-mean-square translation per axis, in pixels, of every acquired section (0: none,
        the default), drawn independently per section, as sections picked up and imaged one by
        one scatter; it is part of ``matrices`` (with or without ``rotate``).
    placement_trend
        Speed, in pixels per section, of a slow drift of the acquired sections as a whole (0: none,
        the default), as stage or beam drift moves the images of a FIB-SEM or serial block-face
        stack: section ``k`` is translated by the sum of the steps up to it (zero at the middle
        section), every step this long, in a direction that turns steadily by a random angle of up
        to 45 degrees over the stack (a straight or slowly curving path). Everything in the section
        moves with it and it is part of ``matrices``: an aligner should recover it, and a drift
        correction that takes it for organelle drift puts it back.
    tissue_drift
        With ``organelle_drift``: the rest of the tissue (cytoplasm shading and texture, membranes,
        vesicles) moves with the mitochondria population's mean velocity too (zero at the middle
        section), as a whole block cut obliquely would: every structure then drifts, which no
        aligner can tell from misalignment (the truth is still the unrotated stack). False (the
        default): only the mitochondria drift.

    Returns
    -------
    dict with

    ``stack``
        ``(n, Y, X)`` uint8, the sections as acquired (rotated and padded when ``rotate``).
    ``masks``
        ``(n, Y, X)`` uint16 mitochondria instance labels of ``stack`` (0 background; the same id
        in every section for the same mitochondrion).
    ``unrotated_stack``, ``unrotated_masks``
        The aligned (ground-truth) stack and masks, padded the same way.
    ``angles``
        ``(n,)`` float64 rotation angle of every section in radians (zeros without ``rotate``).
    ``matrices``
        ``(n, 3, 3)`` float64 homogeneous (y, x) matrices, ``matrices[k] = rotation_matrix(
        angles[k], (Y, X))``, mapping aligned coordinates to coordinates in ``stack[k]``
        (pull-back): ``stack[k]`` sampled at ``matrices[k] @ p`` equals ``unrotated_stack[k]`` at
        ``p``, so ``PerSectionTransform(matrices).warp(stack) ~= unrotated_stack``.
    ``pad``, ``scale``
        The border used and the structure scale factor ``sqrt(H * W) / 256``.
    """
    n = check_int("n_sections", n_sections, 1, 100_000)
    h, w = check_int_list("shape", shape, length=2, low=32)
    rotate = check_bool("rotate", rotate)
    placement_shift = check_float("placement_shift", placement_shift, 0.0, 1e4)
    placement_trend = check_float("placement_trend", placement_trend, 0.0, 1e3)
    rng = np.random.default_rng(seed)
    # drift, distortion, placement and its trend draw from their own streams: the default stack stays
    # as it was (spawn(4) gives the same first three children as spawn(3) did)
    drift_rng, distortion_rng, shift_rng, trend_rng = (
        np.random.default_rng(c) for c in rng.bit_generator.seed_seq.spawn(4)
    )
    shifts = shift_rng.normal(0.0, placement_shift, (n, 2)) if placement_shift else None
    path = _stage_path(n, placement_trend, trend_rng) if placement_trend else None
    if pad is None:
        # unrotated sections shifted by placement_shift get a border of 3 sigma (none before
        # session 12: their shifted edges were cut off); rotated ones the rotation's border plus
        # the largest shift drawn (before session 13 the rotation's only: corners were cut off)
        if rotate:
            largest = 0.0 if shifts is None else float(np.abs(shifts).max())
            largest += 0.0 if path is None else float(np.abs(path).max())
            pad = int(math.ceil(math.hypot(h, w) / 2 - min(h, w) / 2 + largest))
        else:
            pad = math.ceil(3 * placement_shift)
            if placement_trend:
                pad += int(math.ceil(float(np.abs(path).max())))
    pad = check_int("pad", pad, 0)
    n_mito = check_int("n_mito", 10 if n_mito is None else n_mito, 0, 10_000)
    noise = check_float("noise", noise, 0.0, 10.0)
    organelle_drift = check_float("organelle_drift", organelle_drift, 0.0, 100.0)
    distortion = check_float("distortion", distortion, 0.0, 1000.0)
    tissue_drift = check_bool("tissue_drift", tissue_drift)
    if tissue_drift and organelle_drift <= 0:
        raise InputError(
            "tissue_drift moves the tissue with the mitochondria's drift: give organelle_drift > 0 too."
        )
    # stack and masks (uint8 + uint16), aligned and rotated, plus a float32 section at work
    hp, wp = h + 2 * pad, w + 2 * pad
    check_memory(
        (9 if distortion else 6) * n * hp * wp + (40 if distortion else 16) * hp * wp, torch.device("cpu"),
        f"synthetic EM stack of {n} x {hp} x {wp}",
        "Ask for fewer or smaller sections.",
    )  # fmt: skip
    s = math.sqrt(h * w) / 256.0

    # Smooth 3D fields on a coarse grid (about 4 s pixels per coarse cell), cut per section.
    cell = 4.0 * s
    lh, lw = int(math.ceil(h / cell)) + 1, int(math.ceil(w / cell)) + 1
    fy, fx = h / lh, w / lw  # full-resolution pixels per coarse cell after resizing
    membrane_field = _grf((n, lh, lw), (2.5, 13.0 * s / fy, 13.0 * s / fx), rng)
    gy, gx = np.gradient(membrane_field, axis=(1, 2))
    grad = np.sqrt((gy / fy) ** 2 + (gx / fx) ** 2) + 1e-6
    membrane_sd = (membrane_field / grad).astype(np.float32)  # ~ signed distance in pixels
    shading = _grf((n, lh, lw), (3.0, 10.0 * s / fy, 10.0 * s / fx), rng)

    mitos = _make_mitos(n_mito, n, (h, w), s, rng)
    velocity = None  # the tissue's drift (tissue_drift), (y, x) pixels per section
    if organelle_drift > 0:
        mean = _add_drift(mitos, organelle_drift * s, (n - 1) / 2.0, drift_rng)
        velocity = mean if tissue_drift else None
    vesicles = _make_vesicles(n, (h, w), s, rng)
    ves_sigma = 2.0 * s
    brightness = 1.0 + rng.normal(0.0, 0.02, n)

    unrot = np.zeros((n, hp, wp), dtype=np.uint8)
    unrot_masks = np.zeros((n, hp, wp), dtype=np.uint16)
    texture = _blur(rng.standard_normal((h, w)).astype(np.float32), 1.1 * s)
    texture /= max(float(texture.std()), 1e-6)
    for k in range(n):
        # granular texture, correlated with the previous section
        fresh = _blur(rng.standard_normal((h, w)).astype(np.float32), 1.1 * s)
        fresh /= max(float(fresh.std()), 1e-6)
        texture = 0.6 * texture + 0.8 * fresh
        img = 0.62 + 0.05 * _upsample(shading[k], (h, w)) + 0.045 * texture
        sd = _upsample(membrane_sd[k], (h, w))
        img *= 1.0 - 0.5 * np.exp(-((sd / (1.3 * s)) ** 2))
        # vesicles alive in this section
        pos = _vesicles_at(vesicles, k)
        if len(pos):
            iy, ix = np.round(pos).astype(int).T
            keep = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            imp = np.zeros((h, w), dtype=np.float32)
            np.add.at(imp, (iy[keep], ix[keep]), 2 * np.pi * ves_sigma**2)
            img *= 1.0 - 0.45 * np.clip(_blur(imp, ves_sigma), 0.0, 1.0)
        if velocity is not None:  # the tissue moves by velocity (k - k0): img(p - t)
            t = velocity * (k - (n - 1) / 2.0)
            move = np.array([[1.0, 0.0, t[1]], [0.0, 1.0, t[0]]])
            img = cv2.warpAffine(img, move, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        mask = np.zeros((h, w), dtype=np.uint16)
        for i, m in enumerate(mitos):
            _draw_mito(img, mask, m, k, i + 1, s)
        img = _blur(img, 0.5 * s) * brightness[k]
        img += rng.standard_normal((h, w), dtype=np.float32) * np.float32(noise)
        unrot[k, pad : pad + h, pad : pad + w] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        unrot_masks[k, pad : pad + h, pad : pad + w] = mask

    acquired, acquired_masks = unrot, unrot_masks
    if distortion > 0:
        acquired, acquired_masks = _distort(unrot, unrot_masks, distortion * s, s, distortion_rng)
    if not rotate and shifts is None and path is None:
        angles = np.zeros(n)
        matrices = np.repeat(np.eye(3)[None], n, axis=0)
        return {
            "stack": acquired,
            "masks": acquired_masks,
            "unrotated_stack": unrot,
            "unrotated_masks": unrot_masks,
            "angles": angles,
            "matrices": matrices,
            "pad": pad,
            "scale": s,
        }

    angles = rng.uniform(-np.pi, np.pi, n) if rotate else np.zeros(n)
    matrices = np.stack([rotation_matrix(a, (hp, wp)) for a in angles])
    if shifts is not None:
        matrices[:, :2, 2] += shifts
    if path is not None:  # the stage's drift, in the specimen's frame (before the section's rotation)
        move = np.repeat(np.eye(3)[None], n, axis=0)
        move[:, :2, 2] = path
        matrices = matrices @ move
    stack = np.empty_like(unrot)
    masks = np.empty_like(unrot_masks)
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)
    for k in range(n):
        # cv2 wants (x, y); with WARP_INVERSE_MAP it takes the map from output to input pixels,
        # i.e. rotated -> aligned, the inverse of matrices[k]
        inv_xy = (swap @ np.linalg.inv(matrices[k]) @ swap)[:2]
        stack[k] = cv2.warpAffine(
            acquired[k],
            inv_xy,
            (wp, hp),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        masks[k] = cv2.warpAffine(
            acquired_masks[k],
            inv_xy,
            (wp, hp),
            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    return {
        "stack": stack,
        "masks": masks,
        "unrotated_stack": unrot,
        "unrotated_masks": unrot_masks,
        "angles": angles,
        "matrices": matrices,
        "pad": pad,
        "scale": s,
    }


def _stage_path(n: int, speed: float, rng) -> np.ndarray:
    """``(n, 2)`` (y, x) offsets of a drifting stage (``placement_trend`` in :func:`em_stack`): steps
    of ``speed`` px per section whose direction turns steadily by a random angle in (-pi/4, pi/4)
    over the stack; zero at the middle section."""
    phi0, bend = rng.uniform(-np.pi, np.pi), rng.uniform(-np.pi / 4, np.pi / 4)
    phi = phi0 + bend * (np.arange(n) / max(n - 1, 1) - 0.5)
    steps = speed * np.stack([np.sin(phi), np.cos(phi)], axis=1)
    path = np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], axis=0)])
    return path - path[(n - 1) // 2]


def _add_drift(mitos: list[_Mito], speed: float, k0: float, rng) -> np.ndarray:
    """Give every mitochondrion a straight drift: the population velocity (``speed`` px per
    section in a random direction, returned) plus its own (normal, ``0.3 * speed`` per axis)."""
    phi = rng.uniform(-np.pi, np.pi)
    mean = speed * np.array([math.sin(phi), math.cos(phi)])
    for m in mitos:
        m.drift = (mean + rng.normal(0.0, 0.3 * speed, 2), k0)
    return mean


def _distort(stack: np.ndarray, masks: np.ndarray, amplitude: float, s: float, rng):
    """Sections deformed smoothly (see ``distortion`` in :func:`em_stack`): ``(stack, masks)``;
    section ``k`` is resampled at ``p + d_k(p)``."""
    n, hp, wp = stack.shape
    phi = rng.uniform(-np.pi, np.pi)
    u = np.array([math.sin(phi), math.cos(phi)], dtype=np.float32)  # cutting direction (y, x)
    yy, xx = np.mgrid[0:hp, 0:wp].astype(np.float32)
    along = (yy - (hp - 1) / 2) * u[0] + (xx - (wp - 1) / 2) * u[1]
    cell = 16.0 * s  # coarse grid; the field's correlation length is ~4 cells
    lh, lw = int(math.ceil(hp / cell)) + 1, int(math.ceil(wp / cell)) + 1
    out, out_masks = np.empty_like(stack), np.empty_like(masks)
    disp = np.empty((2, hp, wp), dtype=np.float32)
    for k in range(n):
        c = float(rng.normal(0.0, 0.005 * amplitude / s))
        for axis in range(2):
            field = _upsample(_grf((lh, lw), 2.0, rng) * np.float32(amplitude), (hp, wp))
            disp[axis] = field - c * along * u[axis]
        map_y, map_x = yy + disp[0], xx + disp[1]
        out[k] = cv2.remap(stack[k], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        out_masks[k] = cv2.remap(masks[k], map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    return out, out_masks
