"""Synthetic training sections from the atlas alone: oblique, partial, damaged, another stain.

A :class:`SectionSynthesizer` turns a plate index into a section that looks cut from a real brain:
for a 3D reference an oblique re-slice through the volume around the plate (pitch and yaw, so its
top, bottom and sides come from neighbouring plates while its centre stays on the labelled plate);
for a list of plates an in-plane view of the plate, optionally blended with a neighbour. Then
in-plane rotation and scale, a left-right flip (a section mounted face down), crop and pad, partial
sections (missing cortex or top, one hemisphere or side, the back end, ragged edges), tears and
holes. Sections of *another brain* differ from the atlas by more than the cut: a smooth warp along
the plate axis (its structures sit a little earlier or later in places) and, as an option
(``restain``), another staining that replaces the atlas's own texture: the plate smoothed, each
labelled region made lighter or darker by a random gain of its own, a fresh random texture laid
over it. Then another stain (a non-monotonic intensity remap),
contrast, gamma, inversion (fluorescence-like against Nissl-like brightfield), uneven
illumination, blur, pepper and noise. Everything runs at ``work_size`` (plates downsampled once).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from napari_nephi.core.errors import InputError
from napari_nephi.core.options import check_float, check_int, check_known

from .plates import Plates
from .preprocess import background_is_bright, tissue_mask

__all__ = ["SynthesisConfig", "SectionSynthesizer", "SyntheticSection"]

#: Margin around the tissue bounding box kept in the working copy, as a fraction of its longer side.
BOX_MARGIN = 0.06
#: Oblique samples first look at every COARSE-th pixel to place damage and centre the plane.
COARSE = 3
#: Standard deviation of the log of the per-region gains of a restained section.
RESTAIN_GAIN = 0.35
_PAIRS = ("scale", "contrast", "gamma")
_PROBABILITIES = ("partial", "tears", "holes", "invert", "modality", "flip", "restain", "partition")
#: ``partition``: the share of a view's tissue signal replaced by the partition's levels (drawn range).
PARTITION_SHARE = (0.3, 0.8)
_LIMITS = {  # option -> (low, high)
    "max_tilt": (0.0, 45.0),
    "rotation": (0.0, 180.0),
    "crop_pad": (0.0, 0.5),
    "pepper": (0.0, 0.5),
    "blur": (0.0, 10.0),
    "noise": (0.0, 1.0),
    "illumination": (0.0, 1.0),
    "blend": (0.0, 0.5),
    "offset": (0.0, 0.49),
    "elastic": (0.0, 0.2),
    "squeeze": (0.0, 0.5),
    "depth_warp": (0.0, 0.2),
}
_PAIR_LIMITS = {"scale": (0.2, 5.0), "contrast": (0.05, 10.0), "gamma": (0.1, 10.0)}


@dataclass
class SynthesisConfig:
    """Augmentation ranges of :class:`SectionSynthesizer` (probabilities, maxima and ranges).

    ``max_tilt``: pitch and yaw of oblique re-slices in degrees (3D references only);
    ``rotation``: in-plane degrees; ``scale``: zoom range (> 1 enlarges, cutting the borders; the
    network input is cropped to the tissue, so a zoom matters where it cuts tissue away, and most
    real sections are whole: with (1.0, 1.4) nearly every view lost its outline and whole sections
    looked too small to the network);
    ``partial``: probability of a partial section; ``crop_pad``: per-side fraction cropped
    (negative draw) or padded; ``pepper``: fraction of coarse cells set dark; ``tears``,
    ``holes``: probabilities; ``blur``: maximum Gaussian sigma in pixels at work size;
    ``noise``: maximum Gaussian noise sigma; ``contrast``, ``gamma``: ranges; ``invert``:
    probability of the other polarity (fluorescence-like against Nissl-like); ``modality``:
    probability of a non-monotonic intensity remap (another stain); ``illumination``: maximum
    relative amplitude of uneven illumination; ``blend``: maximum weight of a neighbouring plate
    mixed in (lists of plates); ``offset``: maximum distance in plates of the section centre from
    its plate (3D, below 0.5 so the plate stays the nearest one); ``elastic``: maximum smooth
    displacement of the tissue (stretching when mounted) as a fraction of the work size;
    ``squeeze``: maximum relative compression along a random direction (cutting compresses);
    ``flip``: probability of a left-right mirrored section; ``depth_warp``: maximum smooth
    displacement along the plate axis (3D only) as a fraction of the tissue's longer side (another
    brain's structures lie a little earlier or later in places); ``restain``: probability that the
    atlas's texture is replaced (the plate smoothed, a random gain per labelled region, a fresh
    random texture); off by default: on the phantom benchmark it lowered the accuracy (mean rank
    16.7 -> 19.8 at probability 0.5 on 120 held-out sections, see docs/atlas.md); ``partition``:
    probability that a share (:data:`PARTITION_SHARE`) of the view's tissue signal is replaced by the
    levels of compartments that follow no atlas region (level sets of a smooth random field), as a
    stain whose compartments are not the atlas's (session 37, opt-in; off by default: no draw, the
    views as before; an index trained at 0.3 ranked the benchmark's independent stain better, 15.93 ->
    13.36 at W 0.55, whose mixing form it imitates, but today's stain worse, 1.917 -> 2.346, and the
    ``foreign`` stain worse, 4.729 -> 5.025: docs/atlas.md, "Session 37").
    """

    max_tilt: float = 10.0
    rotation: float = 10.0
    scale: tuple = (0.9, 1.15)
    partial: float = 0.5
    crop_pad: float = 0.1
    pepper: float = 0.05
    tears: float = 0.3
    holes: float = 0.3
    blur: float = 1.0
    noise: float = 0.05
    contrast: tuple = (0.6, 1.4)
    gamma: tuple = (0.7, 1.5)
    invert: float = 0.3
    modality: float = 0.3
    illumination: float = 0.3
    blend: float = 0.15
    offset: float = 0.2
    elastic: float = 0.02
    squeeze: float = 0.08
    flip: float = 0.5
    depth_warp: float = 0.025
    restain: float = 0.0
    partition: float = 0.0

    def to_dict(self) -> dict:
        """Plain JSON-able dict (ranges as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SynthesisConfig:
        """The config of ``d`` (as :meth:`to_dict` writes); unknown keys, bad values: :class:`InputError`."""
        if not isinstance(d, dict):
            raise InputError(f"A synthesis config must be a dict, got {type(d).__name__}.")
        check_known("synthesis", d, [f.name for f in fields(cls)])
        values = {k: tuple(v) if k in _PAIRS and isinstance(v, (list, tuple)) else v for k, v in d.items()}
        return cls(**values).checked()

    @classmethod
    def paper(cls) -> SynthesisConfig:
        """Only the authors' augmentations: rotation 10, scale 1.0-1.8, crop/pad 10 %, pepper 0.1."""
        return dataclasses.replace(cls.none(), rotation=10.0, scale=(1.0, 1.8), crop_pad=0.1, pepper=0.1)

    @classmethod
    def none(cls) -> SynthesisConfig:
        """No augmentation: every sample is its plate (at work size)."""
        off = {f.name: (1.0, 1.0) if f.name in _PAIRS else 0.0 for f in fields(cls)}
        return cls(**off)

    def checked(self) -> SynthesisConfig:
        """``self`` after checking every value (:class:`InputError` naming the first bad one)."""
        for name, (lo, hi) in _LIMITS.items():
            setattr(self, name, check_float(name, getattr(self, name), lo, hi))
        for name in _PROBABILITIES:
            setattr(self, name, check_float(name, getattr(self, name), 0.0, 1.0))
        for name, (lo, hi) in _PAIR_LIMITS.items():
            pair = getattr(self, name)
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
                raise InputError(f"Option {name} must be a (low, high) pair, got {pair!r}.")
            a, b = (check_float(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(pair))
            if a > b:
                raise InputError(f"Option {name} must be (low, high) with low <= high, got {pair!r}.")
            setattr(self, name, (a, b))
        return self


@dataclass
class SyntheticSection:
    """One synthetic section and its truth.

    ``coords``: ``(3, h, w)`` float32 atlas coordinates (plate, y, x) of every pixel in the
    plates' own pixels (for a list of plates, y and x are in the pixels of plate ``plate``);
    ``labels``: the atlas labels there (nearest), when the atlas has labels; ``params``: the
    random draws (angles in degrees, which damage was applied, ...).
    """

    image: np.ndarray
    plate: int
    coords: np.ndarray
    labels: np.ndarray | None
    params: dict = field(default_factory=dict)


@dataclass
class _Frame:
    """A plate (or the volume) at work size: native box ``(y0, y1, x0, x1)``, scales, tissue centre."""

    data: np.ndarray  # (h, w) or (n, h, w) float32
    box: tuple[int, int, int, int]
    sy: float
    sx: float
    centre: tuple[float, float]  # native (y, x) of the tissue bounding box centre
    extent: tuple[float, float]  # native tissue bounding box height and width
    background: float
    threshold: float
    bright: bool

    def to_work(self, y, x):
        """Native (y, x) -> work indices."""
        return (y - self.box[0] + 0.5) * self.sy - 0.5, (x - self.box[2] + 0.5) * self.sx - 0.5

    def to_native(self, r, c):
        """Work (row, col) -> native (y, x)."""
        return self.box[0] + (r + 0.5) / self.sy - 0.5, self.box[2] + (c + 0.5) / self.sx - 0.5


@dataclass
class _View:
    """The canvas of a plate's samples: native box ``(y0, y1, x0, x1)``, canvas pixels per native pixel,
    the pivot (native centre of the plate's tissue) and the canvas shape before crop and pad."""

    box: tuple[int, int, int, int]
    sy: float
    sx: float
    centre: tuple[float, float]
    shape: tuple[int, int]

    to_canvas = _Frame.to_work
    to_native = _Frame.to_native


def _view_of(fr: _Frame) -> _View:
    """The canvas of a single plate: its work frame itself."""
    return _View(fr.box, fr.sy, fr.sx, fr.centre, fr.data.shape[-2:])


def _volume_views(fr: _Frame, shape: tuple[int, int], reach: int, work_size: int) -> list[_View]:
    """Per-plate canvases of a volume: the tissue boxes of the plates within ``reach`` (an oblique cut
    reaches them), plus a margin, at ``work_size``; pivots at each plate's own tissue centre."""
    tissue = fr.data < fr.threshold if fr.bright else fr.data > fr.threshold
    rows, cols = tissue.sum(axis=2) >= 2, tissue.sum(axis=1) >= 2
    boxes = []
    for i in range(len(tissue)):
        r, c = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if r.size == 0 or c.size == 0:
            boxes.append(None)
            continue
        y0, y1 = fr.to_native(np.array([r[0] - 0.5, r[-1] + 0.5]), np.zeros(2))[0]
        x0, x1 = fr.to_native(np.zeros(2), np.array([c[0] - 0.5, c[-1] + 0.5]))[1]
        boxes.append((y0 + 0.5, y1 + 0.5, x0 + 0.5, x1 + 0.5))  # pixel edges -> half-open index box
    union = (fr.box[0], fr.box[1], fr.box[2], fr.box[3])
    views = []
    for i in range(len(tissue)):
        near = [b for b in boxes[max(0, i - reach) : i + reach + 1] if b is not None] or [union]
        t0, t1 = min(b[0] for b in near), max(b[1] for b in near)
        l0, l1 = min(b[2] for b in near), max(b[3] for b in near)
        own = boxes[i] or union
        m = BOX_MARGIN * max(t1 - t0, l1 - l0)
        y0, y1 = max(0, math.floor(t0 - m)), min(shape[0], math.ceil(t1 + m))
        x0, x1 = max(0, math.floor(l0 - m)), min(shape[1], math.ceil(l1 + m))
        scale = work_size / max(y1 - y0, x1 - x0)
        size = (max(2, round((y1 - y0) * scale)), max(2, round((x1 - x0) * scale)))
        centre = ((own[0] + own[1] - 1) / 2.0, (own[2] + own[3] - 1) / 2.0)
        views.append(_View((y0, y1, x0, x1), size[0] / (y1 - y0), size[1] / (x1 - x0), centre, size))
    return views


def _tissue_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def _make_frame(
    stack: np.ndarray, mask: np.ndarray, bright: bool, work_size: int, zoom: float = 1.0
) -> _Frame:
    """Crop ``stack`` ((h, w) or (n, h, w)) to the tissue box of ``mask`` plus a margin; resize it so
    that box's longer side is ``zoom * work_size``."""
    t0, t1, l0, l1 = _tissue_box(mask)
    h, w = mask.shape
    m = round(BOX_MARGIN * max(t1 - t0, l1 - l0))
    y0, y1, x0, x1 = max(0, t0 - m), min(h, t1 + m), max(0, l0 - m), min(w, l1 + m)
    s = zoom * work_size / max(y1 - y0, x1 - x0)
    size = (max(2, round((x1 - x0) * s)), max(2, round((y1 - y0) * s)))
    mode = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    planes = stack[None] if stack.ndim == 2 else stack
    work = np.stack(
        [cv2.resize(np.ascontiguousarray(p[y0:y1, x0:x1]), size, interpolation=mode) for p in planes]
    )
    work = work[0] if stack.ndim == 2 else work
    values = planes[:: max(1, len(planes) // 16), ~mask] if (~mask).any() else None
    bg = float(np.median(values)) if values is not None and values.size else (1.0 if bright else 0.0)
    sample = work[:: max(1, work.shape[0] // 16)] if work.ndim == 3 else work
    thr = float(threshold_otsu(sample)) if sample.max() > sample.min() else 0.5
    return _Frame(
        data=work.astype(np.float32, copy=False),
        box=(y0, y1, x0, x1),
        sy=size[1] / (y1 - y0),
        sx=size[0] / (x1 - x0),
        centre=((t0 + t1 - 1) / 2.0, (l0 + l1 - 1) / 2.0),
        extent=(float(t1 - t0), float(l1 - l0)),
        background=bg,
        threshold=0.5 * (thr + bg),
        bright=bright,
    )


def _plane_vectors(pitch: float, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """In-plane unit vectors (z, y, x) of rows and columns, as :func:`section_from_atlas` tilts them."""
    a, b = math.radians(pitch), math.radians(yaw)
    e_row = np.array([-math.sin(a), math.cos(a), 0.0])
    e_col = np.array([math.sin(b) * math.cos(a), math.sin(a) * math.sin(b), math.cos(b)])
    e_col -= e_row * (e_col @ e_row)
    return e_row, e_col / np.linalg.norm(e_col)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int = 4) -> np.ndarray:
    """A smooth random field of ``shape`` in about [-1, 1] (cubic upsampling of a coarse grid)."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _ragged(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """A ragged 1D profile along ``t`` (in [0, 1]): a few random sines, scaled to ``amplitude``."""
    grid = np.linspace(0, 1, 256)
    out = np.zeros_like(grid)
    for k in range(1, 6):
        out += rng.normal(0, 1.0 / k) * np.sin(2 * np.pi * k * grid + rng.uniform(0, 2 * np.pi))
    return (amplitude / 2.0) * np.interp(t, grid, out).astype(np.float32)


class SectionSynthesizer:
    """Draws synthetic training sections of known plate from :class:`Plates` (see the module doc).

    ``work_size``: longer side in pixels of the tissue (plus a small margin) in the samples;
    ``seed``: the random sequence (two synthesisers with one seed draw the same samples);
    ``plate_spacing``: distance between neighbouring plates of a 3D reference in in-plane pixels
    (1 for an isotropic volume; 4 for every 4th plane of one), so tilts are true angles.
    """

    def __init__(
        self,
        plates: Plates,
        config: SynthesisConfig | None = None,
        *,
        work_size: int = 160,
        seed=0,
        plate_spacing: float = 1.0,
    ):
        if not isinstance(plates, Plates):
            raise InputError(
                f"SectionSynthesizer needs Plates (Plates.from_reference), got {type(plates).__name__}."
            )
        if config is None:
            config = SynthesisConfig()
        if not isinstance(config, SynthesisConfig):
            raise InputError(f"config must be a SynthesisConfig, got {type(config).__name__}.")
        self.config = SynthesisConfig(**asdict(config)).checked()
        self.work_size = check_int("work_size", work_size, 16, 4096)
        self.plate_spacing = check_float("plate_spacing", plate_spacing, 0.0, 1000.0, low_open=True)
        self.plates = plates
        self._rng = np.random.default_rng(seed)
        self._label_volume: np.ndarray | None = None
        vol = plates.volume
        if vol is not None:
            bright = background_is_bright(vol.mean(axis=0))
            proj = vol.min(axis=0) if bright else vol.max(axis=0)
            mask = tissue_mask(proj)
            if not mask.any():
                mask = np.ones(proj.shape, bool)
            frame = _make_frame(vol, mask, bright, self.work_size)
            tilt = math.tan(math.radians(self.config.max_tilt))
            reach = math.ceil(tilt * max(vol.shape[1:]) / 2 / self.plate_spacing)
            views = _volume_views(frame, vol.shape[1:], reach, self.work_size)
            # the volume at the resolution the smaller plates need (at most twice the whole brain's)
            sides = np.array([max(v.box[1] - v.box[0], v.box[3] - v.box[2]) for v in views])
            frame_side = max(frame.box[1] - frame.box[0], frame.box[3] - frame.box[2])
            zoom = float(np.clip(frame_side / np.percentile(sides, 25), 1.0, 2.0))
            if zoom > 1.05:
                frame = _make_frame(vol, mask, bright, self.work_size, zoom)
            self._frames, self._views = [frame], views
        else:
            self._frames = []
            for i in range(plates.n):
                p = plates.plate(i)
                mask = tissue_mask(p)
                if not mask.any():
                    mask = np.ones(p.shape, bool)
                self._frames.append(_make_frame(p, mask, background_is_bright(p), self.work_size))
            self._views = [_view_of(fr) for fr in self._frames]

    # -- public ------------------------------------------------------------------------------
    @property
    def is_volume(self) -> bool:
        """Whether samples are oblique re-slices of a 3D volume."""
        return self.plates.volume is not None

    def frame_box(self, plate_index: int = 0) -> tuple[int, int, int, int]:
        """Native ``(y0, y1, x0, x1)`` shown by the samples of a plate (before crop, pad, turn and zoom):
        its tissue plus a margin (for a volume, that of the plates an oblique cut reaches)."""
        return self._views[self._check_index(plate_index)].box

    def tissue_centre(self, plate_index: int = 0) -> tuple[float, float]:
        """Native ``(y, x)`` about which sections of a plate tilt and turn: its tissue box's centre."""
        return self._views[self._check_index(plate_index)].centre

    def sample(self, plate_index: int, *, seed=None) -> np.ndarray:
        """One synthetic float32 2D section in [0, 1] whose true plate is ``plate_index``.

        ``seed``: draw from a generator of this seed instead of the synthesiser's own sequence.
        """
        return self._draw(plate_index, seed, truth=False).image

    def sample_with_truth(self, plate_index: int, *, seed=None, labels: bool = True) -> SyntheticSection:
        """As :meth:`sample` (the same draws for the same seed), with atlas coordinates and labels
        (``labels=False``: coordinates only, the labels left ``None`` unless a restain needed them)."""
        return self._draw(plate_index, seed, truth=True, want_labels=labels)

    def batch(self, plate_indices) -> list[np.ndarray]:
        """One :meth:`sample` per plate index."""
        return [self.sample(int(i)) for i in plate_indices]

    # -- internals -----------------------------------------------------------------------------
    def _frame(self, plate_index) -> _Frame:
        idx = self._check_index(plate_index)
        return self._frames[0] if self.is_volume else self._frames[idx]

    def _check_index(self, plate_index) -> int:
        try:
            idx = check_int("plate_index", plate_index)
        except InputError as exc:
            raise InputError(f"plate_index must be a whole number, got {plate_index!r}.") from exc
        if not 0 <= idx < self.plates.n:
            raise InputError(
                f"plate_index {idx} is out of range: the atlas has {self.plates.n} plates "
                f"(0-{self.plates.n - 1})."
            )
        return idx

    def _draw(self, plate_index, seed, truth: bool, want_labels: bool = True) -> SyntheticSection:
        idx = self._check_index(plate_index)
        rng = self._rng if seed is None else np.random.default_rng(seed)
        cfg = self.config
        fr, view = self._frame(idx), self._views[idx]
        params: dict = {}
        # output canvas: the plate's view with random crop (negative) or pad (positive) per side
        h0, w0 = view.shape
        sides = rng.uniform(-cfg.crop_pad, cfg.crop_pad, 4) if cfg.crop_pad > 0 else np.zeros(4)
        top, bottom = round(sides[0] * h0), round(sides[1] * h0)
        left, right = round(sides[2] * w0), round(sides[3] * w0)
        h, w = max(8, h0 + top + bottom), max(8, w0 + left + right)
        theta = rng.uniform(-cfg.rotation, cfg.rotation) if cfg.rotation > 0 else 0.0
        zoom = rng.uniform(*cfg.scale) if cfg.scale[1] > cfg.scale[0] else cfg.scale[0]
        params.update(crop_pad=sides.tolist(), rotation=theta, scale=zoom)
        # output pixel -> canvas pixel: about the tissue centre, rotate by theta, zoom
        rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
        cy, cx = view.to_canvas(*view.centre)
        cos, sin = math.cos(math.radians(theta)) / zoom, math.sin(math.radians(theta)) / zoom
        dy, dx = rr - top - cy, cc - left - cx
        if cfg.squeeze > 0:  # the section is compressed along a random direction: the frame stretched
            q, phi = 1 - rng.uniform(0, cfg.squeeze), rng.uniform(0, np.pi)
            along = (dy * math.cos(phi) + dx * math.sin(phi)) * (1 / q - 1)
            dy, dx = dy + along * math.cos(phi), dx + along * math.sin(phi)
            params["squeeze"] = float(1 - q)
        fy, fx = cy + cos * dy - sin * dx, cx + sin * dy + cos * dx
        if cfg.elastic > 0:  # smooth stretching of the tissue
            amp = rng.uniform(0, cfg.elastic) * max(h0, w0)
            fy = fy + amp * _smooth_field(rng, (h, w), 4)
            fx = fx + amp * _smooth_field(rng, (h, w), 4)
            params["elastic"] = float(amp)
        if cfg.flip > 0:  # mounted face down: the section mirrored left to right
            params["flip"] = bool(rng.random() < cfg.flip)
            if params["flip"]:
                fy, fx = np.ascontiguousarray(fy[:, ::-1]), np.ascontiguousarray(fx[:, ::-1])
        ny, nx = view.to_native(fy, fx)  # native in-plane coordinates
        if self.is_volume:
            coords = self._oblique(idx, view.centre, ny, nx, rng, params)
            # tissue from a coarse look (every COARSE-th pixel) places the damage and the plane
            coarse = self._resample(fr, coords[:, ::COARSE, ::COARSE])
            coarse = (coarse < fr.threshold) if fr.bright else (coarse > fr.threshold)
            near = [
                np.minimum(np.round(np.arange(n) / COARSE).astype(int), m - 1)
                for n, m in zip((h, w), coarse.shape)
            ]
            tissue = coarse[np.ix_(*near)]
            keep, folds = self._damage(tissue, rng, params)
            kept = coarse & (keep[::COARSE, ::COARSE] > 0.5)
            self._centre_on_plate(idx, coords, kept, params)
            image = self._resample(fr, coords)
        else:  # a plate's canvas is its work frame
            image, coords = self._flat(idx, fr, fy, fx, ny, nx, rng, params)
            tissue = (image < fr.threshold) if fr.bright else (image > fr.threshold)
            keep, folds = self._damage(tissue, rng, params)
        restain = cfg.restain > 0 and rng.random() < cfg.restain
        need = (truth and want_labels) or restain
        labels = self._labels_at(coords) if need and self.plates.has_labels else None
        if restain:
            image = _restain(image, labels, fr, rng, params)
        if cfg.partition > 0 and rng.random() < cfg.partition:  # no draw when off: the views as before
            image = _partition_stain(image, fr, rng, params)
        image = self._apply_damage(image, keep, folds, fr.background)
        image = self._intensity(image, fr, rng, params)
        return SyntheticSection(
            image=np.ascontiguousarray(image, dtype=np.float32),
            plate=idx,
            coords=coords if truth else np.empty((3, 0, 0), np.float32),
            labels=labels if truth else None,
            params=params,
        )

    @staticmethod
    def _centre_on_plate(idx, coords, kept, params) -> None:
        """Move the cutting plane (``coords``, in place) along the plate axis so that the mean plate of
        the ``kept`` tissue (on the coarse grid) is ``idx`` plus the drawn offset: the truth is the
        plate at the centre of what is left."""
        shift = 0.0
        if kept.any():
            shift = idx + params["offset"] - float(coords[0, ::COARSE, ::COARSE][kept].mean())
        if abs(shift) > 0.01:
            coords[0] += shift
        else:
            shift = 0.0
        params["plane"] = idx + params["offset"] + shift

    @staticmethod
    def _resample(fr: _Frame, coords) -> np.ndarray:
        """The work volume at native atlas coordinates ``(3, h, w)`` (linear, background outside)."""
        wy, wx = fr.to_work(coords[1], coords[2])
        return ndi.map_coordinates(
            fr.data, np.stack([coords[0], wy, wx]), order=1, mode="constant", cval=fr.background
        )

    def _oblique(self, idx, pivot, ny, nx, rng, params) -> np.ndarray:
        """Atlas coordinates ``(3, h, w)`` of an oblique plane through plate ``idx`` at ``pivot``."""
        cfg = self.config
        pitch, yaw = rng.uniform(-cfg.max_tilt, cfg.max_tilt, 2) if cfg.max_tilt > 0 else (0.0, 0.0)
        dz = rng.uniform(-cfg.offset, cfg.offset) if cfg.offset > 0 else 0.0
        params.update(pitch=float(pitch), yaw=float(yaw), offset=float(dz))
        e_row, e_col = _plane_vectors(pitch, yaw)
        py, px = pivot
        u, v = ny - py, nx - px  # in-plane offsets from the pivot, native voxels
        z = idx + dz + (e_row[0] * u + e_col[0] * v) / self.plate_spacing
        if cfg.depth_warp > 0:  # another brain: its structures a little earlier or later in places
            amp = rng.uniform(0, cfg.depth_warp) * max(self._frames[0].extent) / self.plate_spacing
            z = z + amp * _smooth_field(rng, z.shape, 3)
            params["depth_warp"] = float(amp)
        y = py + e_row[1] * u + e_col[1] * v
        x = px + e_row[2] * u + e_col[2] * v
        return np.stack([z, y, x]).astype(np.float32)

    def _flat(self, idx, fr: _Frame, fy, fx, ny, nx, rng, params):
        cfg = self.config
        image = cv2.remap(
            fr.data, fx, fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fr.background
        )
        params["blend"] = 0.0
        if cfg.blend > 0 and self.plates.n > 1:
            j = idx + (1 if idx == 0 or (idx < self.plates.n - 1 and rng.random() < 0.5) else -1)
            weight = rng.uniform(0, cfg.blend)
            other = self._frames[j]
            # the neighbour's tissue box is mapped onto this plate's (its centre and extent)
            oy = other.centre[0] + (ny - fr.centre[0]) * other.extent[0] / fr.extent[0]
            ox = other.centre[1] + (nx - fr.centre[1]) * other.extent[1] / fr.extent[1]
            wy, wx = other.to_work(oy, ox)
            neighbour = cv2.remap(
                other.data,
                wx,
                wy,
                cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=other.background,
            )
            image = (1 - weight) * image + weight * neighbour
            params.update(blend=float(weight), blend_plate=int(j))
        coords = np.stack([np.full_like(ny, idx), ny, nx]).astype(np.float32)
        return image, coords

    def _labels_at(self, coords: np.ndarray) -> np.ndarray:
        if self.is_volume:
            if self._label_volume is None:
                self._label_volume = np.stack([self.plates.labels(i) for i in range(self.plates.n)])
            return ndi.map_coordinates(self._label_volume, np.round(coords), order=0, mode="constant", cval=0)
        lab = self.plates.labels(int(round(float(coords[0].flat[0]))))
        return ndi.map_coordinates(lab, np.round(coords[1:]), order=0, mode="constant", cval=0)

    # -- damage: partial sections, tears, holes ------------------------------------------------
    def _damage(self, tissue, rng, params) -> tuple[np.ndarray, np.ndarray | None]:
        """(keep, folds): 1 where tissue stays (0 in cuts, holes and cracks), 1 on folds (or None)."""
        cfg = self.config
        keep = np.ones(tissue.shape, np.float32)
        folds = None
        params["partial"] = None
        if cfg.partial > 0 and rng.random() < cfg.partial and tissue.any():
            mode = rng.choice(["top", "bottom", "left", "right", "hemisphere", "corner", "edges"])
            params["partial"] = str(mode)
            keep *= _partial_keep(mode, tissue, rng)
        if cfg.holes > 0 and rng.random() < cfg.holes and tissue.any():
            params["holes"] = int(rng.integers(1, 5))
            keep *= _holes_keep(params["holes"], tissue, rng)
        if cfg.tears > 0 and rng.random() < cfg.tears and tissue.any():
            params["tears"] = int(rng.integers(1, 4))
            cracks, folds = _tears(params["tears"], tissue, rng)
            keep *= 1 - cracks
        return keep, folds

    @staticmethod
    def _apply_damage(image, keep, folds, background: float) -> np.ndarray:
        if folds is not None:
            image = image + folds * (image - background) * 0.6
        if keep.min() < 1:
            keep = cv2.GaussianBlur(keep, (0, 0), 0.7)
            image = image * keep + background * (1 - keep)
        return image

    # -- intensity: another stain, contrast, gamma, polarity, illumination, blur, pepper, noise --
    def _intensity(self, image, fr: _Frame, rng, params):
        cfg = self.config
        remap = cfg.modality > 0 and rng.random() < cfg.modality
        invert = cfg.invert > 0 and rng.random() < cfg.invert
        contrast = rng.uniform(*cfg.contrast) if cfg.contrast != (1.0, 1.0) else 1.0
        gamma = rng.uniform(*cfg.gamma) if cfg.gamma != (1.0, 1.0) else 1.0
        params.update(modality=remap, invert=invert, contrast=contrast, gamma=gamma)
        if remap or invert or contrast != 1.0 or gamma != 1.0 or cfg.illumination > 0:
            s = _signal(image, fr)
            if remap:  # another stain: a random non-monotonic curve that keeps the background at 0
                knots = np.linspace(0, 1, 6)
                values = np.concatenate([[0.0], rng.uniform(0.15, 1.0, 5)])
                s = np.interp(s, knots, values).astype(np.float32)
            if gamma != 1.0:
                s = s**gamma
            if contrast != 1.0:
                mean = float(s[s > 0.05].mean()) if (s > 0.05).any() else 0.5
                s = np.clip(mean + (s - mean) * contrast, 0, 1) * (s > 0)
            if cfg.illumination > 0:
                amp = rng.uniform(0, cfg.illumination)
                s = s * (1 + amp * _smooth_field(rng, s.shape, 3))
                params["illumination"] = float(amp)
            bright = fr.bright != invert  # output polarity
            if bright:
                bg = rng.uniform(0.8, 1.0) if (invert or remap) else fr.background
                image = bg - s * bg * (rng.uniform(0.6, 1.0) if invert else 1.0)
            else:
                bg = rng.uniform(0.0, 0.15) if (invert or remap) else fr.background
                image = bg + s * (1 - bg) * (rng.uniform(0.6, 1.0) if invert else 1.0)
        if cfg.blur > 0:
            sigma = rng.uniform(0, cfg.blur)
            if sigma > 0.2:
                image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
        if cfg.pepper > 0:
            image = _pepper(image, cfg.pepper, rng)
        if cfg.noise > 0:
            image = image + rng.normal(0, rng.uniform(0, cfg.noise), image.shape).astype(np.float32)
        return np.clip(image, 0, 1)


def _signal(image: np.ndarray, fr: _Frame) -> np.ndarray:
    """Tissue signal of ``image``: 0 on the background, up to 1 on the most stained tissue."""
    span = fr.background if fr.bright else 1.0 - fr.background
    s = ((fr.background - image) if fr.bright else (image - fr.background)) / max(span, 1e-3)
    return np.clip(s, 0, 1).astype(np.float32, copy=False)


def _from_signal(signal: np.ndarray, fr: _Frame) -> np.ndarray:
    """The image of a tissue ``signal`` in the frame's polarity (the inverse of :func:`_signal`)."""
    span = fr.background if fr.bright else 1.0 - fr.background
    return fr.background - signal * span if fr.bright else fr.background + signal * span


def _restain(image: np.ndarray, labels: np.ndarray | None, fr: _Frame, rng, params: dict) -> np.ndarray:
    """``image`` stained anew, in the frame's polarity: the atlas's texture replaced.

    The tissue signal is smoothed over 1 to 2 atlas pixels (inside the tissue only, so the outline
    stays), so the structure stays and the atlas's fine texture goes; with ``labels`` each region
    (value > 0) is then scaled by a random gain of its own (log-normal, :data:`RESTAIN_GAIN`): another
    brain, another staining, regions a little lighter or darker relative to each other. Then a
    fresh random multiplicative texture.
    """
    s = _signal(image, fr)
    tissue = (s > 0.05).astype(np.float32)
    sigma = rng.uniform(1.0, 2.0) * max(1.0, fr.sy, fr.sx)
    smooth = cv2.GaussianBlur(s * tissue, (0, 0), sigma)
    new = tissue * smooth / np.maximum(cv2.GaussianBlur(tissue, (0, 0), sigma), 1e-3)
    params["restain"] = "smooth"
    if labels is not None:
        values, inverse = np.unique(labels, return_inverse=True)
        gains = np.exp(rng.normal(0.0, RESTAIN_GAIN, len(values))).astype(np.float32)
        gains[values == 0] = 1.0
        gain = cv2.GaussianBlur(gains[inverse.reshape(labels.shape)], (0, 0), 0.7)
        new = new * gain
        params["restain"] = "regions"
    texture = cv2.GaussianBlur(rng.standard_normal(s.shape).astype(np.float32), (0, 0), rng.uniform(0.6, 1.5))
    texture /= max(float(texture.std()), 1e-6)
    new = np.clip(new * (1 + rng.uniform(0.1, 0.4) * texture), 0, 1)
    return _from_signal(new, fr)


def _partition_stain(image: np.ndarray, fr: _Frame, rng, params: dict) -> np.ndarray:
    """``image`` with a share ``w`` (:data:`PARTITION_SHARE`) of its tissue signal replaced by the
    levels of another stain's own compartments, in the frame's polarity: 4-8 level sets of a smooth
    random field (3-6 cells per side) over the view, each with a random level, so their boundaries
    lie where the atlas has none (``params["partition"]``: ``w``)."""
    s = _signal(image, fr)
    tissue = s > 0.05
    if not tissue.any():
        return image
    field = _smooth_field(rng, s.shape, int(rng.integers(3, 7)))
    count = int(rng.integers(4, 9))
    edges = np.quantile(field[tissue], np.linspace(0, 1, count + 1)[1:-1])
    levels = rng.uniform(0.1, 1.0, count).astype(np.float32)
    cells = cv2.GaussianBlur(levels[np.digitize(field, edges)], (0, 0), 0.7)
    w = float(rng.uniform(*PARTITION_SHARE))
    params["partition"] = w
    new = np.where(tissue, (1 - w) * s + w * cells, 0.0).astype(np.float32)
    return _from_signal(new, fr)


def _partial_keep(mode: str, tissue: np.ndarray, rng) -> np.ndarray:
    """1 where a partial section keeps tissue, 0 where ``mode`` cuts it away (ragged edges)."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    if mode == "edges":  # nibbled borders: tissue near its outline is lost, by a varying depth
        dist = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 3)
        scale = rng.uniform(0.04, 0.1) * max(np.ptp(ys), np.ptp(xs))
        depth = scale * (0.6 + 0.4 * _smooth_field(rng, (h, w), 6))
        return (dist > np.maximum(depth, 0)).astype(np.float32) + (~tissue)
    keep = np.ones((h, w), np.float32)
    cuts = {
        "top": [180.0],
        "bottom": [0.0],
        "left": [270.0],
        "right": [90.0],
        "hemisphere": [90.0 + 180.0 * rng.integers(0, 2)],
    }
    angles = cuts.get(mode, [])
    if mode == "corner":
        a = 45.0 + 90.0 * rng.integers(0, 4)
        angles = [a]
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = ys.mean(), xs.mean()
    for base in angles:
        ang = math.radians(base + rng.uniform(-20, 20))
        dy, dx = math.cos(ang), math.sin(ang)  # direction pointing to the side that is cut away
        proj = (rr - cy) * dy + (cc - cx) * dx
        along = (rr - cy) * -dx + (cc - cx) * dy
        p_t = proj[tissue]
        lo, hi = float(p_t.min()), float(p_t.max())
        if mode == "hemisphere":
            cut = rng.uniform(-0.08, 0.08) * (hi - lo)  # near the midline through the tissue centre
        else:  # a corner holds less tissue than a side: cut deeper
            cut = hi - rng.uniform(*((0.25, 0.5) if mode == "corner" else (0.15, 0.45))) * (hi - lo)
        a_t = along[tissue]
        t = (along - a_t.min()) / max(float(np.ptp(a_t)), 1.0)
        edge = cut + _ragged(rng, t, 0.04 * (hi - lo))
        keep *= (proj < edge).astype(np.float32)
    return keep


def _holes_keep(count: int, tissue: np.ndarray, rng) -> np.ndarray:
    """0 inside ``count`` ragged holes centred on tissue pixels."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(count):
        k = int(rng.integers(len(ys)))
        axes = tuple(max(1, round(rng.uniform(0.02, 0.08) * max(h, w))) for _ in range(2))
        cv2.ellipse(mask, (int(xs[k]), int(ys[k])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    ragged = mask.astype(np.float32) * (1 + 0.5 * _smooth_field(rng, (h, w), 12)) > 0.75
    return 1.0 - ragged.astype(np.float32)


def _tears(count: int, tissue: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """(cracks, folds): thin random curves across the tissue; cracks show background, folds darker tissue."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue)
    cracks = np.zeros((h, w), np.uint8)
    folds = np.zeros((h, w), np.uint8)
    for _ in range(count):
        k = int(rng.integers(len(ys)))
        start = np.array([xs[k], ys[k]], np.float64)
        heading = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 0.9) * max(h, w)
        steps = 24
        turn = np.cumsum(rng.normal(0, 0.15, steps))
        pts = [start]
        for s in range(steps):
            ang = heading + turn[s]
            pts.append(pts[-1] + length / steps * np.array([math.cos(ang), math.sin(ang)]))
        half = len(pts) // 2  # centre the curve on the chosen tissue pixel
        pts = np.array(pts) - (pts[half] - start)
        target = cracks if rng.random() < 0.7 else folds
        thickness = int(rng.integers(1, 3)) * max(1, round(max(h, w) / 160))
        cv2.polylines(target, [np.round(pts).astype(np.int32)], False, 1, thickness)
    return cracks.astype(np.float32) * tissue, folds.astype(np.float32) * tissue


def _pepper(image: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Coarse pepper: a fraction of cells (1 px to 1/12 of the image) set to dark random values."""
    h, w = image.shape
    cell = max(1, round(math.exp(rng.uniform(0, math.log(max(2, min(h, w) // 12))))))
    grid = (max(1, -(-h // cell)), max(1, -(-w // cell)))
    mask = rng.random(grid) < fraction
    mask = np.repeat(np.repeat(mask, cell, axis=0), cell, axis=1)[:h, :w]
    dark = 0.5 * rng.random((h, w)).astype(np.float32) ** 2
    return np.where(mask, dark, image)
