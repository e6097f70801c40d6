"""The atlas and a section on a small search grid, compared for every shift at once (pose search).

Used by :mod:`.rerank`. The similarity is a normalised gradient field in the double-angle form:
each pixel's gradient ``g`` becomes ``(gx + i gy)^2 / (|g|^2 + eps^2)``, so only the orientation of
edges counts; a reversed contrast or any per-region remapping of intensities that keeps the region
boundaries gives the same field. A pose's score is the real part of the correlation of the section's
field (inside its tissue) with the atlas's, normalised like a correlation coefficient, times the
share of the section's tissue lying on the atlas's tissue; all shifts are scored by FFT. With an
``edge_blur`` (rerank option) the field is the mean of the plain field and that of the image blurred
by that many grid pixels, so region boundaries count more against fine texture (cells, noise).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage
from scipy.fft import next_fast_len

from .plates import Plates
from .preprocess import _segment

#: Side of the search canvas, in units of the section's tissue extent on it (room for shifts).
CANVAS = 1.4
#: ``eps`` of the normalised gradient field, as a fraction of the 90th percentile of the gradient
#: magnitude on the tissue: weaker edges (noise, texture) count less than region boundaries.
EDGE_EPS = 0.25
#: Weight of the section's outline (one pixel either side of its tissue mask's edge) against its
#: inside. 0: a cut edge has no counterpart in the atlas, and a small plate's outline would fit a
#: whole section shrunk onto it (measured: the outline at weight 1 picked end plates for whole
#: sections).
OUTLINE = 0.0
#: Zero pixels around each tile of :meth:`AtlasGrid.sample_planes`'s mosaic (a point beyond a
#: tile's edge reads them, never a neighbouring tile).
MOSAIC_BORDER = 2
#: Shifts that put less than this share of the section's tissue on the atlas's tissue are ignored.
MIN_OVERLAP = 0.5
#: A pair's best shift is (0, 0) where that shift scores within this much of the best (ties: a
#: textureless section scores 0 everywhere; the correlation's rounding is about 1e-7).
TIE = 1e-6
#: Width of the band just outside the section's tissue (its holes filled), as a share of the tissue's
#: extent on the grid, whose lying on the atlas's tissue costs score (``outside`` rerank option).
OUTSIDE_RING = 0.08
#: A straight run of the section's outline at least this share of its tissue's extent long
#: (:func:`straight_runs`) is a cut edge: the outside band beyond it is spared (``spare_cuts``).
CUT_RUN = 0.25
#: ... whose outline pixels lie within this share of the extent (at least one pixel) of a line.
CUT_EPS = 0.012
#: Pairs (section variant, atlas slice) correlated per batch: bounds memory, and a small batch's
#: spectra stay in the CPU's cache (64 measured 15-25 % faster per lookup than 256, same results).
BATCH = 64
#: Bins per axis of the joint histogram of :func:`information` (equal widths between each sample's 1st
#: and 99th percentiles).
INFO_BINS = 16
#: Gaussian sigma (grid pixels) by which the section and the atlas cut are smoothed before
#: :meth:`SectionGrid.information` reads their levels: cell texture and noise blur into the
#: regions' levels (session 24's screen, 306 sections: 21 of 106 Top-5 misses gained at weight 0.3
#: against 14 unsmoothed).
INFO_BLUR = 1.0
#: Shared tissue pixels below which :meth:`SectionGrid.information` gives 0 (too few to count).
INFO_MIN_PIXELS = 32
#: A quarter of the section's tissue with fewer pixels than this on the grid does not count in
#: :meth:`SectionGrid.quarter_offsets` (session 40, the ``quarter_shift`` rerank option).
QUARTER_MIN_PIXELS = 20
#: Bytes of untilted plate cuts (their FFTs) an :class:`AtlasGrid` keeps between sections: a cut
#: depends only on the plate, the canvas and the plate pixels per canvas pixel, which the search
#: takes from a fixed geometric grid, so sections of similar size reuse the same cuts.
CUT_CACHE_BYTES = 96 * 2**20


@dataclass
class Pose:
    """A pose of the section in the atlas and its score (higher is better, at most 1).

    ``z``: atlas plate coordinate of the section's tissue centre (fractional for tilted cuts);
    ``plate``: the plate it rounds to; ``tilt``: ``(pitch, yaw)`` in degrees, pitch about the x axis
    (positive: the top edge of the cut towards larger plate indices), yaw about the y axis
    (positive: the right edge towards larger plate indices); ``rotation``: in-plane turn of the
    section on the plate (degrees); ``scale``: section pixels per plate pixel; ``centre``: the
    ``(y, x)`` plate pixel under the section's tissue centre; ``grid``: the search grid's work size.
    """

    score: float
    z: float
    plate: int
    tilt: tuple[float, float]
    rotation: float
    scale: float
    centre: tuple[float, float]
    grid: int = 0
    #: the score without the outside band (None: no band)
    plain: float | None = None
    #: mutual information of the section's and the atlas's intensities at this pose (nats;
    #: :meth:`SectionGrid.information`; None: not measured), where ``information_weight`` counted it
    info: float | None = None
    #: the cut's plate pixels per section pixel along its rows over those along its columns (1: the
    #: same; the ``aspects`` rerank option): ``scale`` is their geometric mean
    aspect: float = 1.0
    #: correlation ratio of the section's intensities given the atlas's regions at this pose
    #: (region_fit; None: not measured), where ``region_weight`` counted it
    region: float | None = None
    #: plates the pose's ``z`` was moved by the ``quarter_shift`` rerank option (None: not moved); a
    #: moved pose keeps the ``score`` (and ``plain``) of its cut before the move, not measured at its new
    #: ``z`` and ``plate``
    shifted: float | None = None


def field(image: np.ndarray, weight: np.ndarray, blur: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(real, imaginary) double-angle normalised gradient field of ``image``, times ``weight`` (>= 0, as
    every caller's is); with ``blur`` > 0 the mean of that field and the field of ``image`` blurred by
    ``blur`` pixels (sigma)."""
    if blur > 0:
        smooth = cv2.GaussianBlur(np.ascontiguousarray(image, dtype=np.float32), (0, 0), blur)
        (r0, i0), (r1, i1) = _field(image, weight), _field(smooth, weight)
        return 0.5 * (r0 + r1), 0.5 * (i0 + i1)
    return _field(image, weight)


def _field(image: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`field` without the blur. A boolean ``weight`` is its own inside (no comparison), and
    ``weight / mag2`` is already 0 where ``weight`` is (``mag2`` is at least ``eps2`` > 0), so no
    ``np.where`` (session 42's ``lean``, the one path since session 43: the values of the field before
    session 42 bit for bit, with two array passes fewer)."""
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3)
    gx2, gy2 = gx * gx, gy * gy
    mag2 = gx2 + gy2
    inside = weight if weight.dtype == np.bool_ else weight > 0
    on = mag2[inside]
    ref = 0.0
    if on.size:  # 90th percentile of the magnitude (nearest rank)
        k = int(0.9 * (on.size - 1))
        ref = math.sqrt(float(np.partition(on, k)[k]))
    mag2 += np.float32(max((EDGE_EPS * ref) ** 2, 1e-12))
    scale = weight / mag2  # numpy's promotion
    gx2 -= gy2
    gx2 *= scale
    gx *= 2
    gx *= gy
    gx *= scale
    return gx2, gx


@functools.lru_cache(maxsize=16)
def _disc(radius: int) -> np.ndarray:
    """The structuring element of :func:`dilate`, built once per radius (read only)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """``mask`` grown by a disc of ``radius`` pixels (a contiguous boolean mask is read as uint8 in
    place, without a copy)."""
    plain = mask.dtype == np.bool_ and mask.flags.c_contiguous
    return cv2.dilate(mask.view(np.uint8) if plain else mask.astype(np.uint8), _disc(radius)) > 0


def section_weight(mask: np.ndarray) -> np.ndarray:
    """1 inside the section's tissue, :data:`OUTLINE` on its outline, 0 elsewhere."""
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return np.where(inner, 1.0, np.where(dilate(mask), OUTLINE, 0.0)).astype(np.float32)


def outside_band(mask: np.ndarray, width: int) -> np.ndarray:
    """The band ``width`` pixels wide just outside ``mask``'s tissue, with its holes and cracks
    narrower than the band closed first (a tear is not the outside of the section), as float32."""
    filled = _closed(mask, width)
    return (dilate(filled, width) & ~filled).astype(np.float32)


def _closed(mask: np.ndarray, width: int) -> np.ndarray:
    """``mask``'s tissue with its holes filled and its cracks narrower than ``width`` pixels closed."""
    m = mask.astype(np.uint8)
    if width > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
        pad = cv2.copyMakeBorder(m, width, width, width, width, cv2.BORDER_CONSTANT, value=0)
        m = cv2.morphologyEx(pad, cv2.MORPH_CLOSE, k)[width:-width, width:-width]
    return ndimage.binary_fill_holes(m > 0)


def straight_runs(mask: np.ndarray, width: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Straight runs of the outline of ``mask``'s tissue (tears and holes narrower than ``width``
    pixels closed, as :func:`outside_band`): ``(start, end, outward normal)`` in (y, x) pixels, each
    at least :data:`CUT_RUN` of the tissue's extent long with no outline pixel more than
    :data:`CUT_EPS` of the extent (at least 1 pixel) off the line between its ends. A knife cut or the
    edge of a partial section is such a run; a brain's natural outline curves."""
    filled = _closed(mask, width)
    size = float(extent(filled).max())
    contours, _ = cv2.findContours(filled.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    runs = []
    for contour in contours:
        poly = cv2.approxPolyDP(contour, max(1.0, CUT_EPS * size), True)[:, 0, ::-1].astype(np.float64)
        for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True):
            d = b - a
            length = float(np.hypot(*d))
            if length < CUT_RUN * size:
                continue
            normal = np.array([d[1], -d[0]]) / length
            mid = np.round((a + b) / 2 + 2 * normal).astype(int)
            inside = (
                (0 <= mid[0] < filled.shape[0]) and (0 <= mid[1] < filled.shape[1]) and filled[tuple(mid)]
            )
            runs.append((a, b, -normal if inside else normal))
    return runs


def cut_zone(mask: np.ndarray, width: int) -> np.ndarray:
    """1 beyond the straight runs of ``mask``'s outline (:func:`straight_runs`), up to ``2 width + 2``
    pixels out and ``width`` pixels past their ends, 0 elsewhere (float32): where the outside band
    (:func:`outside_band`, ``width`` wide) is spared, as atlas tissue beyond a cut is no misfit."""
    zone = np.zeros(mask.shape, dtype=np.uint8)
    depth = 2 * width + 2
    for a, b, normal in straight_runs(mask, width):
        along = (b - a) / max(float(np.hypot(*(b - a))), 1e-9)
        a0, b0 = a - width * along, b + width * along
        quad = np.array([a0, b0, b0 + depth * normal, a0 + depth * normal])
        cv2.fillPoly(zone, [np.round(quad[:, ::-1]).astype(np.int32)], 1)
    return zone.astype(np.float32)


def rotation_matrix(degrees: float) -> np.ndarray:
    """2D rotation in (y, x) by ``degrees``."""
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def plane(tilt: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit (z, y, x) vectors along the rows and columns of a cut tilted by ``(pitch, yaw)``
    (see :class:`Pose`); ``(0, 0)`` gives a plate's own axes. Cached (read-only arrays)."""
    return _plane(float(tilt[0]), float(tilt[1]))


@functools.lru_cache(maxsize=4096)
def _plane(pitch: float, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = math.radians(pitch), math.radians(yaw)
    turn_a = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    turn_b = np.array([[math.cos(b), 0.0, math.sin(b)], [0.0, 1.0, 0.0], [-math.sin(b), 0.0, math.cos(b)]])
    turn = turn_b @ turn_a
    rows, cols = turn @ np.array([0.0, 1.0, 0.0]), turn @ np.array([0.0, 0.0, 1.0])
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def extent(mask: np.ndarray) -> np.ndarray:
    """(height, width) of the bounding box of ``mask`` (1, 1 when empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.array([1.0, 1.0])
    return np.array([rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1], dtype=np.float64)


def information(x: np.ndarray, y: np.ndarray, bins: int = INFO_BINS) -> float:
    """Mutual information (nats) of the paired samples ``x`` and ``y``: their joint histogram of
    ``bins`` x ``bins`` equal-width bins between each one's 1st and 99th percentiles (values beyond go
    to the end bins). Any one-to-one remapping of either sample's levels that keeps its bins (an
    inverted or otherwise re-stained region set) leaves it alike; 0 for constant samples."""
    codes = []
    for v in (x, y):
        v = np.asarray(v, dtype=np.float64).ravel()
        lo, hi = np.percentile(v, (1.0, 99.0))
        if not hi > lo:
            return 0.0
        codes.append(np.clip(((v - lo) * (bins / (hi - lo))).astype(np.int64), 0, bins - 1))
    joint = np.bincount(codes[0] * bins + codes[1], minlength=bins * bins).reshape(bins, bins)
    p = joint / float(joint.sum())
    px, py = p.sum(axis=1), p.sum(axis=0)
    on = p > 0
    return float((p[on] * np.log(p[on] / np.outer(px, py)[on])).sum())


def best_offset(scores, offsets) -> float:
    """The offset of the best of ``scores`` (one per offset), the one nearest 0 among those within
    :data:`TIE` of the best (a quarter without edges scores alike everywhere: no move, not the first
    offset; :meth:`SectionGrid.quarter_offsets`)."""
    scores = np.asarray(scores, dtype=np.float64)
    near = [k for k in range(len(offsets)) if scores[k] >= scores.max() - TIE]
    return float(offsets[min(near, key=lambda k: abs(offsets[k]))])


class Correlator:
    """Scores of section variants against atlas slices for every shift, by FFT (batched).

    A shift ``s`` (canvas pixels, numpy order) puts section canvas pixel ``q`` on slice pixel
    ``q + s``; shifts up to ``reach`` pixels per axis (default: half the canvas) are searched.
    """

    def __init__(self, shape: tuple[int, int], reach: int | None = None):
        self.shape, self.reach = shape, reach
        # zero padding by ``reach`` makes every searched shift exact (no wrap-around); lengths of
        # small prime factors keep the FFTs fast
        self.pad = tuple(next_fast_len(n + (reach or (n + 1) // 2), real=True) for n in shape)
        #: per axis, the searched shifts are ``-low .. window - 1 - low``: those that do not wrap around
        #: the padding (``-d .. d``, ``d`` = padding less canvas), or every shift where none wraps
        #: (``k > pad // 2`` read as ``k - pad``)
        self.low, self.window = [], []
        for n, p in zip(shape, self.pad, strict=True):
            d = p - n
            low, size = (d, 2 * d + 1) if 2 * d + 1 <= p else (p - 1 - p // 2, p)
            self.low.append(low)
            self.window.append(size)
        # the section's spectra are multiplied by this ramp, which moves the correlation's shift
        # ``-low`` to index 0: the searched shifts are then one contiguous block at the start of each
        # axis, and only that block is scored (session 30: stage 1 scores 55 x 55 of its 72 x 72
        # correlation, stage 2 37 x 37 of 96 x 96)
        self.ramp = self._shift_ramp(self.low[0], self.low[1])
        self._lattice_ramp: torch.Tensor | None = None  # best_lattice's, built on first use

    def _shift_ramp(self, low0: int, low1: int, scale: float = 1.0) -> torch.Tensor:
        """``scale`` times the phase ramp that, multiplied into a section's spectra, moves the
        correlation's shift ``(-low0, -low1)`` to index 0 (complex64, the rfft's half spectrum)."""
        k0 = np.fft.fftfreq(self.pad[0]) * self.pad[0]
        k1 = np.arange(self.pad[1] // 2 + 1)
        phase = -2 * np.pi * (k0[:, None] * low0 / self.pad[0] + k1[None, :] * low1 / self.pad[1])
        return torch.from_numpy((scale * np.exp(1j * phase)).astype(np.complex64))

    def fft(self, stack: np.ndarray) -> torch.Tensor:
        """2D real FFTs of a stack of canvases, zero-padded."""
        return torch.fft.rfft2(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), s=self.pad)

    def section(
        self, re: np.ndarray, im: np.ndarray, mask: np.ndarray, ring: np.ndarray | None = None
    ) -> tuple[torch.Tensor, float, float]:
        """FFTs of a section variant (field parts, tissue mask; with ``ring``, the band outside its
        tissue as a fourth channel), its field energy and tissue area."""
        energy = float((re.astype(np.float64) ** 2 + im.astype(np.float64) ** 2).sum())
        parts = [re, im, mask] if ring is None else [re, im, mask, ring]
        return self.fft(np.stack(parts)), energy, float(mask.sum())

    def slice(self, re: np.ndarray, im: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """FFTs of an atlas slice: field parts, field energy per pixel, tissue mask (:meth:`slices_into`
        of one slice: a plate cut, or a slice built by hand as the tests do)."""
        stack = np.empty((1, 4, *np.shape(re)), dtype=np.float32)
        stack[0, 0], stack[0, 1], stack[0, 3] = re, im, mask
        return self.slices_into(stack)[0]

    def slices_into(self, stack: np.ndarray) -> torch.Tensor:
        """:meth:`slice` of several slices at once: a float32 stack (N, 4, ...) whose channels 0, 1 and 3
        hold each slice's field parts and tissue mask; channel 2 (the field energy) is written in place,
        then the FFTs (N, 4, ...) (session 42's ``lean``; since session 43 the only way)."""
        energy = stack[:, 2]
        np.multiply(stack[:, 0], stack[:, 0], out=energy)
        energy += stack[:, 1] * stack[:, 1]
        return torch.fft.rfft2(torch.from_numpy(stack), s=self.pad)

    def best(
        self,
        fa,
        ea,
        na,
        fb,
        nr=None,
        outside: float = 0.0,
        free: float = 0.0,
        plain: bool = False,
    ):
        """Best score and its flat shift index of every pair of section variants ``fa`` (R, 3, ...)
        (field energies ``ea``, tissue areas ``na``, (R,)) and atlas slices ``fb`` (C, 4, ...): (C, R).
        With ``outside`` > 0, ``fa`` (R, 4, ...) also holds the band outside each variant's tissue
        (areas ``nr``, (R,)), and a score loses ``outside`` times the share of that band lying on the
        atlas's tissue (:data:`OUTSIDE_RING`); with ``free`` > 0 only the share above ``free`` counts,
        scaled to reach ``outside`` at a share of 1. With ``plain`` also the score without the band at
        each best shift (C, R) (the score itself without ``outside``). The field's second spectral product is
        added in place (``addcmul_``; session 42's ``lean``, the same values bit for bit, no temporary)."""
        spec = self._spectra(fa, fb, outside > 0, self.ramp)
        # the 2D inverse as two 1D ones, the second only on the rows of searched shifts (the same
        # values as one 2D inverse); the block copied out contiguous, so that the ~20 element-wise
        # operations below run on whole rows (session 30, second round: ~5 % less CPU in best, bit for bit)
        h, w = self.window
        rows = torch.fft.irfft(torch.fft.ifft(spec, dim=-2)[..., :h, :], n=self.pad[1], dim=-1)
        out = rows[..., :w].contiguous()
        return self._scored(out, ea, na, nr, outside, free, plain, (self.low[0], self.low[1]))

    def _spectra(self, fa, fb, ring: bool, ramp: torch.Tensor) -> torch.Tensor:
        """The spectra of the field's correlation (real and imaginary parts summed), the field energy
        under the section's mask, the tissue overlap (and with ``ring`` the band's) of every pair,
        (C, R, 3 or 4, ...), the section's spectra multiplied by ``ramp``."""
        # each product written in place into one contiguous stack: no gathered copies, and a
        # contiguous inverse FFT (~25 % less CPU than one product per gathered channel pair; the same
        # values)
        ca = (torch.conj_physical(fa) * ramp)[None]
        fb = fb[:, None]
        pairs = ((2, 2), (2, 3), (3, 3)) if ring else ((2, 2), (2, 3))
        spec = torch.empty((fb.shape[0], fa.shape[0], 1 + len(pairs), *fa.shape[-2:]), dtype=fa.dtype)
        torch.mul(ca[:, :, 1], fb[:, :, 1], out=spec[:, :, 0])
        spec[:, :, 0].addcmul_(ca[:, :, 0], fb[:, :, 0])
        for k, (i, j) in enumerate(pairs, 1):
            torch.mul(ca[:, :, i], fb[:, :, j], out=spec[:, :, k])
        return spec

    def _scored(self, out, ea, na, nr, outside, free, plain, zero_at):
        """:meth:`best`'s scores of the correlations ``out`` (C, R, 3 or 4, h, w; overwritten) of a
        block of shifts whose shift (0, 0) lies at ``zero_at``: best score and its flat index in the
        block (and with ``plain`` the score without the band there)."""
        ring = outside > 0
        w = out.shape[-1]
        num, energy, overlap = out[:, :, :3].unbind(2)  # (C, R, h, w): the searched shifts
        ea, na = ea[None, :, None, None], na[None, :, None, None]
        # num / sqrt(ea * max(energy, 1e-3 ea) + 1e-12) * clamp(share, 0, 1), in place (fewer
        # temporaries, the same arithmetic); -2 where the shift overlaps too little
        share = overlap.div_(na)
        skip = (share >= MIN_OVERLAP).logical_not_()
        score = num.div_(energy.clamp_min_(1e-3 * ea).mul_(ea).add_(1e-12).sqrt_()).mul_(share.clamp_(0, 1))
        unbanded = score
        if ring:  # times 1 - outside * (share of the band outside the section on atlas tissue)
            band = out[:, :, 3].div_(nr[None, :, None, None].clamp_min(1.0)).clamp_(0, 1)
            if free > 0:
                band.sub_(free).clamp_(min=0).div_(1.0 - free)
            score = score * band.mul_(-outside).add_(1.0)
        score.masked_fill_(skip, -2.0)
        value, index = score.flatten(2).max(dim=2)
        # the shift (0, 0) where it ties with the best (within TIE; a textureless section, a band that
        # takes the whole score) or where no shift is searched (-2 everywhere), as the unshifted
        # correlation's first index gave before session 30 (review 1 of session 30, C1)
        at_zero = score[..., zero_at[0], zero_at[1]]
        zero = at_zero >= value - TIE
        value = torch.where(zero, at_zero, value)
        index.masked_fill_(zero, zero_at[0] * w + zero_at[1])
        extra = ()
        if plain:  # the score without the band at the best shift (-2 where no shift was searched)
            at = unbanded.flatten(2).gather(2, index[..., None])[..., 0]
            extra = (torch.where(value > -2.0, at, value),)
        return (value, index, *extra)

    def lattice_ok(self) -> bool:
        """Whether :meth:`best_lattice` can run: both padded lengths even."""
        return self.pad[0] % 2 == 0 and self.pad[1] % 2 == 0

    def best_lattice(
        self, fa, ea, na, fb, nr=None, outside: float = 0.0, free: float = 0.0, plain: bool = False
    ):
        """:meth:`best` on every second searched shift per axis only, the lattice through the shift
        (0, 0) (session 46, the ``stage1_lattice_margin`` rerank option): the same scores there (to
        float rounding), for about a quarter of the inverse FFTs and score arithmetic. The correlation
        at every second shift is the inverse FFT of half the length of the spectrum folded onto half
        its frequencies (sampling in space is aliasing in frequency), so it is exact, not a blurred
        stand-in. Returns :meth:`best`'s values with flat indexes into :meth:`best`'s window."""
        if not self.lattice_ok():
            raise ValueError("best_lattice needs even padded lengths")
        (l0, n0), (l1, n1) = self._lattice_axes()
        if self._lattice_ramp is None:  # moves the shift -l0, -l1 to index 0; times 1/4: each axis's
            # inverse below divides by half the padded length
            self._lattice_ramp = self._shift_ramp(l0, l1, 0.25)
        ring = outside > 0
        m0, m1 = self.pad[0] // 2, self.pad[1] // 2
        # the products folded along the rows as they are made: row frequency k and k + m0 summed
        ca = (torch.conj_physical(fa) * self._lattice_ramp)[None]
        fb = fb[:, None]
        top, low = (slice(None, m0), slice(m0, None))
        pairs = ((2, 2), (2, 3), (3, 3)) if ring else ((2, 2), (2, 3))
        spec = torch.empty((fb.shape[0], fa.shape[0], 1 + len(pairs), m0, fa.shape[-1]), dtype=fa.dtype)
        torch.mul(ca[:, :, 1, top], fb[:, :, 1, top], out=spec[:, :, 0])
        spec[:, :, 0].addcmul_(ca[:, :, 0, top], fb[:, :, 0, top])
        spec[:, :, 0].addcmul_(ca[:, :, 1, low], fb[:, :, 1, low])
        spec[:, :, 0].addcmul_(ca[:, :, 0, low], fb[:, :, 0, low])
        for k, (i, j) in enumerate(pairs, 1):
            torch.mul(ca[:, :, i, top], fb[:, :, j, top], out=spec[:, :, k])
            spec[:, :, k].addcmul_(ca[:, :, i, low], fb[:, :, j, low])
        rows = torch.fft.ifft(spec, dim=-2)[..., :n0, :]  # the lattice's rows: real signals along x
        # along the columns: frequency k and k + m1 summed, the latter the conjugate of m1 - k (a real
        # signal's spectrum); then the inverse of length m1
        half = m1 // 2 + 1
        folded = rows[..., :half] + torch.conj(rows[..., m1 - half + 1 : m1 + 1].flip(-1))
        out = torch.fft.irfft(folded, n=m1, dim=-1)[..., :n1].contiguous()
        value, index, *extra = self._scored(out, ea, na, nr, outside, free, plain, (l0 // 2, l1 // 2))
        r, c = index // n1, index % n1
        full = (2 * r - l0 + self.low[0]) * self.window[1] + (2 * c - l1 + self.low[1])
        return (value, full, *extra)

    def _lattice_axes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per axis of :meth:`best_lattice`: the even ``l`` such that lattice point ``t`` is the shift
        ``2 t - l``, and the lattice points searched (every even shift within the window)."""
        axes = []
        for low, size in zip(self.low, self.window, strict=True):
            lo = low - low % 2
            axes.append((lo, (size - 1 - low + lo) // 2 + 1))
        return tuple(axes)

    def shift(self, index: int) -> tuple[float, float]:
        """The shift (rows, columns) of a flat index of :meth:`best`."""
        row, col = divmod(int(index), self.window[1])
        return float(row - self.low[0]), float(col - self.low[1])


class AtlasGrid:
    """The plates (a volume's as a volume) downsampled to ``base_size`` pixels on their longer side,
    with their tissue masks: what :class:`SectionGrid` cuts its atlas slices from."""

    def __init__(self, plates: Plates, base_size: int):
        self.n = plates.n
        shapes = np.array(plates.shapes, dtype=np.float64)
        #: plate pixels per base pixel (one factor for every plate: they share a pixel size)
        self.factor = max(1.0, float(shapes.max()) / base_size)
        self.images = [self._small(plates.plate(i)) for i in range(self.n)]
        segmented = [_segment(im) for im in self.images]
        self.masks = [mask for mask, _, _ in segmented]
        #: whether the atlas's background is bright (brightfield): most of its plates with tissue say so
        #: (:func:`.preprocess._segment`'s polarity; session 41, the ``quarter_gate`` rerank option)
        self.bright = bool(np.mean([b for m, b, _ in segmented if m.any()] or [False]) > 0.5)
        #: tissue extents (height, width) and tissue box centres (y, x) in plate pixels
        self.extents = np.stack([extent(m) for m in self.masks]) * self.factor
        self.centres = np.stack([_box_centre(m) for m in self.masks]) * self.factor
        self.is_volume = plates.volume is not None
        if self.is_volume:
            self.volume = np.stack(self.images)
            self.mask_volume = np.stack(self.masks).astype(np.float32)
        self._cuts: dict[tuple, torch.Tensor] = {}
        self._cut_bytes = 0
        self._lock = threading.Lock()  # lookups may run in several threads on one index
        self._torch_volume: torch.Tensor | None = None
        self._mosaic: tuple | None = None

    def sample(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The volume and its tissue mask at ``points`` ``(3, ...)`` or ``(N, 3, ...)`` (z, y, x in
        base pixels; trilinear, 0 outside), as float32 arrays of the points' shape."""
        shape = points.shape[:-3]
        pts = points.reshape(-1, 3, *points.shape[-2:])
        size = np.array(self.volume.shape, dtype=np.float64)
        norm = pts * 2.0  # (N, 3, h, w) -> 2 pts / (size - 1) - 1
        norm /= np.maximum(size - 1, 1)[None, :, None, None]
        norm -= 1.0
        grid = torch.from_numpy(norm[:, ::-1].transpose(0, 2, 3, 1).astype(np.float32))  # (N, h, w, xyz)
        with self._lock:
            if self._torch_volume is None:
                self._torch_volume = torch.from_numpy(np.stack([self.volume, self.mask_volume])[None])
        out = torch.nn.functional.grid_sample(
            self._torch_volume, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True
        )[0]  # (2, N, h, w)
        img, msk = out.numpy()
        return img.reshape(*shape, *img.shape[-2:]), msk.reshape(*shape, *msk.shape[-2:])

    def sample_planes(self, origin: np.ndarray, rows: np.ndarray, cols: np.ndarray, r, c):
        """:meth:`sample` at the points ``origin + r * rows + c * cols`` of ``N`` planes (``origin``,
        ``rows``, ``cols``: (N, 3), z, y, x in base pixels; ``r``, ``c``: the (h,) and (w,) steps):
        (N, h, w) each, the same trilinear values to float32 rounding of the points (~1e-4).

        Session 30, second round: torch's 3D ``grid_sample`` runs a scalar loop on the CPU, its 2D
        one is vectorised. The volume is laid out as a mosaic of tiles, tile ``t`` holding the slices
        ``t - 2`` and ``t - 1`` (image and mask, four channels, zero outside the volume, two zero
        pixels around each tile); a point reads its lower slice's tile bilinearly (2D), and the two
        slices are blended by its fraction along z: trilinear, ~40 % less CPU than the 3D sampler."""
        mosaic, table, k, low, high = self._mosaic_layout()
        depth = self.volume.shape[0]
        r, c = np.asarray(r, dtype=np.float64), np.asarray(c, dtype=np.float64)
        origin = np.asarray(origin, dtype=np.float64) + np.array([2.0, 0.0, 0.0])  # z + 2: its tile
        rows_part = r[None, :, None] * np.asarray(rows)[:, None, :] + origin[:, None, :]  # (N, h, 3)
        cols_part = c[None, :, None] * np.asarray(cols)[:, None, :]  # (N, w, 3)
        z = (
            torch.from_numpy(rows_part[..., 0].astype(np.float32))[:, :, None]
            + torch.from_numpy(cols_part[..., 0].astype(np.float32))[:, None, :]
        )
        frac = torch.frac(z)  # negative z reads the zero tile 0: its fraction does not matter
        tile = z.clamp_(0, depth + 2).long()
        # the mosaic's normalised (x, y): x and y clamped to the tiles' zero border, plus the tile's corner
        grid = (
            torch.from_numpy((rows_part[..., :0:-1] * k).astype(np.float32))[:, :, None, :]
            + torch.from_numpy((cols_part[..., :0:-1] * k).astype(np.float32))[:, None, :, :]
        )
        grid[..., 0].clamp_(low[0], high[0])
        grid[..., 1].clamp_(low[1], high[1])
        grid += torch.nn.functional.embedding(tile, table)
        out = torch.nn.functional.grid_sample(
            mosaic[None],
            grid.view(1, -1, grid.shape[2], 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )[0].view(4, *frac.shape)
        return torch.lerp(out[0], out[1], frac).numpy(), torch.lerp(out[2], out[3], frac).numpy()

    def _mosaic_layout(self):
        """The mosaic of :meth:`sample_planes` (4, H, W), each tile's corner in its normalised (x, y)
        (tiles, 2), the normalised units per base pixel (x, y) and the (x, y) bounds of a point's
        tile-relative coordinates (built on first use)."""
        with self._lock:
            if self._mosaic is None:
                depth, height, width = self.volume.shape
                th, tw = height + 2 * MOSAIC_BORDER, width + 2 * MOSAIC_BORDER
                tiles = depth + 3  # lower slices -2 .. depth: those outside the volume read 0
                across = math.ceil(math.sqrt(tiles * th / tw))
                down = -(-tiles // across)
                padded = np.zeros((2, depth + 4, height, width), dtype=np.float32)
                padded[0, 2:-2], padded[1, 2:-2] = self.volume, self.mask_volume
                mosaic = np.zeros((4, down * th, across * tw), dtype=np.float32)
                for t in range(tiles):
                    y0 = (t // across) * th + MOSAIC_BORDER
                    x0 = (t % across) * tw + MOSAIC_BORDER
                    window = (slice(y0, y0 + height), slice(x0, x0 + width))
                    mosaic[0][window], mosaic[1][window] = padded[0, t], padded[0, t + 1]
                    mosaic[2][window], mosaic[3][window] = padded[1, t], padded[1, t + 1]
                k = 2.0 / (np.array(mosaic.shape[:0:-1], dtype=np.float64) - 1)  # x, y
                corners = np.stack(
                    [
                        ((np.arange(tiles) % across) * tw + MOSAIC_BORDER) * k[0] - 1.0,
                        ((np.arange(tiles) // across) * th + MOSAIC_BORDER) * k[1] - 1.0,
                    ],
                    axis=1,
                )
                edge = MOSAIC_BORDER - 0.5  # a point this far out reads only the zero border
                low = tuple(float(np.float32(-edge * kk)) for kk in k)
                high = tuple(float(np.float32((n - 1 + edge) * kk)) for n, kk in zip((width, height), k))
                self._mosaic = (
                    torch.from_numpy(mosaic),
                    torch.from_numpy(corners.astype(np.float32)),
                    k,
                    low,
                    high,
                )
            return self._mosaic

    def cached_cut(self, key: tuple, build) -> torch.Tensor:
        """The cut FFT stored under ``key``, made by ``build()`` on first use; the cuts used longest ago
        are dropped beyond :data:`CUT_CACHE_BYTES` (session 46: a cut used again moves to the end; before,
        the oldest made was dropped first, and over 60 sections of query seed 171 the last 30 made 26 cuts
        per lookup again where this makes 12; the same values either way)."""
        with self._lock:
            fft = self._cuts.get(key)
            if fft is not None:
                self._cuts[key] = self._cuts.pop(key)  # the most recently used last
        if fft is not None:
            return fft
        fft = build()  # outside the lock: another thread may build the same cut meanwhile
        size = fft.element_size() * fft.nelement()
        with self._lock:
            if key in self._cuts:
                return self._cuts[key]
            while self._cuts and self._cut_bytes + size > CUT_CACHE_BYTES:
                old = self._cuts.pop(next(iter(self._cuts)))
                self._cut_bytes -= old.element_size() * old.nelement()
            self._cuts[key] = fft
            self._cut_bytes += size
        return fft

    def _small(self, plate: np.ndarray) -> np.ndarray:
        h, w = plate.shape
        size = (max(4, round(w / self.factor)), max(4, round(h / self.factor)))
        if size == (w, h):
            return np.ascontiguousarray(plate, dtype=np.float32)
        return cv2.resize(np.ascontiguousarray(plate, dtype=np.float32), size, interpolation=cv2.INTER_AREA)


def _box_centre(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (np.array(mask.shape, dtype=np.float64) - 1) / 2
    return np.array([(rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2])


@dataclass
class Cut:
    """An atlas slice on a section's canvas: canvas pixel ``c`` shows the atlas at
    ``(z, *pivot) + ((c - canvas centre) * step) @ (row, col)`` (plate pixels; ``z`` in plates)."""

    fft: torch.Tensor
    z: float
    tilt: tuple[float, float]
    pivot: np.ndarray
    step: float
    #: ``step`` times ``sqrt(aspect)`` along the rows and divided by it along the columns
    aspect: float = 1.0
    #: what the cut was made from, where its :class:`SectionGrid` memoised it: its scores against a
    #: section variant are memoised under it too (None: not memoised: a stage-1 plate cut, cached by
    #: its :class:`AtlasGrid` across sections instead)
    key: tuple | None = None

    @property
    def steps(self) -> np.ndarray:
        """Plate pixels per canvas pixel along the rows and the columns."""
        root = math.sqrt(self.aspect)
        return np.array([self.step * root, self.step / root])


class SectionGrid:
    """A section on a square canvas at its own resolution (its tissue ``work_size`` pixels long),
    compared with atlas cuts resampled to it: the section's detail is never thrown away, so small
    plates gain nothing by a whole section shrunk onto them.
    """

    def __init__(
        self,
        grey: np.ndarray,
        mask: np.ndarray,
        work_size: int,
        reach: int | None = None,
        blur: float = 0.0,
        outside: float = 0.0,
        spare: np.ndarray | None = None,
        free: float = 0.0,
        canvas: float = CANVAS,
    ):
        self.grey, self.mask = grey, mask
        # session 42's ``lean`` (the one path since session 43): every oblique cut and every plate cut
        # through a given atlas point made once per grid (:attr:`Cut.key`), and every pair of a memoised
        # cut and a section variant correlated once per grid (:meth:`score`)
        self._cut_memo: dict[tuple, Cut] = {}
        self._pair_memo: dict[tuple, tuple[float, int, float]] = {}
        #: ``blur`` of :func:`field` (grid pixels) for the section and the atlas cuts
        self.blur = float(blur)
        #: score lost per share of the band outside the section's tissue lying on atlas tissue
        self.outside = float(outside)
        self.ring = max(1, round(OUTSIDE_RING * work_size))
        #: the band is spared where this map of the section (1: spared) is above 0.5 (None: nowhere);
        #: where the tissue reaches the image's edge, also beyond the image (unknown there)
        self.spare = spare
        self.spare_beyond = bool(spare is not None and _touches_edge(mask))
        #: share of the band on atlas tissue that costs nothing (Correlator.best's ``free``)
        self.free = float(free)
        self.tissue_centre = np.argwhere(mask).mean(axis=0)
        #: section pixels per canvas pixel
        self.q = float(extent(mask).max()) / work_size
        side = int(round(canvas * work_size))  # ``canvas``: the side in tissue extents (session 46)
        self.canvas = (side, side)
        self.centre = (np.array(self.canvas, dtype=np.float64) - 1) / 2
        #: shifts searched (canvas pixels per axis; ``None``: half the canvas)
        self.corr = Correlator(self.canvas, reach)
        self._variants: dict[float, tuple] = {}
        self._images: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # turned canvases (information)
        self._plain: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # turned canvases (quarter_offsets)
        self.grid_size = int(work_size)
        #: with a margin, :meth:`score` scores every pair on every second shift per axis first
        #: (:meth:`Correlator.best_lattice`), then every shift of the pairs within the margin of their
        #: cut position's best there (session 46, stage 1's ``stage1_lattice_margin``; None: every shift)
        self.lattice_margin: float | None = None
        self._lattice_memo: dict[tuple, tuple[float, int, float]] = {}

    def variant(self, rotation: float):
        """The section turned by ``rotation`` degrees about its tissue centre (at the canvas centre):
        FFTs, field energy, tissue area (cached)."""
        key = round(float(rotation), 6)
        if key not in self._variants:
            lin = rotation_matrix(rotation) * self.q  # section pixels per canvas pixel
            img, msk = self._turned(lin)
            ring = outside_band(msk, self.ring) if self.outside > 0 else None
            if ring is not None and self.spare is not None:
                ring[
                    _pull_map(
                        self.spare,
                        lin,
                        self.tissue_centre - lin @ self.centre,
                        self.canvas,
                        self.spare_beyond,
                    )
                ] = 0
            fft, energy, area = self.corr.section(
                *field(img, section_weight(msk), self.blur), msk.astype(np.float32), ring
            )
            self._variants[key] = (fft, energy, area, 0.0 if ring is None else float(ring.sum()))
        return self._variants[key]

    def _turned(self, lin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The section and its mask on the canvas, ``lin`` section pixels per canvas pixel about its
        tissue centre (at the canvas centre)."""
        return _pull(self.grey, self.mask, lin, self.tissue_centre - lin @ self.centre, self.canvas)

    def _plate_pixels(
        self, atlas: AtlasGrid, z: int, step: float, pivot, aspect: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Plate ``z`` and its mask on the canvas, ``step`` plate pixels per canvas pixel (times
        ``sqrt(aspect)`` along the rows, over it along the columns), plate pixel ``pivot`` at the
        canvas centre."""
        root = math.sqrt(aspect)
        lin = np.diag([root, 1.0 / root]) * (step / atlas.factor)  # base pixels per canvas pixel
        off = np.asarray(pivot, dtype=np.float64) / atlas.factor - lin @ self.centre
        return _pull(atlas.images[z], atlas.masks[z], lin, off, self.canvas)

    def plate_cut(self, atlas: AtlasGrid, z: int, scale: float, pivot=None, aspect: float = 1.0) -> Cut:
        """Plate ``z`` at ``scale`` section pixels per plate pixel (``aspect``: see :class:`Cut`), its
        plate pixel ``pivot`` (default: its tissue box centre; then the cut is cached) at the canvas
        centre."""
        step = self.q / scale  # plate pixels per canvas pixel
        cached = pivot is None and aspect == 1.0
        key = (self.canvas, self.corr.pad, int(z), round(step, 9), self.blur) if cached else None
        pivot = atlas.centres[z] if pivot is None else np.asarray(pivot, dtype=np.float64)
        memo = None
        if key is None:  # a cut through a given atlas point: made once per grid
            memo = ("plate", int(z), float(step), tuple(pivot.tolist()), float(aspect))
            if memo in self._cut_memo:
                return self._cut_memo[memo]

        def build():
            img, msk = self._plate_pixels(atlas, z, step, pivot, aspect)
            return self.corr.slice(*field(img, dilate(msk), self.blur), msk)

        fft = build() if key is None else atlas.cached_cut(key, build)
        cut = Cut(fft, float(z), (0.0, 0.0), pivot, step, float(aspect), memo)
        if memo is not None:
            self._cut_memo[memo] = cut
        return cut

    def oblique_cuts(self, atlas: AtlasGrid, specs, pivot, scale: float, aspect: float = 1.0) -> list[Cut]:
        """Cuts of the volume, one per ``(z, tilt)`` of ``specs``: tilted by ``tilt`` through plate
        pixel ``pivot`` at plate position ``z`` (the canvas centre), at ``scale`` section pixels per
        plate pixel (voxels as cubes; ``aspect``: see :class:`Cut`). Each cut is made once per grid
        (:attr:`Cut.key`): those not made yet are sampled together (trilinear), their fields written into
        one stack and transformed at once (each plane is sampled, and each slice transformed, on its own:
        the values do not depend on the batch)."""
        if not specs:
            return []
        pivot = np.asarray(pivot, dtype=np.float64)
        where = tuple(pivot.tolist())
        keys = [
            ("oblique", float(z), (float(t[0]), float(t[1])), where, float(scale), float(aspect))
            for z, t in specs
        ]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cut_memo))
        if todo:
            img, msk = self._sample(atlas, [(k[1], k[2]) for k in todo], pivot, scale, aspect)
            inside = msk > 0.5
            stack = np.empty((len(todo), 4, *img.shape[1:]), dtype=np.float32)
            for j in range(len(todo)):
                stack[j, 0], stack[j, 1] = field(img[j], dilate(inside[j]), self.blur)
                stack[j, 3] = inside[j]
            ffts = self.corr.slices_into(stack)
            step = self.q / scale
            for j, k in enumerate(todo):
                self._cut_memo[k] = Cut(ffts[j], k[1], k[2], pivot, step, float(aspect), k)
        return [self._cut_memo[k] for k in keys]

    def _sample(self, atlas: AtlasGrid, specs, pivot: np.ndarray, scale: float, aspect: float = 1.0):
        """The volume and its tissue mask on the canvas for each ``(z, tilt)`` of ``specs``
        (:meth:`oblique_cuts`): (N, *canvas) each."""
        step = self.q / scale
        root = math.sqrt(aspect)
        r = (np.arange(self.canvas[0]) - self.centre[0]) * (step * root)
        c = (np.arange(self.canvas[1]) - self.centre[1]) * (step / root)
        axes = np.array([plane(tilt) for _, tilt in specs])  # (N, 2: rows / columns, 3: z, y, x)
        origin = np.zeros((len(specs), 3))
        origin[:, 0] = [z for z, _ in specs]
        origin[:, 1:] = np.asarray(pivot, dtype=np.float64)
        k = np.array([1.0, 1.0 / atlas.factor, 1.0 / atlas.factor])  # plate pixels -> base pixels
        # the base volume is about as fine as the canvas (AtlasGrid of the same work size): no blur
        return atlas.sample_planes(origin * k, axes[:, 0] * k, axes[:, 1] * k, r, c)

    def information(self, atlas: AtlasGrid, pose: Pose) -> float:
        """Mutual information (:func:`information`) of the section's intensities and the atlas's at
        ``pose`` (found on this grid: its scale in section pixels of this grid per plate pixel), over
        the tissue both share, each smoothed by :data:`INFO_BLUR` first; 0 where they share fewer than
        :data:`INFO_MIN_PIXELS` pixels. The edge field compares where boundaries run; this compares
        how the regions' levels go together, whatever the stain maps them to."""
        key = round(float(pose.rotation), 6)
        if key not in self._images:  # the turned section, smoothed (cached per rotation)
            img, msk = self._turned(rotation_matrix(pose.rotation) * self.q)
            self._images[key] = (cv2.GaussianBlur(img, (0, 0), INFO_BLUR), msk)
        img, msk = self._images[key]
        cut, cut_mask = self._cut_at(atlas, pose)
        both = msk & cut_mask
        if int(both.sum()) < INFO_MIN_PIXELS:
            return 0.0
        return information(img[both], cv2.GaussianBlur(cut, (0, 0), INFO_BLUR)[both])

    def _cut_at(self, atlas: AtlasGrid, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        """The atlas and its tissue mask (bool) on the canvas at ``pose`` (found on this grid), cut as
        the pose was found, its aspect included (a volume's oblique cut, or a plate)."""
        centre = np.asarray(pose.centre, dtype=np.float64)
        if atlas.is_volume:
            cut, cut_mask = self._sample(atlas, [(pose.z, pose.tilt)], centre, pose.scale, pose.aspect)
            return cut[0], cut_mask[0] > 0.5
        return self._plate_pixels(atlas, pose.plate, self.q / pose.scale, centre, pose.aspect)

    def _plain_turned(self, rotation: float) -> tuple[np.ndarray, np.ndarray]:
        """The section and its mask turned by ``rotation`` on the canvas, unsmoothed (cached)."""
        key = round(float(rotation), 6)
        if key not in self._plain:
            self._plain[key] = self._turned(rotation_matrix(rotation) * self.q)
        return self._plain[key]

    def level_correlation(self, atlas: AtlasGrid, pose: Pose, section_bright: bool) -> float:
        """Pearson correlation of the section's intensities with the atlas's at ``pose`` (found on this
        grid), over the tissue both share, each in its own polarity (the section's as it was given:
        ``section_bright`` says it was inverted to bright tissue, :meth:`.rerank.PoseSearch.prepare`;
        the atlas's as it is): near +1 where the section's stain brightens where the atlas's does (the
        atlas's stain on another brain), negative where it is the other way round (a fluorescence-like
        section against a Nissl-like atlas, its background opposite); NaN with fewer than
        :data:`INFO_MIN_PIXELS` shared pixels or a flat side. The edge field ignores polarity; this
        reads it (session 41, the ``quarter_gate`` rerank option)."""
        img, msk = self._plain_turned(pose.rotation)
        cut, cut_mask = self._cut_at(atlas, pose)
        both = msk & cut_mask
        if int(both.sum()) < INFO_MIN_PIXELS:
            return float("nan")
        s = img[both].astype(np.float64)
        a = cut[both].astype(np.float64)
        s, a = s - s.mean(), a - a.mean()
        norm = math.sqrt(float(s @ s) * float(a @ a))
        if norm <= 1e-12:
            return float("nan")
        r = float(s @ a) / norm
        return -r if section_bright else r

    def quarter_offsets(self, atlas: AtlasGrid, pose: Pose, reach: int) -> tuple[np.ndarray, np.ndarray]:
        """For each quarter of the section's tissue (split at its tissue centre along the pose's turned
        axes), the plate offset ``dz`` in ``-reach .. reach`` whose cut (the pose's tilt, rotation,
        scale, aspect and atlas point, its ``z`` plus ``dz``) scores best by the edge field on that
        quarter alone (normalised as :class:`Correlator` at the pose's own shift), and the quarter's
        tissue pixels: ``(offsets, areas)``, each of 4; a quarter with fewer than
        :data:`QUARTER_MIN_PIXELS` pixels has area 0 (session 40, the ``quarter_shift`` rerank option).
        A cut of a warped brain is not flat in the atlas: where its parts lie at different plates,
        one plane's best plate follows the parts whose edges fit best, not the section as a whole."""
        img, msk = self._plain_turned(pose.rotation)
        rs, is_ = field(img, section_weight(msk), self.blur)
        dzs = list(range(-int(reach), int(reach) + 1))
        specs = [(pose.z + dz, pose.tilt) for dz in dzs]
        cuts, masks = self._sample(atlas, specs, np.asarray(pose.centre, np.float64), pose.scale, pose.aspect)
        rows, cols = np.ogrid[: msk.shape[0], : msk.shape[1]]
        top, left = rows < self.centre[0], cols < self.centre[1]
        quarters = [msk & top & left, msk & top & ~left, msk & ~top & left, msk & ~top & ~left]
        areas = np.array([float(q.sum()) for q in quarters])
        areas[areas < QUARTER_MIN_PIXELS] = 0.0
        # the section's field on each counted quarter and its energy: the same for every cut
        parts = {}
        for i, q in enumerate(quarters):
            if areas[i] > 0:
                rq, iq = rs[q].astype(np.float64), is_[q].astype(np.float64)
                parts[i] = (rq, iq, float((rq**2 + iq**2).sum()))
        scores = np.full((4, len(dzs)), -np.inf)
        for k, (cut, cm) in enumerate(zip(cuts, masks > 0.5, strict=True)):
            ra, ia = field(cut, dilate(cm), self.blur)
            for i, (rq, iq, ea) in parts.items():
                q = quarters[i]
                en = float((ra[q].astype(np.float64) ** 2 + ia[q].astype(np.float64) ** 2).sum())
                num = float((rq * ra[q] + iq * ia[q]).sum())
                share = float((q & cm).sum()) / areas[i]
                scores[i, k] = num / math.sqrt(ea * max(en, 1e-3 * ea) + 1e-12) * min(share, 1.0)
        offsets = np.array([best_offset(row, dzs) for row in scores], dtype=np.float64)
        return offsets, areas

    def oblique_cut(self, atlas: AtlasGrid, z: float, tilt, pivot, scale: float) -> Cut:
        """One cut of :meth:`oblique_cuts`."""
        return self.oblique_cuts(atlas, [(z, tilt)], pivot, scale)[0]

    # -- scoring -----------------------------------------------------------------------------
    def score(self, pairs: list, n_plates: int, best_per_cut_z: bool = False) -> list[Pose]:
        """Best shift of each ``(rotation, scale, cut)``; returns the poses (with
        ``best_per_cut_z`` only the best pose of each cut position ``z``, in first-seen order)."""
        if not pairs:
            return []
        if self.lattice_margin is not None and self.corr.lattice_ok():
            values, indices, plains = self._lattice_scores(pairs, self.lattice_margin)
        else:
            values, indices, plains = self._scores(pairs)
        keep = range(len(pairs))
        if best_per_cut_z:
            best: dict[float, int] = {}
            for k, (_, _, cut) in enumerate(pairs):
                if cut.z not in best or values[k] > values[best[cut.z]]:
                    best[cut.z] = k
            keep = list(best.values())
        return [
            self._pose(
                pairs[k][0],
                pairs[k][1],
                pairs[k][2],
                values[k],
                self.corr.shift(indices[k]),
                n_plates,
                plains[k] if self.outside > 0 else None,
            )
            for k in keep
        ]

    def _lattice_scores(self, pairs: list, margin: float) -> tuple[list, list, list]:
        """:meth:`_scores` of ``pairs`` on every second shift per axis (:meth:`Correlator.best_lattice`),
        then on every shift for the pairs that score there within ``margin`` of the best pair of their
        cut position ``z`` (at least that one): those pairs' results are :meth:`_scores`'s own, the
        others' their lattice best (never above their best on every shift, to float rounding)."""
        values, indices, plains = self._scores(pairs, lattice=True)
        top: dict[float, float] = {}
        for (_, _, cut), v in zip(pairs, values, strict=True):
            top[cut.z] = max(v, top.get(cut.z, -np.inf))
        again: dict[float, list[int]] = {}  # by rotation: _scores correlates a cross product
        for k, (rotation, _, cut) in enumerate(pairs):
            if values[k] >= top[cut.z] - margin:
                again.setdefault(rotation, []).append(k)
        for ks in again.values():
            for k, result in zip(ks, zip(*self._scores([pairs[k] for k in ks]), strict=True), strict=True):
                values[k], indices[k], plains[k] = result
        return values, indices, plains

    def _grid(
        self, rots: list[float], ffts: list[torch.Tensor], lattice: bool = False
    ) -> tuple[list, list, list]:
        """Every cut ``ffts`` against every section variant turned by ``rots`` (pairs are nearly always
        that cross product): best scores, flat shift indexes and scores without the band, (cuts, rots)
        nested lists (with ``lattice`` on every second shift per axis, :meth:`Correlator.best_lattice`)."""
        best = self.corr.best_lattice if lattice else self.corr.best
        variants = [self.variant(r) for r in rots]
        fa_all = torch.stack([v[0] for v in variants])
        ea_all = torch.tensor([v[1] for v in variants], dtype=torch.float32)
        na_all = torch.tensor([v[2] for v in variants], dtype=torch.float32)
        per = max(1, BATCH // len(rots))
        nr_all = torch.tensor([v[3] for v in variants], dtype=torch.float32)
        parts = [
            best(
                fa_all,
                ea_all,
                na_all,
                _stacked(ffts[b : b + per]),
                nr_all,
                self.outside,
                self.free,
                True,
            )
            for b in range(0, len(ffts), per)
        ]
        return tuple(torch.cat([p[k] for p in parts]).tolist() for k in range(3))

    def _scores(self, pairs: list, lattice: bool = False) -> tuple[list, list, list]:
        """Best score, its flat shift index and its score without the band, of each pair; the pairs of
        memoised cuts (:attr:`Cut.key`) correlated once per grid: the rotations and cuts of the pairs not
        scored yet are correlated as a cross product (:meth:`_grid`), every result of a memoised cut
        kept. A pair's result does not depend on the batch it is correlated in (each product, transform
        and maximum is the pair's own). With ``lattice`` on every second shift per axis (memoised apart)."""
        memo = self._lattice_memo if lattice else self._pair_memo
        todo = [(r, c) for r, _, c in pairs if c.key is None or (c.key, r) not in memo]
        found: dict[tuple, tuple] = {}
        if todo:
            rots = sorted({r for r, _ in todo})
            cuts = list({id(c): c for _, c in todo}.values())
            values, indices, plains = self._grid(rots, [c.fft for c in cuts], lattice)
            for i, c in enumerate(cuts):
                for j, r in enumerate(rots):
                    result = (values[i][j], indices[i][j], plains[i][j])
                    found[(id(c), r)] = result
                    if c.key is not None:
                        memo[(c.key, r)] = result
        out = [found[(id(c), r)] if (id(c), r) in found else memo[(c.key, r)] for r, _, c in pairs]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

    def _pose(
        self, rotation, scale, cut: Cut, score: float, shift: np.ndarray, n_plates: int, plain=None
    ) -> Pose:
        # in Python floats (the same float64 operations as the arrays they replace, session 30: a
        # search builds ~450 poses, and small numpy arrays cost more than their arithmetic)
        root = math.sqrt(cut.aspect)
        d0, d1 = float(shift[0]) * (cut.step * root), float(shift[1]) * (cut.step / root)
        (r0, r1, r2), (c0, c1, c2) = _plane_floats(float(cut.tilt[0]), float(cut.tilt[1]))
        z = cut.z + (r0 * d0 + c0 * d1)
        pivot = cut.pivot
        return Pose(
            score=float(score),
            z=z,
            plate=max(0, min(n_plates - 1, round(z))),
            tilt=cut.tilt,
            rotation=float(rotation),
            scale=float(scale),
            centre=(float(pivot[0]) + (r1 * d0 + c1 * d1), float(pivot[1]) + (r2 * d0 + c2 * d1)),
            grid=self.grid_size,
            plain=None if plain is None else float(plain),
            aspect=cut.aspect,
        )


def _stacked(ffts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(ffts)``; where ``ffts`` are consecutive contiguous rows of one storage (an oblique
    batch's cuts, :meth:`SectionGrid.oblique_cuts`), a view of those rows instead of a copy (the same
    values)."""
    first = ffts[0]
    row = first.numel()
    storage = first.untyped_storage()
    consecutive = all(
        f.is_contiguous()
        and f.shape == first.shape
        and f.dtype == first.dtype
        and f.untyped_storage().data_ptr() == storage.data_ptr()
        and f.storage_offset() == first.storage_offset() + j * row
        for j, f in enumerate(ffts)
    )
    if consecutive and (first.storage_offset() + len(ffts) * row) * first.element_size() <= storage.nbytes():
        return first.as_strided((len(ffts), *first.shape), (row, *first.stride()))
    return torch.stack(ffts)


@functools.lru_cache(maxsize=4096)
def _plane_floats(pitch: float, yaw: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`plane`'s two vectors as tuples of Python floats."""
    rows, cols = _plane(pitch, yaw)
    return tuple(rows.tolist()), tuple(cols.tolist())


def _touches_edge(mask: np.ndarray) -> bool:
    """Whether ``mask`` has tissue on the image's outermost rows or columns."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _pull_map(zone: np.ndarray, lin, off, canvas, beyond: bool) -> np.ndarray:
    """Where the section map ``zone`` read at ``lin @ c + off`` (as :func:`_pull`) is above 0.5, and
    with ``beyond`` every canvas pixel outside the section's image."""
    m = np.array([[lin[1, 1], lin[1, 0], off[1]], [lin[0, 1], lin[0, 0], off[0]]], dtype=np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    out = cv2.warpAffine(zone, m, (canvas[1], canvas[0]), flags=flags, borderValue=1.0 if beyond else 0.0)
    return out > 0.5


def _pull(image, mask, lin, off, canvas) -> tuple[np.ndarray, np.ndarray]:
    """``image`` and ``mask`` read at ``lin @ c + off`` for every canvas pixel ``c`` (y, x), smoothed
    first when that shrinks them (no aliasing)."""
    m = np.array([[lin[1, 1], lin[1, 0], off[1]], [lin[0, 1], lin[0, 0], off[0]]], dtype=np.float64)
    size = (canvas[1], canvas[0])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    step = float(np.sqrt(abs(np.linalg.det(lin))))
    src = cv2.GaussianBlur(image, (0, 0), 0.45 * step) if step > 1.5 else image
    img = cv2.warpAffine(src, m, size, flags=flags, borderValue=0.0)
    msk = cv2.warpAffine(mask.astype(np.float32), m, size, flags=flags, borderValue=0.0) > 0.5
    return img, msk
