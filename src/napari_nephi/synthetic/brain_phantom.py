"""A 3D brain-like phantom with nested, layered structures and region labels.

The reference of the atlas-lookup benchmark. Axes ``(z, y, x)`` as :func:`toy_atlas`: ``z`` runs
anterior (plate 0) to posterior, ``y`` dorsal (top) to ventral, ``x`` across two mirrored
hemispheres. Unlike the toy atlas, whose structures are plain ellipsoids, every structure here
changes shape and position from plate to plate, as in a coronal atlas: olfactory bulbs in
front; a cortex of five layers over a white-matter sheet, with the corpus callosum crossing the
midline; striatum pierced by fibre bundles that drift along ``z``; lateral ventricles, septum and
anterior commissure; thalamus, hypothalamus and a third ventricle; a hippocampus-like fold
(interlocking CA and dentate arcs) that moves from dorsomedial to ventrolateral and turns; the
midbrain with its aqueduct; behind, a foliated cerebellum (molecular, granular and white-matter
layers) with paraflocculi over the brainstem and fourth ventricle. Intensities are Nissl-like
(stain density: cell-dense layers bright, white matter and ventricles dark, background 0), with
a cell-like texture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

from ..core.errors import InputError

__all__ = ["PHANTOM_REGIONS", "brain_phantom"]

#: Label value -> region name of :func:`brain_phantom` (0 is background).
PHANTOM_REGIONS = {
    0: "background",
    1: "cortex layer 1",
    2: "cortex layer 2/3",
    3: "cortex layer 4",
    4: "cortex layer 5",
    5: "cortex layer 6",
    6: "corpus callosum and external capsule",
    7: "striatum",
    8: "fibre tracts (internal capsule)",
    9: "lateral ventricle",
    10: "septum",
    11: "anterior commissure",
    12: "thalamus",
    13: "hypothalamus",
    14: "hippocampus CA pyramidal layer",
    15: "dentate gyrus",
    16: "hippocampus strata",
    17: "third ventricle and aqueduct",
    18: "midbrain",
    19: "cerebellum molecular layer",
    20: "cerebellum granular layer",
    21: "cerebellar white matter",
    22: "brainstem",
    23: "fourth ventricle",
    24: "olfactory bulb outer layers",
    25: "olfactory bulb granule layer",
    26: "other grey matter",
}

# Nissl-like stain density per region (background 0)
_DENSITY = {
    1: 0.30,
    2: 0.86,
    3: 0.72,
    4: 0.60,
    5: 0.76,
    6: 0.13,
    7: 0.55,
    8: 0.18,
    9: 0.04,
    10: 0.50,
    11: 0.14,
    12: 0.63,
    13: 0.68,
    14: 0.97,
    15: 1.00,
    16: 0.36,
    17: 0.04,
    18: 0.50,
    19: 0.30,
    20: 0.93,
    21: 0.12,
    22: 0.45,
    23: 0.04,
    24: 0.55,
    25: 0.85,
    26: 0.47,
}
_FIBRE = (6, 8, 11, 21)  # white matter: little texture
_FLUID = (9, 17, 23)  # ventricles: no texture


class _Profiles:
    """Smooth functions of the normalised plate position ``t`` in [0, 1], jittered per seed."""

    def __init__(self, t: np.ndarray, rng: np.random.Generator, jitter: float = 0.03):
        self.t = t
        self.rng = rng
        self.jitter = jitter

    def __call__(self, knots: Sequence[float], values: Sequence[float], jitter: bool = True):
        k = np.asarray(knots, dtype=np.float64)
        v = np.asarray(values, dtype=np.float64)
        if jitter:
            k = k + self.rng.uniform(-self.jitter, self.jitter, k.size) * 0.5
            k = np.maximum.accumulate(k + np.arange(k.size) * 1e-6)
            v = v * (1 + self.rng.uniform(-self.jitter, self.jitter, v.size))
        out = PchipInterpolator(k, v, extrapolate=False)(self.t)
        fill = np.where(self.t < k[0], v[0], v[-1])
        out = np.where(np.isnan(out), fill, out)
        return out[:, None, None]


def _inside(dy, dx, ry, rx, power: float = 2.0) -> np.ndarray:
    """Normalised radius of a superellipse (< 1 inside); zero radii give an empty shape."""
    ry = np.maximum(ry, 1e-6)
    rx = np.maximum(rx, 1e-6)
    return (np.abs(dy / ry) ** power + np.abs(dx / rx) ** power) ** (1.0 / power)


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shp = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise InputError(f"shape must be three integers (z, y, x), got {shape!r}.") from exc
    if len(shp) != 3 or min(shp) < 24:
        raise InputError(
            f"shape must be three integers (z, y, x), each >= 24 (e.g. (132, 96, 112)); got {shape!r}."
        )
    return shp


def _forebrain(P, y, ax, shp):
    """Outline of the forebrain, its cortex layers and white matter, and the midline fissure."""
    w = P([0.08, 0.14, 0.25, 0.45, 0.6, 0.72, 0.8, 0.87], [0, 0.5, 0.74, 0.86, 0.92, 0.9, 0.72, 0])
    h = P([0.08, 0.14, 0.25, 0.45, 0.6, 0.72, 0.8, 0.87], [0, 0.5, 0.62, 0.7, 0.72, 0.7, 0.55, 0])
    yc = P([0.1, 0.3, 0.6, 0.75, 0.87], [-0.12, -0.08, -0.05, -0.1, -0.25])
    dy = y - yc
    r = np.where(dy < 0, _inside(dy, ax, h, w, 2.4), _inside(dy, ax, 0.85 * h, w, 3.5))
    fore = r < 1
    top = yc - h
    ycc = top + 0.34  # level of the corpus callosum under the dorsal cortex
    cc_zone = P([0.2, 0.26, 0.55, 0.63], [0, 1, 1, 0]) > 0.5
    fissure_end = np.where(cc_zone, ycc - 0.03, ycc + 0.12)
    fissure = (ax < 0.5 / shp[2] + 0.012) & (y < fissure_end) & (P.t[:, None, None] < 0.8)
    fore &= ~fissure
    return fore, dict(w=w, h=h, yc=yc, ycc=ycc, cc_zone=cc_zone, fissure=fissure)


def _cortex(labels, fore, f, y, ax, shp):
    """Five cortical layers and the white matter beneath them, by depth from the surface."""
    depth = ndimage.distance_transform_edt(fore)
    thick = 0.2 * shp[2] / 2  # cortex thickness in voxels (about a fifth of a hemisphere)
    rel = (depth - 0.5) / thick
    extent = y < f["yc"] + 0.45 * f["h"]  # down to the rhinal fissure
    bounds = (0.0, 0.12, 0.4, 0.52, 0.74, 1.0)
    for k in range(5):
        layer = fore & extent & (rel > bounds[k]) & (rel <= bounds[k + 1])
        labels[layer] = k + 1
    wm = fore & extent & (rel > 1.0) & (rel <= 1.25)
    callosum = fore & f["cc_zone"] & (np.abs(y - f["ycc"]) < 0.045) & (ax < 0.5 * f["w"])
    labels[wm | callosum] = 6
    return rel


def _basal(labels, fore, deep, f, P, y, ax, rng):
    """Striatum with drifting fibre bundles, ventricles, septum, anterior commissure, diencephalon."""
    yc, h, w = f["yc"], f["h"], f["w"]
    s = P([0.14, 0.2, 0.35, 0.5, 0.6], [0, 0.8, 1, 0.7, 0])
    sy, sx = yc + 0.12, 0.42 * w
    ry, rx = 0.33 * h * s, 0.22 * s + 1e-6
    stri = fore & deep & (_inside(y - sy, ax - sx, ry, rx) < 1)
    labels[stri] = 7
    # fibre bundles: tubes from scattered starts converging to the internal capsule
    t = np.clip((P.t[:, None, None] - 0.18) / 0.42, 0, 1)
    for _ in range(12):
        ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0.05, 0.7))
        u = rad * np.cos(ang) * (1 - t) + 0.45 * t
        v = rad * np.sin(ang) * (1 - t) - 0.35 * t
        tube = _inside((y - sy) / np.maximum(ry, 1e-6) - u, (ax - sx) / rx - v, 0.12, 0.12) < 1
        labels[stri & tube] = 8
    ic_zone = P([0.45, 0.5, 0.62, 0.68], [0, 1, 1, 0]) > 0.5
    capsule = ic_zone & fore & deep & (np.abs(ax - (0.5 * w - 0.35 * (y - yc))) < 0.05)
    labels[capsule & (y > yc - 0.25) & (y < yc + 0.5)] = 8
    # septum between the lateral ventricles
    sep = P([0.2, 0.24, 0.45, 0.52], [0, 1, 1, 0]) > 0.5
    labels[fore & deep & sep & (ax < 0.12) & (y > f["ycc"] + 0.04) & (y < yc + 0.35)] = 10
    v = P([0.18, 0.25, 0.4, 0.55, 0.63], [0, 0.6, 1, 0.5, 0])
    vy, vx = f["ycc"] + 0.2, 0.13 + 0.08 * v
    rot_y, rot_x = (y - vy) * 0.94 + (ax - vx) * 0.34, (ax - vx) * 0.94 - (y - vy) * 0.34
    labels[fore & (_inside(rot_y, rot_x, 0.18 * v, 0.025 + 0.025 * v) < 1)] = 9
    # anterior commissure: two round limbs in front, one crossing band at ~0.43
    limb = P([0.2, 0.24, 0.38, 0.41], [0, 1, 1, 0]) > 0.5
    lx = 0.14 + 0.5 * np.clip(0.41 - P.t[:, None, None], 0, 1)
    labels[fore & limb & (_inside(y - (yc + 0.32), ax - lx, 0.05, 0.045) < 1)] = 11
    cross = P([0.4, 0.42, 0.45, 0.47], [0, 1, 1, 0], jitter=False) > 0.5
    labels[fore & cross & (np.abs(y - (yc + 0.34)) < 0.05) & (ax < 0.45)] = 11
    # thalamus, hypothalamus, third ventricle
    th = P([0.44, 0.5, 0.62, 0.72, 0.77], [0, 0.8, 1, 0.8, 0])
    labels[fore & deep & (_inside(y - (yc + 0.08), ax, 0.26 * th, 0.45 * th) < 1)] = 12
    hy = P([0.36, 0.42, 0.6, 0.72, 0.76], [0, 1, 1, 0.7, 0])
    labels[fore & (_inside(y - (yc + 0.5), ax, 0.15 * hy, 0.3 * hy) < 1)] = 13
    v3 = P([0.42, 0.45, 0.72, 0.75], [0, 1, 1, 0]) > 0.5
    labels[fore & v3 & (ax < 0.025) & (y > yc - 0.02) & (y < yc + 0.55)] = 17


def _hippocampus(labels, fore, deep, P, y, ax):
    """Interlocking CA and dentate arcs that move ventrolaterally and turn along ``z``."""
    yh = P([0.52, 0.62, 0.72, 0.8, 0.87], [-0.36, -0.3, -0.15, 0.05, 0.15])
    xh = P([0.52, 0.62, 0.72, 0.8, 0.87], [0.18, 0.28, 0.42, 0.55, 0.6])
    rad = P([0.5, 0.56, 0.7, 0.8, 0.88], [0, 0.17, 0.2, 0.18, 0])
    phi = P([0.52, 0.87], [0.0, 1.4])
    dy, dx = y - yh, ax - xh
    u = dy * np.cos(phi) - dx * np.sin(phi)
    v = dy * np.sin(phi) + dx * np.cos(phi)
    rho = np.sqrt(u * u + v * v) / np.maximum(rad, 1e-6)
    theta = np.arctan2(u, v)
    zone = fore & deep & (rad > 0.02)
    labels[zone & (rho < 1.3)] = 16
    labels[zone & (np.abs(rho - 1) < 0.13) & (np.abs(theta) < 2.3)] = 14
    labels[zone & (np.abs(rho - 0.5) < 0.11) & (np.abs(theta) > 0.9)] = 15


def _hindbrain(labels, P, y, x, ax):
    """Midbrain, foliated cerebellum with paraflocculi, brainstem and fourth ventricle."""
    mb = P([0.64, 0.7, 0.82, 0.9], [0, 1, 0.9, 0])
    my = P([0.64, 0.9], [0.1, -0.05])
    mid = _inside(y - my, ax, 0.35 * mb, 0.42 * mb) < 1
    labels[mid & ((labels == 0) | (labels == 26) | (labels == 12))] = 18
    labels[mid & (_inside(y - (my - 0.05), ax, 0.05 * mb, 0.03 * mb) < 1)] = 17
    wb = P([0.45, 0.55, 0.7, 0.78, 0.88, 1.0], [0, 0.28, 0.4, 0.46, 0.38, 0.22])
    hb = P([0.45, 0.55, 0.7, 0.78, 0.88, 1.0], [0, 0.18, 0.24, 0.3, 0.22, 0.16])
    by = P([0.55, 0.8, 1.0], [0.42, 0.36, 0.3])
    stem = _inside(y - by, ax, hb, wb) < 1
    labels[stem & ((labels == 0) | ((labels == 26) & (P.t[:, None, None] > 0.74)))] = 22
    wc = P([0.73, 0.8, 0.9, 0.97, 1.0], [0, 0.62, 0.76, 0.5, 0.1])
    hc = P([0.73, 0.8, 0.9, 1.0], [0, 0.36, 0.46, 0.15])
    cy = by - hb - 0.9 * hc + 0.05
    rc = _inside(y - cy, x, hc, wc)
    cb = (rc < 1) & ~stem
    theta = np.arctan2(y - cy, x)
    wave = np.cos(10 * theta + 5.0 * P.t[:, None, None])
    gran = 0.78 + 0.1 * wave
    labels[cb] = 19
    labels[cb & (rc < gran) & (wave > -0.85)] = 20
    labels[cb & ((rc < gran - 0.22) | ((wave > 0.75) & (rc < gran - 0.05)))] = 21
    pf = P([0.8, 0.83, 0.9, 0.93], [0, 1, 1, 0])
    rp = _inside(y - (cy + 0.3 * hc), ax - 0.8 * wc - 0.06, 0.14 * pf, 0.1 * pf)
    labels[(rp < 1) & (labels == 0)] = 19
    labels[(rp < 0.7) & (labels == 19)] = 20
    v4 = P([0.8, 0.84, 0.92, 0.96], [0, 1, 1, 0])
    labels[_inside(y - (by - hb + 0.02), ax, 0.05 * v4, 0.15 * v4) < 1] = 23


def _olfactory(labels, P, y, ax):
    ob = P([0.0, 0.03, 0.1, 0.16], [0, 1, 1, 0])
    r = _inside(y + 0.08, ax - 0.2, 0.32 * ob, 0.19 * ob)
    labels[(r < 1) & (labels == 0)] = 24
    labels[(r < 0.55) & (labels == 24)] = 25


def brain_phantom(shape: Sequence[int] = (132, 96, 112), seed: int | None = 0):
    """A brain-like reference volume (one coronal plate per ``z``) with region labels.

    Parameters
    ----------
    shape
        ``(z, y, x)`` size, each at least 24; structures are defined in normalised coordinates.
        The default has 132 plates like the Allen coronal atlas the paper used.
    seed
        Perturbs the shape profiles and the fibre bundles by a few percent and draws the texture.

    Returns
    -------
    reference : ``(z, y, x)`` float32 in [0, 1], 0 outside the brain (Nissl-like stain density).
    labels : ``(z, y, x)`` uint16, values of :data:`PHANTOM_REGIONS`; the two hemispheres mirror
        each other (same values) and are split dorsally by a midline fissure.
    """
    shp = _check_shape(shape)
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, shp[0])
    P = _Profiles(t, rng)
    y = np.linspace(-1.0, 1.0, shp[1])[None, :, None]
    x = np.linspace(-1.0, 1.0, shp[2])[None, None, :]
    ax = np.abs(x)

    fore, f = _forebrain(P, y, ax, shp)
    labels = np.zeros(shp, dtype=np.uint16)
    labels[fore] = 26
    rel = _cortex(labels, fore, f, y, ax, shp)
    deep = rel > 1.25
    _basal(labels, fore, deep, f, P, y, ax, rng)
    _hippocampus(labels, fore, deep, P, y, ax)
    _hindbrain(labels, P, y, x, ax)
    _olfactory(labels, P, y, ax)
    labels[f["fissure"]] = 0

    lut = np.zeros(max(PHANTOM_REGIONS) + 1, dtype=np.float32)
    for k, val in _DENSITY.items():
        lut[k] = val * (1 + rng.uniform(-0.04, 0.04))
    amp = np.full(lut.shape, 0.22, dtype=np.float32)
    amp[list(_FIBRE)] = 0.08
    amp[list(_FLUID)] = 0.0
    amp[0] = 0.0
    cells = ndimage.gaussian_filter(rng.standard_normal(shp).astype(np.float32), 0.7)
    cells /= max(float(cells.std()), 1e-6)
    nuclei = ndimage.gaussian_filter(rng.standard_normal(shp).astype(np.float32), 3.0)
    nuclei /= max(float(nuclei.std()), 1e-6)
    tissue = (labels > 0) & ~np.isin(labels, _FLUID)
    ref = lut[labels] * (1 + amp[labels] * cells) + 0.05 * nuclei * tissue
    ref = ndimage.gaussian_filter(ref, 0.6)
    return np.clip(ref, 0.0, 1.0).astype(np.float32), labels
