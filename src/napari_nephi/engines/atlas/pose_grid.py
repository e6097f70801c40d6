"""The atlas and a section on a small search grid, compared for every shift at once (pose search).

Used by :mod:`.rerank`. The similarity is a normalised gradient field in the double-angle form:
each pixel's gradient ``g`` becomes ``(gx + i gy)^2 / (|g|^2 + eps^2)``, so only the orientation of
edges counts; a reversed contrast or any per-region remapping of intensities that keeps the region
boundaries gives the same field. A pose's score is the real part of the correlation of the section's
field (inside its tissue) with the atlas's, normalised like a correlation coefficient, times the
share of the section's tissue lying on the atlas's tissue; all shifts are scored by FFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.fft import next_fast_len

from .plates import Plates
from .preprocess import _segment

#: Margin of the search canvas around the plates, as a fraction of their longer side.
CANVAS_MARGIN = 0.2
#: ``eps`` of the normalised gradient field, as a fraction of the 90th percentile of the gradient
#: magnitude on the tissue: weaker edges (noise, texture) count less than region boundaries.
EDGE_EPS = 0.25
#: Weight of the section's outline (one pixel either side of its tissue mask's edge) against its
#: inside. 0: a cut edge has no counterpart in the atlas, and a small plate's outline would fit a
#: whole section shrunk onto it (measured: the outline at weight 1 picked end plates for whole
#: sections).
OUTLINE = 0.0
#: Shifts that put less than this share of the section's tissue on the atlas's tissue are ignored.
MIN_OVERLAP = 0.5
#: Pairs (section variant, atlas slice) correlated per batch (bounds memory).
BATCH = 256


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


def field(image: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(real, imaginary) double-angle normalised gradient field of ``image``, times ``weight``."""
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3)
    mag2 = gx * gx + gy * gy
    on = weight > 0
    ref = float(np.percentile(np.sqrt(mag2[on]), 90)) if on.any() else 0.0
    eps2 = max((EDGE_EPS * ref) ** 2, 1e-12)
    scale = np.where(on, weight / (mag2 + eps2), 0.0)
    return ((gx * gx - gy * gy) * scale).astype(np.float32), ((2 * gx * gy) * scale).astype(np.float32)


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """``mask`` grown by a disc of ``radius`` pixels."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), k) > 0


def section_weight(mask: np.ndarray) -> np.ndarray:
    """1 inside the section's tissue, :data:`OUTLINE` on its outline, 0 elsewhere."""
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return np.where(inner, 1.0, np.where(dilate(mask), OUTLINE, 0.0)).astype(np.float32)


def rotation_matrix(degrees: float) -> np.ndarray:
    """2D rotation in (y, x) by ``degrees``."""
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def plane(tilt: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit (z, y, x) vectors along the rows and columns of a cut tilted by ``(pitch, yaw)``
    (see :class:`Pose`); ``(0, 0)`` gives a plate's own axes."""
    a, b = (math.radians(t) for t in tilt)
    pitch = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    yaw = np.array([[math.cos(b), 0.0, math.sin(b)], [0.0, 1.0, 0.0], [-math.sin(b), 0.0, math.cos(b)]])
    turn = yaw @ pitch
    return turn @ np.array([0.0, 1.0, 0.0]), turn @ np.array([0.0, 0.0, 1.0])


def extent(mask: np.ndarray) -> np.ndarray:
    """(height, width) of the bounding box of ``mask`` (1, 1 when empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.array([1.0, 1.0])
    return np.array([rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1], dtype=np.float64)


class Correlator:
    """Scores of section variants against atlas slices for every shift, by FFT (batched).

    A shift ``s`` (canvas pixels, numpy order) puts section canvas pixel ``q`` on slice pixel
    ``q + s``; shifts up to half the canvas per axis are searched.
    """

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        # exact for shifts up to half the canvas; lengths of small prime factors keep the FFTs fast
        self.pad = tuple(next_fast_len(n + (n + 1) // 2, real=True) for n in shape)
        ok = np.ones(self.pad, dtype=bool)
        for axis, (n, p) in enumerate(zip(shape, self.pad, strict=True)):
            bad = np.zeros(p, dtype=bool)
            bad[p - n + 1 : n] = True  # would wrap around
            ok &= ~(bad[:, None] if axis == 0 else bad[None, :])
        self.allowed = torch.from_numpy(ok)

    def fft(self, stack: np.ndarray) -> torch.Tensor:
        """2D real FFTs of a stack of canvases, zero-padded."""
        return torch.fft.rfft2(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), s=self.pad)

    def section(self, re: np.ndarray, im: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, float, float]:
        """FFTs of a section variant (field parts, tissue mask), its field energy and tissue area."""
        energy = float((re.astype(np.float64) ** 2 + im.astype(np.float64) ** 2).sum())
        return self.fft(np.stack([re, im, mask])), energy, float(mask.sum())

    def slice(self, re: np.ndarray, im: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """FFTs of an atlas slice: field parts, field energy per pixel, tissue mask."""
        return self.fft(np.stack([re, im, re * re + im * im, mask]))

    def best(self, fa, ea, na, fb) -> tuple[torch.Tensor, torch.Tensor]:
        """Best score and its flat shift index of pairs: ``fa`` (P, 3, ...) against ``fb`` (P, 4, ...)."""
        ca = torch.conj(fa)
        spec = torch.stack(
            [ca[:, 0] * fb[:, 0] + ca[:, 1] * fb[:, 1], ca[:, 2] * fb[:, 2], ca[:, 2] * fb[:, 3]], dim=1
        )
        num, energy, overlap = torch.fft.irfft2(spec, s=self.pad).unbind(1)
        ea, na = ea[:, None, None], na[:, None, None]
        share = overlap / na
        score = num / torch.sqrt(ea * energy.clamp_min(1e-3 * ea) + 1e-12) * share.clamp(0, 1)
        score = torch.where(self.allowed & (share >= MIN_OVERLAP), score, torch.tensor(-2.0))
        return score.flatten(1).max(dim=1)

    def shift(self, index: int) -> np.ndarray:
        """The shift of a flat index of :meth:`best`."""
        k = np.array(np.unravel_index(int(index), self.pad))
        pad = np.array(self.pad)
        return np.where(k > pad // 2, k - pad, k).astype(np.float64)


class AtlasGrid:
    """The plates (and a volume's oblique cuts) on a canvas of plates ``work_size`` pixels long.

    Coordinates of poses are kept in plate pixels and section pixels, so grids of different sizes
    exchange poses.
    """

    def __init__(self, plates: Plates, work_size: int):
        self.n = plates.n
        self.work_size = int(work_size)
        shapes = np.array(plates.shapes, dtype=np.float64)
        #: plate pixels per work pixel (one factor for every plate: they share a pixel size)
        self.factor = max(1.0, float(shapes.max()) / self.work_size)
        small = [self._small(plates.plate(i)) for i in range(self.n)]
        h, w = max(s.shape[0] for s in small), max(s.shape[1] for s in small)
        m = int(round(CANVAS_MARGIN * max(h, w)))
        self.canvas = (h + 2 * m, w + 2 * m)
        self.centre = (np.array(self.canvas, dtype=np.float64) - 1) / 2
        self.corr = Correlator(self.canvas)
        masks = [_segment(s)[0] for s in small]
        #: plate work pixel (y, x) of plate i is canvas pixel (y, x) + offsets[i]
        self.offsets = [
            np.array([(self.canvas[0] - s.shape[0]) // 2, (self.canvas[1] - s.shape[1]) // 2]) for s in small
        ]
        self.images = [self._place(s, o) for s, o in zip(small, self.offsets, strict=True)]
        self.masks = [self._place(k.astype(np.float32), o) for k, o in zip(masks, self.offsets, strict=True)]
        #: tissue extents (height, width) of every plate in plate pixels
        self.extents = np.stack([extent(k) for k in masks]) * self.factor
        self.is_volume = plates.volume is not None
        if self.is_volume:
            self.volume = np.stack(self.images)
            self.mask_volume = np.stack(self.masks)
        self._plate_fft: dict[int, torch.Tensor] = {}

    def _small(self, plate: np.ndarray) -> np.ndarray:
        h, w = plate.shape
        size = (max(4, round(w / self.factor)), max(4, round(h / self.factor)))
        mode = cv2.INTER_AREA if self.factor > 1 else cv2.INTER_LINEAR
        return cv2.resize(np.ascontiguousarray(plate, dtype=np.float32), size, interpolation=mode)

    def _place(self, image: np.ndarray, offset: np.ndarray) -> np.ndarray:
        out = np.zeros(self.canvas, dtype=np.float32)
        out[offset[0] : offset[0] + image.shape[0], offset[1] : offset[1] + image.shape[1]] = image
        return out

    # -- atlas side --------------------------------------------------------------------------
    def plate_slice(self, z: int) -> torch.Tensor:
        """FFTs of plate ``z`` (cached)."""
        if z not in self._plate_fft:
            mask = self.masks[z]
            self._plate_fft[z] = self.corr.slice(*field(self.images[z], dilate(mask > 0.5)), mask)
        return self._plate_fft[z]

    def to_canvas(self, plate_px, plate: int) -> np.ndarray:
        """Canvas pixel of a plate pixel ``(y, x)`` of plate ``plate``."""
        return np.asarray(plate_px, dtype=np.float64) / self.factor + self.offsets[plate]

    def oblique(self, z: float, tilt, pivot: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """FFTs of the cut tilted by ``tilt`` through canvas point ``pivot`` at plate position ``z``,
        and the atlas ``z`` of every canvas pixel of it (a volume's voxels are taken as cubes)."""
        e_row, e_col = plane(tilt)
        r, c = np.meshgrid(
            np.arange(self.canvas[0]) - pivot[0], np.arange(self.canvas[1]) - pivot[1], indexing="ij"
        )
        pts = np.array([0.0, pivot[0], pivot[1]])[:, None, None] + e_row[:, None, None] * r
        pts = pts + e_col[:, None, None] * c
        pts[0] = z + pts[0] * self.factor  # one work pixel is `factor` plates thick
        img = ndi.map_coordinates(self.volume, pts, order=1, mode="constant", cval=0.0).astype(np.float32)
        mask = ndi.map_coordinates(self.mask_volume, pts, order=1, mode="constant", cval=0.0) > 0.5
        return self.corr.slice(*field(img, dilate(mask)), mask.astype(np.float32)), pts[0]

    # -- section side ------------------------------------------------------------------------
    def variant(self, grey: np.ndarray, mask: np.ndarray, centre, rotation: float, scale: float):
        """The section (grey, tissue mask, tissue centre) on the canvas turned by ``rotation`` at
        ``scale`` section pixels per plate pixel, its tissue centre at the canvas centre: FFTs,
        field energy, tissue area."""
        lin = rotation_matrix(rotation) * scale * self.factor  # section pixels per canvas pixel
        off = np.asarray(centre) - lin @ self.centre
        # cv2 takes (x, y): the map canvas -> section with its axes swapped
        m = np.array([[lin[1, 1], lin[1, 0], off[1]], [lin[0, 1], lin[0, 0], off[0]]], dtype=np.float64)
        size = (self.canvas[1], self.canvas[0])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        step = scale * self.factor
        src = cv2.GaussianBlur(grey, (0, 0), 0.45 * step) if step > 1.5 else grey  # no aliasing
        img = cv2.warpAffine(src, m, size, flags=flags, borderValue=0.0)
        msk = cv2.warpAffine(mask.astype(np.float32), m, size, flags=flags, borderValue=0.0) > 0.5
        return self.corr.section(*field(img, section_weight(msk)), msk.astype(np.float32))

    # -- scoring -----------------------------------------------------------------------------
    def score(self, pairs: list) -> list[Pose]:
        """Best shift of each ``(variant, slice, info)``: ``slice`` is :meth:`plate_slice`'s tensor or
        :meth:`oblique`'s pair; ``info`` holds ``z, tilt, rotation, scale``. Returns the poses."""
        a_index: dict[int, int] = {}
        b_index: dict[int, int] = {}
        a_list, b_list, ia, ib = [], [], [], []
        for var, sl, _ in pairs:
            fb = sl if isinstance(sl, torch.Tensor) else sl[0]
            if id(var) not in a_index:
                a_index[id(var)] = len(a_list)
                a_list.append(var)
            if id(fb) not in b_index:
                b_index[id(fb)] = len(b_list)
                b_list.append(fb)
            ia.append(a_index[id(var)])
            ib.append(b_index[id(fb)])
        if not pairs:
            return []
        fa_all = torch.stack([v[0] for v in a_list])
        ea_all = torch.tensor([v[1] for v in a_list], dtype=torch.float32)
        na_all = torch.tensor([v[2] for v in a_list], dtype=torch.float32)
        fb_all = torch.stack(b_list)
        ia_t, ib_t = torch.tensor(ia), torch.tensor(ib)
        out = []
        for b in range(0, len(pairs), BATCH):
            sa, sb = ia_t[b : b + BATCH], ib_t[b : b + BATCH]
            value, index = self.corr.best(fa_all[sa], ea_all[sa], na_all[sa], fb_all[sb])
            for (_, sl, info), v, k in zip(pairs[b : b + BATCH], value.tolist(), index.tolist(), strict=True):
                out.append(self._pose(info, sl, v, self.corr.shift(k)))
        return out

    def _pose(self, info: dict, sl, score: float, shift: np.ndarray) -> Pose:
        at = self.centre + shift  # canvas pixel of the slice under the section's tissue centre
        if isinstance(sl, tuple):  # an oblique cut: the atlas z at that pixel
            iy = int(np.clip(round(at[0]), 0, self.canvas[0] - 1))
            ix = int(np.clip(round(at[1]), 0, self.canvas[1] - 1))
            z = float(sl[1][iy, ix])
        else:
            z = float(info["z"])
        plate = int(np.clip(round(z), 0, self.n - 1))
        plate_px = (at - self.offsets[plate]) * self.factor
        return Pose(
            score=float(score),
            z=z,
            plate=plate,
            tilt=(float(info["tilt"][0]), float(info["tilt"][1])),
            rotation=float(info["rotation"]),
            scale=float(info["scale"]),
            centre=(float(plate_px[0]), float(plate_px[1])),
            grid=self.work_size,
        )
