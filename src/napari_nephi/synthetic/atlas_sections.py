"""Query sections for the atlas-lookup benchmark, cut from a specimen unlike the atlas.

Each query is a section of *another brain* (the atlas smoothly deformed and rescaled, with its
own cell texture), cut at an angle, possibly partial, stained otherwise (Nissl-like as the atlas,
or fluorescence-like: other per-region intensities and the opposite background), mounted at
another rotation and pixel size, with blur, uneven light, noise and tears. The truth is the atlas
plate at the centre of the tissue that remains. This generator is written independently of the
engine's training synthesiser so a benchmark does not test a model on its own training data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..core.errors import InputError
from ..core.options import check_choice, check_float, check_int

__all__ = ["COMPARTMENTS", "CONTRASTS", "atlas_queries", "plane_axes"]

#: Stains :func:`atlas_queries` can render ("mixed": each query draws one of the other two).
CONTRASTS = ("nissl", "fluorescence", "mixed")
#: What a stain's per-region levels follow (:func:`atlas_queries` option ``compartments``).
COMPARTMENTS = ("labels", "foreign", "independent", "marker")
#: ``"independent"``: the default weight of the partition's levels in the other stain's level (the
#: labels' is 1 - it; :func:`atlas_queries` option ``partition_weight``).
PARTITION_WEIGHT = 0.7
_PARTS = ("top", "bottom", "left", "right", "corner")


def plane_axes(tilt_degrees: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit ``(z, y, x)`` vectors along the rows and columns of a plane tilted by ``(about_x, about_y)``.

    Rows turn about the ``x`` axis (the dorsal edge moves towards larger ``z``), columns about
    the ``y`` axis (the right edge moves towards larger ``z``); ``(0, 0)`` is a coronal plate.
    """
    a, b = math.radians(float(tilt_degrees[0])), math.radians(float(tilt_degrees[1]))
    e_row = np.array([-math.sin(a), math.cos(a), 0.0])
    e_col = np.array([math.sin(b) * math.cos(a), math.sin(a) * math.sin(b), math.cos(b)])
    e_col -= e_row * (e_col @ e_row)
    e_col /= np.linalg.norm(e_col)
    return e_row, e_col


class _Atlas:
    """The reference, its labels and per-region statistics used to restain sections."""

    def __init__(self, reference, labels):
        ref = np.asarray(reference)
        lab = np.asarray(labels)
        if ref.ndim != 3 or min(ref.shape) < 8:
            raise InputError(
                f"reference must be a 3D (z, y, x) volume, at least 8 voxels per axis; got shape {ref.shape}."
            )
        if lab.shape != ref.shape:
            raise InputError(f"labels shape {lab.shape} differs from the reference shape {ref.shape}.")
        if not np.issubdtype(lab.dtype, np.integer):
            raise InputError(f"labels must be integers (region values), got dtype {lab.dtype}.")
        ref = ref.astype(np.float32)
        if not np.all(np.isfinite(ref)):
            raise InputError("reference contains NaN or infinite values; replace them first.")
        if not (lab > 0).any():
            raise InputError("labels are all 0: the atlas needs labelled tissue to cut sections from.")
        self.ref, self.lab, self.shape = ref, lab, ref.shape
        values, inverse = np.unique(np.append(lab.ravel(), 0), return_inverse=True)
        inverse = inverse[:-1]
        counts = np.bincount(inverse, minlength=values.size)
        sums = np.bincount(inverse, weights=ref.ravel(), minlength=values.size)
        self.values = values
        self.means = (sums / np.maximum(counts, 1)).astype(np.float64)
        tissue = ref[lab > 0]
        self.bg = float(self.means[0]) if counts[0] else float(np.median(ref))
        self.dark = self.bg < float(np.median(tissue))
        far = float(np.percentile(tissue, 99 if self.dark else 1))
        self.norm = np.clip((self.means - self.bg) / (far - self.bg or 1.0), 0, 1)
        self.norm[0] = 0.0
        area = (lab > 0).sum(axis=(1, 2))
        valid = np.nonzero(area >= 0.25 * area.max())[0]
        self.zrange = (float(valid.min()), float(valid.max()))
        self.min_area = 0.1 * float(np.median(area[valid]))
        self._pairs = None
        self._tissue = None

    def tissue_points(self) -> np.ndarray:
        """``(N, 3)`` voxel coordinates of the labelled tissue."""
        if self._tissue is None:
            self._tissue = np.argwhere(self.lab > 0)
        return self._tissue

    def pairs(self) -> np.ndarray:
        """``(P, 2)`` indices (into :attr:`values`) of the tissue regions that touch, each pair once."""
        if self._pairs is None:
            k = self.index_of(self.lab)
            n = self.values.size
            found = []
            for axis in range(3):
                a = np.moveaxis(k, axis, 0)
                lo, hi = a[:-1].ravel(), a[1:].ravel()
                diff = (lo != hi) & (lo > 0) & (hi > 0)
                found.append(np.minimum(lo[diff], hi[diff]) * n + np.maximum(lo[diff], hi[diff]))
            codes = np.unique(np.concatenate(found))
            self._pairs = np.stack([codes // n, codes % n], axis=1)
        return self._pairs

    def index_of(self, lab: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.values, lab)


class _Compartments:
    """A stain's own compartments, drawn per section: not the annotation's labels.

    A stain does not know the atlas's parcellation. Here it cannot tell some touching regions
    apart (touching regions merged in pairs, each pair with probability 0.5), it divides every
    (merged) region into patches on the two sides of a smooth surface that no label follows (the
    sign of a smooth random field with 9 knots along each axis: unannotated subdivisions, patches,
    expression boundaries; the far side's level differs by 10-30 % of the range, up or down) and
    its strength drifts smoothly across the brain (a multiplicative gradient of 10-25 %). Fields
    live in atlas coordinates, so an oblique cut crosses them as it crosses the regions.
    """

    def __init__(self, atlas: _Atlas, rng: np.random.Generator):
        n = atlas.values.size
        group = np.arange(n)
        pairs = atlas.pairs()
        for i in rng.permutation(len(pairs)):
            a, b = pairs[i]
            # merge two touching regions with probability 0.5 each, only regions not merged yet
            if group[a] == a and group[b] == b and (group == a).sum() == 1 and (group == b).sum() == 1:
                if rng.uniform() < 0.5:
                    group[b] = a
        self.group = group
        self.split = rng.standard_normal((9, 9, 9))
        self.gradient = rng.standard_normal((3, 3, 3))
        self.strength = rng.uniform(0.1, 0.25)
        # the far side of the surface: its level moved by 10-30 % of the range, up or down
        self.step = rng.uniform(0.1, 0.3, n) * rng.choice([-1.0, 1.0], n)
        self.shape = np.asarray(atlas.shape, dtype=np.float64)

    def _field(self, coarse: np.ndarray, coords: np.ndarray) -> np.ndarray:
        scale = (np.array(coarse.shape, dtype=np.float64) - 1) / np.maximum(self.shape - 1, 1)
        grid = coords * scale.reshape((3,) + (1,) * (coords.ndim - 1))
        return ndimage.map_coordinates(coarse, grid, order=3, mode="nearest")

    def side(self, coords: np.ndarray) -> np.ndarray:
        """True on the second side of the splitting surface, at atlas coordinates ``(3, ...)``."""
        return self._field(self.split, coords) < 0

    def drift(self, coords: np.ndarray) -> np.ndarray:
        """The stain's multiplicative drift across the brain (about ``1 +- strength``)."""
        g = self._field(self.gradient, coords)
        return 1 + self.strength * np.clip(g, -2, 2) / 1.5

    def merged(self, per_region: np.ndarray) -> np.ndarray:
        """``per_region`` levels made equal within each merged group (the group's first region's)."""
        return per_region[self.group]

    def regions(self, atlas: _Atlas, lab: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The stain's compartment of each pixel (``2 group + side + 1``; 0 where ``lab`` is 0)."""
        out = 2 * self.group[atlas.index_of(lab)] + self.side(coords) + 1
        return np.where(lab > 0, out, 0).astype(np.int32)


class _Partition:
    """Another stain's own compartments, drawn per section independently of the annotation.

    Voronoi cells of as many points as the atlas has tissue regions, drawn uniformly in the atlas's
    tissue, mirror-symmetric about the midline (the brain's two halves are stained alike), each
    with its own level; the other stain's level is ``weight`` (:data:`PARTITION_WEIGHT`) of the
    cell's and the rest of the region's (as ``"labels"`` draws it), so at 0.7 the cells carry
    most of its variance, and their edges lie where no label has one. The drift across the brain
    is :class:`_Compartments`'.
    """

    def __init__(self, atlas: _Atlas, rng: np.random.Generator, weight: float = PARTITION_WEIGHT):
        self.weight = weight
        points = atlas.tissue_points()
        count = atlas.values.size - 1
        self.mid = (atlas.shape[2] - 1) / 2
        seeds = points[rng.choice(len(points), size=count, replace=False)].astype(np.float64)
        seeds[:, 2] = np.abs(seeds[:, 2] - self.mid)
        self._tree = cKDTree(seeds)  # built once: a fluorescence-like section's stain and regions both ask
        self.level = rng.uniform(0, 1, count)
        self.gradient = rng.standard_normal((3, 3, 3))
        self.strength = rng.uniform(0.1, 0.25)
        self.shape = np.asarray(atlas.shape, dtype=np.float64)

    def cell(self, coords: np.ndarray) -> np.ndarray:
        """The cell of each point of atlas coordinates ``(3, ...)``."""
        p = np.stack([coords[0], coords[1], np.abs(coords[2] - self.mid)], axis=-1)
        # a k-d tree, not a (points, cells, 3) difference array: memory bounded for real atlases with
        # hundreds of regions at 512^2 (review 2 of session 36, C3; the same cells)
        return self._tree.query(p.reshape(-1, 3))[1].reshape(p.shape[:-1])

    drift = _Compartments.drift
    _field = _Compartments._field

    def regions(self, atlas: _Atlas, lab: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The cell of each pixel plus 1 (0 where ``lab`` is 0)."""
        return np.where(lab > 0, self.cell(coords) + 1, 0).astype(np.int32)


class _Marker:
    """A marker stain (session 38): expressed in a random subset of the atlas's regions, with a texture.

    Per section each tissue region expresses the marker with probability ``q`` ~ U(0.35, 0.65) (at
    least two do); the regions that do not share one dim level (autofluorescence), so the edges
    between two of them vanish; an expressing region keeps the fluorescence-like level the labels
    give it, lifted to 0.45-1, times a texture ``1 + a tanh(1.5 t)`` (``a`` ~ U(0.4, 0.7)) of a
    smooth random field ``t`` with a knot every 4 atlas voxels (patchy expression, fibre bundles):
    edges inside regions at a few voxels' scale that no label has. No mixing with a partition (not
    ``"independent"``'s Voronoi cells, nor the training's ``partition`` level sets) and no drift.
    Fields live in atlas coordinates; the Nissl-like stain (the atlas's own) is left as in
    ``"labels"``, bit for bit.
    """

    KNOT = 4.0
    _field = _Compartments._field

    def __init__(self, atlas: _Atlas, rng: np.random.Generator):
        n = atlas.values.size
        q = rng.uniform(0.35, 0.65)
        on = rng.uniform(size=n) < q
        tissue = np.flatnonzero(atlas.values > 0)
        if on[tissue].sum() < 2:  # at least two expressing regions
            on[rng.choice(tissue, size=min(2, tissue.size), replace=False)] = True
        on[atlas.values == 0] = False
        self.on = on
        self.dim = rng.uniform(0.02, 0.15)
        self.amp = rng.uniform(0.4, 0.7)
        self.shape = np.asarray(atlas.shape, dtype=np.float64)
        knots = np.ceil(self.shape / self.KNOT).astype(int) + 1
        self.texture = rng.standard_normal(tuple(knots))

    def level(self, level: np.ndarray, k: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The marker's level of each pixel from the labels' fluorescence-like ``level`` per region
        index and the section's region indices ``k`` at atlas ``coords``."""
        t = self._field(self.texture, coords)
        lit = (0.45 + 0.55 * level[k]) * (1 + self.amp * np.tanh(1.5 * t))
        return np.where(self.on[k], lit, self.dim)

    def regions(self, atlas: _Atlas, lab: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The expressing region of each pixel (its label index plus 1), 1 for every region that does
        not express the marker, 0 where ``lab`` is 0."""
        k = atlas.index_of(lab)
        return np.where(lab > 0, np.where(self.on[k], k + 1, 1), 0).astype(np.int32)


class _Specimen:
    """Another brain: the atlas anisotropically rescaled and smoothly deformed (pull-back map)."""

    def __init__(self, shape, deform: float, rng: np.random.Generator):
        self.shape = np.asarray(shape, dtype=np.float64)
        self.centre = (self.shape - 1) / 2
        self.scale = 1 + rng.uniform(-1.5, 1.5, 3) * deform
        self.coarse = rng.standard_normal((3, 4, 4, 4)) * deform * 0.5 * self.shape[:, None, None, None]

    def to_atlas(self, p: np.ndarray) -> np.ndarray:
        """Atlas voxel coordinates of specimen points ``p`` (3, ...)."""
        c = self.centre.reshape((3,) + (1,) * (p.ndim - 1))
        s = self.scale.reshape(c.shape)
        grid = p / np.maximum(self.shape - 1, 1).reshape(c.shape) * 3
        u = np.stack([ndimage.map_coordinates(f, grid, order=3, mode="nearest") for f in self.coarse])
        return c + s * (p - c) + u


def _check(n, max_tilt, partial, contrast, noise, tears, rotation, scale, deform, compartments="labels"):
    n = check_int("n", n, 1, 100000)
    max_tilt = check_float("max_tilt", max_tilt, 0, 45)
    partial = check_float("partial", partial, 0, 1)
    check_choice("contrast", contrast, CONTRASTS)
    check_choice("compartments", compartments, COMPARTMENTS)
    noise = check_float("noise", noise, 0, 0.5)
    tears = check_float("tears", tears, 0, 1)
    rotation = check_float("rotation", rotation, 0, 180)
    deform = check_float("deform", deform, 0, 0.2)
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError) as exc:
        raise InputError(f"scale must be a pair (low, high) of pixel-size factors, got {scale!r}.") from exc
    if not (0.2 <= lo <= hi <= 5):
        raise InputError(f"scale must be a pair 0.2 <= low <= high <= 5, got {scale!r}.")
    return n, max_tilt, partial, noise, tears, rotation, (lo, hi), deform


def _crop(rng: np.random.Generator, partial: float):
    """``(kind, (top, bottom, left, right))`` fractions of the tissue's bounding box to cut away."""
    if rng.uniform() >= partial:
        return None, (0.0, 0.0, 0.0, 0.0)
    kind = _PARTS[rng.integers(len(_PARTS))]
    top = bottom = left = right = 0.0
    if kind == "top":
        top = rng.uniform(0.2, 0.45)  # cortex / cerebellum missing
    elif kind == "bottom":
        bottom = rng.uniform(0.2, 0.4)
    elif kind in ("left", "right"):
        cut = rng.uniform(0.42, 0.55)  # a hemisphere missing: half sections
        left, right = (cut, 0.0) if kind == "left" else (0.0, cut)
    else:
        top, side = rng.uniform(0.1, 0.3), rng.uniform(0.2, 0.4)
        left, right = (side, 0.0) if rng.uniform() < 0.5 else (0.0, side)
    return kind, (top, bottom, left, right)


def _tear_mask(rng, tissue: np.ndarray, pixel: float) -> np.ndarray:
    """One wavy crack across the tissue, 1-4 px wide."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    k = rng.integers(ys.size)
    ang = rng.uniform(0, np.pi)
    length = 0.7 * max(h, w)
    t = np.arange(-length, length, 0.5)
    amp, wave, phase = rng.uniform(1, 4) * pixel, rng.uniform(15, 40) * pixel, rng.uniform(0, 2 * np.pi)
    off = amp * np.sin(2 * np.pi * t / wave + phase)
    py = ys[k] + t * math.sin(ang) + off * math.cos(ang)
    px = xs[k] + t * math.cos(ang) - off * math.sin(ang)
    ok = (py >= 0) & (py <= h - 1) & (px >= 0) & (px <= w - 1)
    mask = np.zeros((h, w), dtype=bool)
    mask[np.round(py[ok]).astype(int), np.round(px[ok]).astype(int)] = True
    width = int(round(rng.uniform(0, 1.5) * pixel))
    return ndimage.binary_dilation(mask, iterations=width) if width else mask


def _stain(
    atlas: _Atlas, ref_q, lab_q, stain: str, rng, comp: _Compartments | None = None, coords=None
) -> tuple[np.ndarray, float]:
    """Section intensities in ``stain`` from the atlas's per-region levels, and the background level.

    With ``comp`` (and the section's atlas ``coords``) the levels follow the stain's own
    compartments instead of the labels; ``rng`` is drawn from exactly as without it.
    """
    k = atlas.index_of(lab_q)
    smooth = ndimage.gaussian_filter(ref_q, 1.0)  # the atlas's own fine texture is not kept
    base = ndimage.gaussian_filter(atlas.means[k], 1.0)
    resid = smooth - base  # structure within regions that the labels do not hold
    tissue = lab_q > 0
    foreign = isinstance(comp, _Compartments)
    if comp is not None and not isinstance(comp, _Marker):
        drift = comp.drift(coords)
        side = comp.side(coords) if foreign else None
    if stain == "nissl":  # the atlas's stain on another brain: region levels jitter a little
        gain = rng.uniform(0.85, 1.15, atlas.values.size)
        if not foreign:  # "independent" and "marker" leave the atlas's own stain as it is
            image, bg = smooth + ndimage.gaussian_filter(atlas.means[k] * (gain[k] - 1), 1.0), atlas.bg
        else:  # the jitter per compartment, drifting across the brain
            g = comp.merged(gain)[k] * np.where(side, 1 + comp.merged(comp.step)[k], 1.0)
            image = smooth + ndimage.gaussian_filter(atlas.means[k] * (g * drift - 1), 1.0)
            bg = atlas.bg
    else:  # fluorescence-like: other region levels (partly inverted), the opposite background
        w = rng.uniform(0.5, 0.8)
        level = w * (1 - atlas.norm) + (1 - w) * rng.uniform(0, 1, atlas.values.size)
        if comp is None:
            level = ndimage.gaussian_filter(level[k], 0.7)
        elif isinstance(comp, _Marker):  # a subset of the regions lit, with a texture
            level = ndimage.gaussian_filter(comp.level(level, k, coords), 0.7)
        elif not foreign:  # mostly the independent partition's levels
            cell = comp.level[comp.cell(coords)]
            level = ((1 - comp.weight) * level[k] + comp.weight * cell) * drift
            level = ndimage.gaussian_filter(level, 0.7)
        else:  # one level per merged group and side of the surface
            level = comp.merged(level)[k] + np.where(side, comp.merged(comp.step)[k], 0.0)
            level = np.clip(level, 0, 1) * drift
            level = ndimage.gaussian_filter(level, 0.7)
        if atlas.dark:
            image, bg = 0.05 + 0.75 * level - 0.5 * resid, rng.uniform(0.85, 0.97)
        else:
            image, bg = 0.25 + 0.7 * level - 0.5 * resid, rng.uniform(0.02, 0.1)
    image = np.where(tissue, image, bg)
    cells = ndimage.gaussian_filter(rng.standard_normal(ref_q.shape), 0.8)
    cells /= max(float(cells.std()), 1e-6)
    image = np.where(tissue, image * (1 + 0.18 * cells), image)
    return image, float(bg)


def _finish(image, pixel: float, noise: float, rng) -> np.ndarray:
    """Blur, uneven light, gamma and noise of a mounted, imaged section."""
    image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.0) * pixel)
    h, w = image.shape
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    image = image * (1 + 0.08 * (yy * math.sin(ang) + xx * math.cos(ang)))
    image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.25)
    image = image + rng.standard_normal(image.shape) * noise * rng.uniform(0.5, 1.5)
    return np.clip(image, 0, 1).astype(np.float32)


def _cut(atlas: _Atlas, rng, centre: float, tilt, crop, rot: float, pix: float, deform: float):
    """Atlas coordinates ``(3, h, w)`` of a mounted section and the mask of its kept window."""
    spec = _Specimen(atlas.shape, deform, rng)
    e_row, e_col = plane_axes(tilt)
    nz, ny, nx = atlas.shape
    origin = np.array([centre, (ny - 1) / 2, (nx - 1) / 2])

    def atlas_coords(u, v):
        p = origin[:, None, None] + e_row[:, None, None] * u + e_col[:, None, None] * v
        return spec.to_atlas(p)

    # the tissue's extent in the cutting plane
    ext = 0.65 * max(ny, nx)
    u, v = np.meshgrid(np.arange(-ext, ext + 1), np.arange(-ext, ext + 1), indexing="ij")
    lab = ndimage.map_coordinates(atlas.lab, atlas_coords(u, v), order=0, mode="constant", cval=0)
    if not (lab > 0).any():
        return None, None
    rows, cols = np.nonzero(lab > 0)
    u0, u1, v0, v1 = u[rows, 0].min(), u[rows, 0].max(), v[0, cols].min(), v[0, cols].max()
    hu, wv = u1 - u0, v1 - v0
    u0, u1 = u0 + crop[0] * hu, u1 - crop[1] * hu
    v0, v1 = v0 + crop[2] * wv, v1 - crop[3] * wv
    # the mounted, imaged section: rotated by rot, pix output pixels per atlas voxel, margins
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    hh = pix * (abs(c) * (u1 - u0) + abs(s) * (v1 - v0))
    ww = pix * (abs(s) * (u1 - u0) + abs(c) * (v1 - v0))
    m = rng.uniform(0.04, 0.2, 4) * max(hh, ww)
    h, w = int(math.ceil(hh + m[0] + m[1])), int(math.ceil(ww + m[2] + m[3]))
    r, q = np.meshgrid(np.arange(h) - m[0] - hh / 2, np.arange(w) - m[2] - ww / 2, indexing="ij")
    du, dv = (c * r + s * q) / pix, (-s * r + c * q) / pix
    uu, vv = (u0 + u1) / 2 + du, (v0 + v1) / 2 + dv
    keep = (uu >= u0) & (uu <= u1) & (vv >= v0) & (vv <= v1)
    return atlas_coords(uu, vv), keep


def atlas_queries(
    reference,
    labels,
    n: int,
    seed: int | None = 0,
    *,
    max_tilt: float = 10.0,
    partial: float = 0.5,
    contrast: str = "nissl",
    noise: float = 0.05,
    tears: float = 0.3,
    rotation: float = 10.0,
    scale: Sequence[float] = (0.8, 1.25),
    deform: float = 0.03,
    compartments: str = "labels",
    partition_weight: float = PARTITION_WEIGHT,
) -> list[dict]:
    """Sections of another brain cut from a labelled atlas, with the true plate of each.

    Parameters
    ----------
    reference, labels
        ``(z, y, x)`` atlas (plates along ``z``) and its integer region labels, e.g. from
        :func:`brain_phantom` or :func:`toy_atlas`.
    n
        Number of sections; their centres are spread evenly (stratified) over the plates that
        hold at least a quarter of the largest plate's tissue.
    seed
        Everything is drawn from it; the same seed gives the same sections.
    max_tilt
        Pitch and yaw of the cut, each uniform in ``[-max_tilt, max_tilt]`` degrees.
    partial
        Probability that a section is partial: its top (cortex, cerebellum), bottom, one
        hemisphere (half sections) or a top corner cut away (20-55 % of its extent).
    contrast
        ``"nissl"`` (the atlas's stain: its per-region levels, each jittered by up to 15 %),
        ``"fluorescence"`` (per-region levels drawn anew, partly inverted, on the opposite
        background), or ``"mixed"`` (each section draws one of the two).
    noise
        Standard deviation of the added Gaussian noise (times 0.5-1.5), intensities in [0, 1].
    tears
        Probability of tears (one or two wavy cracks through the tissue).
    rotation, scale
        In-plane rotation (uniform in ``[-rotation, rotation]`` degrees) and output pixels per
        atlas voxel (uniform in ``scale``) of the mounted section.
    deform
        Size of the specimen's difference from the atlas: per-axis scale within
        ``1 +- 1.5 deform`` and a smooth displacement of about ``deform`` of the volume size.
    compartments
        What the stain's per-region levels follow. ``"labels"`` (default): one level per
        annotation label (the Nissl jitter and the fluorescence levels above). ``"foreign"``:
        compartments the annotation does not hold, drawn per section: touching regions merged
        in pairs, every merged region divided into patches by a smooth surface (the far side's
        level 10-30 % of the range higher or lower) and a smooth 10-25 % drift of the stain
        across the brain. The geometry, noise and tears are those of ``"labels"`` for the same
        seed (the compartments come from a separate stream): the two compare section by section.
        Its compartments are still mostly the labels' (merged labels are per-label levels too).
        ``"independent"``: the fluorescence-like stain's levels come mostly
        (:data:`PARTITION_WEIGHT`) from a partition drawn independently of the annotation
        (mirror-symmetric Voronoi cells, as many as the atlas's regions), with the same drift;
        the Nissl-like stain (the atlas's own) is left as in ``"labels"``, bit for bit.
        ``"marker"`` (session 38): the fluorescence-like stain of a marker expressed in a random
        subset of the regions (each with probability 0.35-0.65 per section), one dim level on the
        others, and a texture inside the expressing ones (a smooth random field, a knot every 4
        voxels, +-40-70 %); the Nissl-like stain is left as in ``"labels"``, bit for bit.
    partition_weight
        With ``"independent"``: the share of the partition's levels in the stain's level (0.7:
        most of its variance; 0: the labels' levels with the drift); ignored otherwise.

    Returns
    -------
    One dict per section: ``image`` (float32 ``(h, w)`` in [0, 1]), ``labels`` (its true region
    labels, 0 outside the tissue and in tears), ``plate`` (the truth: the atlas plate at the
    centre of the tissue, i.e. the rounded mean atlas ``z`` of its tissue pixels), ``plate_range``
    (5th-95th percentile of the tissue's atlas ``z``: the plates an oblique cut crosses),
    ``tilt`` (degrees about ``x`` and ``y``), ``crop`` (``(top, bottom, left, right)`` fractions
    of the tissue's extent cut away), ``part`` (which part is missing, or None), ``contrast``,
    ``rotation``, ``scale``, ``index`` (the plane's position at the volume's centre) and
    ``compartments``; with another stain also ``stain_regions`` (int32 ``(h, w)``: the stain's
    compartment, or the partition's cell, of each pixel plus 1 (``"marker"``: the expressing region's
    label index plus 1, 1 on the regions without the marker); under ``"independent"`` and ``"marker"``
    the labels for Nissl-like sections, whose stain follows them; 0 where ``labels`` is 0).
    """
    n, max_tilt, partial, noise, tears, rotation, scale, deform = _check(
        n, max_tilt, partial, contrast, noise, tears, rotation, scale, deform, compartments
    )
    weight = check_float("partition_weight", partition_weight, 0, 1)
    atlas = _Atlas(reference, labels)
    rng = np.random.default_rng(seed)
    # the stain's compartments from their own stream: rng's draws stay those of "labels"
    crng = (
        None if compartments == "labels" else np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    )
    draw = (max_tilt, partial, contrast, noise, tears, rotation, scale, deform)
    z0, z1 = atlas.zrange
    slots = rng.permutation(n)
    out = []
    for i in range(n):
        for _attempt in range(20):
            centre = z0 + (slots[i] + rng.uniform()) / n * (z1 - z0)
            query = _one(atlas, rng, centre, draw, crng, (compartments, weight))
            if query is not None:
                break
        else:  # pragma: no cover - only for atlases with almost no tissue
            raise InputError("Could not cut a section with tissue from this atlas; check its labels.")
        out.append(query)
    return out


def _stain_regions(atlas: _Atlas, comp, stain: str, lab: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """What the section's stain follows, per pixel: the stain's compartments, or under ``"independent"``
    the annotation's labels for the Nissl-like stain, which stays the atlas's own (review 2 of session 36,
    C2: its sections had returned cells their stain does not follow)."""
    if isinstance(comp, (_Partition, _Marker)) and stain == "nissl":
        return np.asarray(lab, np.int32)
    return comp.regions(atlas, lab, coords)


def _one(atlas, rng, centre, draw, crng=None, kind=("labels", 0.0)):
    max_tilt, partial, contrast, noise, tears, rotation, scale, deform = draw
    tilt = tuple(float(t) for t in rng.uniform(-max_tilt, max_tilt, 2))
    part, crop = _crop(rng, partial)
    rot = float(rng.uniform(-rotation, rotation))
    pix = float(rng.uniform(*scale))
    coords, keep = _cut(atlas, rng, centre, tilt, crop, rot, pix, deform)
    if coords is None:
        return None
    lab = ndimage.map_coordinates(atlas.lab, coords, order=0, mode="constant", cval=0)
    lab = np.where(keep, lab, 0).astype(atlas.lab.dtype)
    if (lab > 0).sum() < atlas.min_area * pix * pix:
        return None
    ref = ndimage.map_coordinates(atlas.ref, coords, order=1, mode="constant", cval=atlas.bg)
    stain = contrast if contrast != "mixed" else ("nissl", "fluorescence")[rng.integers(2)]
    kind, weight = kind
    if crng is None:
        comp = None
    else:
        make = {"foreign": _Compartments, "marker": _Marker}.get(kind)
        comp = _Partition(atlas, crng, weight) if make is None else make(atlas, crng)
    image, bg = _stain(atlas, ref, lab, stain, rng, comp, coords)
    if rng.uniform() < tears:
        for _ in range(rng.integers(1, 3)):
            crack = _tear_mask(rng, lab > 0, pix)
            lab[crack] = 0
            image[crack] = bg
    image = _finish(image, pix, noise, rng)
    z = coords[0][lab > 0]
    if z.size == 0:
        return None
    plate = int(np.clip(np.round(z.mean()), 0, atlas.shape[0] - 1))
    lo, hi = np.percentile(z, [5, 95])
    return {
        "image": image,
        "labels": lab,
        "plate": plate,
        "plate_range": (int(max(0, math.floor(lo))), int(min(atlas.shape[0] - 1, math.ceil(hi)))),
        "tilt": tilt,
        "crop": tuple(float(c) for c in crop),
        "part": part,
        "contrast": stain,
        "rotation": rot,
        "scale": pix,
        "index": float(centre),
        "compartments": kind,
        **({"partition_weight": weight} if kind == "independent" else {}),
        **({} if comp is None else {"stain_regions": _stain_regions(atlas, comp, stain, lab, coords)}),
    }
