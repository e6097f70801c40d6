"""Preprocessing of atlas plates and brain sections for the embedding network.

As the paper (grey, crop to tissue, CLAHE, pad to a square, resize) and beyond it: the tissue is
found with Otsu whatever the polarity of the background (dark for fluorescence and atlas plates,
bright for brightfield), brightfield images are inverted so that every input shows bright tissue on
a black background, and inputs of any size are downsampled first (never refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from napari_nephi.core.errors import InputError
from napari_nephi.core.inputs import looks_rgb, to_grayscale
from napari_nephi.core.options import check_int

#: Percentiles mapped to 0 and 1 by :func:`to_grey`.
PERCENTILES = (0.5, 99.5)
#: Images are downsampled (area average) to at most this many times the network input before work.
WORK_FACTOR = 8
#: The tissue is segmented on a copy at most this many times the network input (and 256 px) long.
SEGMENT_FACTOR = 3
#: Hysteresis: pixels above background + HYSTERESIS * (Otsu - background) joined to pixels above
#: Otsu are tissue (faint tissue next to clear tissue is kept).
HYSTERESIS = 0.5
#: Connected tissue pieces smaller than this fraction of the largest piece are dropped as debris.
MIN_PIECE_FRACTION = 0.05
#: Margin around the tissue bounding box, as a fraction of its longer side.
MARGIN = 0.04
#: Radius of the closing of the tissue mask, as a fraction of the longer side of the tissue box.
CLOSING = 0.03
#: CLAHE clip limit, as skimage.exposure.equalize_adapthist's (a fraction of a tile's pixels).
CLAHE_CLIP = 0.03
#: Fewest tissue pixels (at the working size) an input must show: a speck of dust is not a section.
MIN_TISSUE_PIXELS = 16
#: Lazy inputs (dask, zarr) are read in strips of rows of about this many bytes (as float32).
STRIP_BYTES = 64 << 20
_MIN_SIDE = 8
_PERCENTILE_SAMPLES = 1 << 18


def _check_layout(shape: tuple, dtype: np.dtype, name: str) -> None:
    """:class:`InputError` unless ``shape``/``dtype`` are a numeric 2D or RGB(A) image of 8 px or more."""
    if dtype.kind not in "biuf":
        raise InputError(f"The {name} must hold real numbers, got dtype {dtype}.")
    if int(np.prod(shape)) == 0:
        raise InputError(f"The {name} is empty (shape {shape}); pass a 2D image (y, x) or RGB (y, x, 3).")
    rgb = len(shape) == 3 and shape[-1] in (3, 4)
    if len(shape) != 2 and not rgb:
        raise InputError(
            f"The {name} must be a 2D image (y, x) or RGB(A) with channels last (y, x, 3|4), got shape "
            f"{shape}. For a volume, pass its plates one by one."
        )
    if min(shape[:2]) < _MIN_SIDE:
        raise InputError(
            f"The {name} {shape} is too small: both sides need {_MIN_SIDE} pixels or more. "
            "An RGB image must have its channels last (y, x, 3)."
        )


def _as_array(image, name: str) -> np.ndarray:
    """``image`` as a numeric 2D or RGB(A) array (a view when possible), or :class:`InputError`."""
    if image is None:
        raise InputError(f"No {name} given.")
    arr = np.asarray(image)
    _check_layout(arr.shape, arr.dtype, name)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"The {name} contains NaN or infinite values; fill or crop them before the lookup.")
    return arr


def _lazy_layout(image) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of an array-like that is not in memory (dask, zarr, h5py ...), else None."""
    if isinstance(image, np.ndarray) or not all(hasattr(image, a) for a in ("shape", "dtype", "__getitem__")):
        return None
    try:
        return tuple(int(n) for n in image.shape), np.dtype(image.dtype)
    except TypeError:  # e.g. a torch tensor: its dtype is not numpy's
        return None


def _read_downsampled(image, shape: tuple, longest: int) -> np.ndarray:
    """Block means of a lazy array-like, read in strips of rows (about ``STRIP_BYTES`` as float32 at
    a time), so an image larger than memory is never loaded whole."""
    h, w = shape[:2]
    k = -(-max(h, w) // longest)
    ho, wo = h // k, w // k
    rest = shape[2:]
    itemsize = np.dtype(np.float32).itemsize * int(np.prod(rest, dtype=np.int64))
    blocks = max(1, STRIP_BYTES // max(1, k * k * wo * itemsize))  # output rows per read
    out = np.empty((ho, wo, *rest), dtype=np.float32)
    for r in range(0, ho, blocks):
        n = min(blocks, ho - r)
        strip = np.asarray(image[r * k : (r + n) * k, : wo * k], dtype=np.float32)
        out[r : r + n] = strip.reshape(n, k, wo, k, *rest).mean(axis=(1, 3))
    return out


def to_grey(image, name: str = "image") -> np.ndarray:
    """A float32 2D copy of ``image`` in [0, 1]: luminance of RGB(A), 0.5-99.5 percentiles to 0 and 1.

    Accepts (y, x) or (y, x, 3|4) of any numeric dtype and range. Raises :class:`InputError` for
    NaN or infinite values, a constant image, an empty or wrongly shaped array.
    """
    arr = _as_array(image, name)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.float32)
    grey = to_grayscale(arr) if arr.ndim == 3 else np.array(arr, dtype=np.float32, copy=True)
    sub = grey.ravel()[:: max(1, grey.size // _PERCENTILE_SAMPLES)]
    lo, hi = (float(v) for v in np.percentile(sub, PERCENTILES))
    if hi <= lo:  # tissue covers fewer pixels than the top percentile: use the full range
        lo, hi = float(grey.min()), float(grey.max())
    if hi <= lo:
        raise InputError(f"The {name} is constant (every pixel is {lo:g}); it shows no tissue.")
    grey -= np.float32(lo)
    grey /= np.float32(hi - lo)
    return np.clip(grey, 0.0, 1.0, out=grey)


def _border(grey: np.ndarray) -> np.ndarray:
    """Pixels of the outer ring (about 2 % of the shorter side wide, at least one pixel)."""
    w = max(1, min(grey.shape) // 50)
    return np.concatenate(
        [grey[:w].ravel(), grey[-w:].ravel(), grey[w:-w, :w].ravel(), grey[w:-w, -w:].ravel()]
    )


def _clean(mask: np.ndarray) -> np.ndarray:
    """``mask`` without pieces smaller than ``MIN_PIECE_FRACTION`` of its largest, holes filled."""
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= MIN_PIECE_FRACTION * sizes.max()) + 1
        mask = np.isin(labels, keep)
    return _fill_holes(mask)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the border filled (4-connected),
    as ``scipy.ndimage.binary_fill_holes`` but in one labelling pass."""
    labels, n = ndi.label(~mask)
    if n == 0:
        return mask
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = np.ones(n + 1, dtype=bool)
    inside[outside] = False
    inside[0] = True  # label 0: the mask itself
    return inside[labels]


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological closing by a disc of ``radius`` pixels, then holes filled: tears and narrow
    gaps that join dark tissue to the background are bridged."""
    r = int(round(radius))
    if r < 1:
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    padded = np.pad(mask.astype(np.uint8), r + 1)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disc)[r + 1 : -r - 1, r + 1 : -r - 1] > 0
    return _fill_holes(closed | mask)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the bounding box of a non-empty mask, ends exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _hysteresis(smooth: np.ndarray, low: float, high: float) -> np.ndarray:
    """Pixels above ``high``, and those above ``low`` connected to them (8-connected)."""
    weak = smooth > low
    labels, n = ndi.label(weak, structure=np.ones((3, 3)))
    strong = np.zeros(n + 1, dtype=bool)
    strong[np.unique(labels[smooth > high])] = True
    strong[0] = False
    return strong[labels]


def _segment(grey: np.ndarray) -> tuple[np.ndarray, bool, tuple[float, float]]:
    """(tissue mask, whether the background is bright, (low, high) thresholds) of a 2D grey image.

    See :func:`tissue_mask`. The thresholds are in the units of ``grey`` and for the tissue-bright
    polarity (``1 - grey`` when the background is bright, whose thresholds are ``1 - low/high``).
    """
    g = np.asarray(grey, dtype=np.float32)
    if g.ndim != 2:
        raise InputError(f"A tissue mask needs a 2D grey image, got shape {g.shape}.")
    smooth = ndi.gaussian_filter(g, sigma=max(0.5, min(g.shape) / 256))
    lo, hi = float(smooth.min()), float(smooth.max())
    if hi <= lo:
        return np.zeros(g.shape, dtype=bool), False, (hi, hi)
    # Otsu on 256 levels of the range: an integer histogram is several times faster than a float one
    levels = np.rint((smooth - lo) * (255 / (hi - lo))).astype(np.uint8)
    t = lo + (float(threshold_otsu(levels)) + 0.5) * (hi - lo) / 255
    border = _border(smooth)
    bright_bg = bool(np.mean(border > t) > 0.5)
    if bright_bg:
        smooth, t, border = 1.0 - smooth, 1.0 - t, 1.0 - border
    # hysteresis: faint tissue (white matter, a dark nucleus) joined to clear tissue is tissue too,
    # even where a cut edge or a tear opens it to the background
    low = float(np.median(border)) + HYSTERESIS * (t - float(np.median(border)))
    mask = _clean(_hysteresis(smooth, min(low, t), t))
    return mask, bright_bg, (min(low, t), t)


def background_is_bright(grey: np.ndarray) -> bool:
    """Whether the background of ``grey`` is bright (brightfield): most border pixels above Otsu."""
    return _segment(grey)[1]


def tissue_mask(grey: np.ndarray) -> np.ndarray:
    """Boolean foreground (tissue) of a grey image with a dark or a bright background.

    The polarity comes from the border (most border pixels above the threshold: bright background).
    On a lightly smoothed copy: pixels beyond Otsu's threshold, and those beyond the level halfway
    (``HYSTERESIS``) between the background (border median) and it that are joined to them; pieces
    smaller than ``MIN_PIECE_FRACTION`` of the largest dropped, holes filled. The result may be
    empty (a constant image); the caller decides.
    """
    return _segment(grey)[0]


def _downsample(arr: np.ndarray, longest: int) -> np.ndarray:
    """Block-averaged copy of a (y, x) or (y, x, c) array whose longer side is at most ``longest``.

    An integer factor (the last partial block of rows and columns dropped), so OpenCV's fast
    area path runs and every output pixel is a plain mean.
    """
    h, w = arr.shape[:2]
    k = -(-max(h, w) // longest)
    if k <= 1:
        return arr
    if arr.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        arr = arr.astype(np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    arr = np.ascontiguousarray(arr[: h // k * k, : w // k * k])
    return cv2.resize(arr, (w // k, h // k), interpolation=cv2.INTER_AREA)


def downsample(image, longest: int, name: str = "image") -> np.ndarray:
    """``image`` (2D or RGB(A), in memory or lazy: dask, zarr, h5py) block-averaged by the smallest
    whole factor that brings its longer side to at most ``longest``; returned as is when it fits.

    A lazy array is read in strips, never whole, so sections larger than memory can be looked up
    and registered. Raises :class:`InputError` for what :func:`to_grey` refuses (shape, dtype, NaN).
    """
    longest = check_int("longest", longest, _MIN_SIDE)
    lazy = _lazy_layout(image)
    if lazy is not None and max(lazy[0][:2], default=0) > longest:
        _check_layout(*lazy, name)
        image = _read_downsampled(image, lazy[0], longest)
    arr = _as_array(image, name)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    return _downsample(arr, longest)


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``shape`` (y, x): area average when shrinking, bilinear when enlarging."""
    if image.shape == shape:
        return image
    shrink = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    mode = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (shape[1], shape[0]), interpolation=mode)


def _check_size(size) -> int:
    return check_int("size", size, 16, 2048)


def clahe(image: np.ndarray, clip_limit: float = CLAHE_CLIP) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] image, float32 [0, 1].

    OpenCV's CLAHE with the settings of ``skimage.exposure.equalize_adapthist(image, clip_limit)``
    (8 x 8 tiles, 256 bins, the clip limit as a fraction of a tile's pixels), 20x faster than it.
    """
    h, w = image.shape
    grid = (max(1, min(8, w // 2)), max(1, min(8, h // 2)))
    op = cv2.createCLAHE(clipLimit=clip_limit * 256, tileGridSize=grid)
    u8 = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return op.apply(u8).astype(np.float32) / np.float32(255)


def _coarse_crop(grey: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The box of ``grey`` around the tissue of ``mask`` (a smaller copy of it), one mask pixel wider
    on each side, the mask inside that box, and the box's first row and column in ``grey``."""
    y0, y1, x0, x1 = _box(mask)
    y0, y1, x0, x1 = max(0, y0 - 1), min(mask.shape[0], y1 + 1), max(0, x0 - 1), min(mask.shape[1], x1 + 1)
    fy, fx = grey.shape[0] / mask.shape[0], grey.shape[1] / mask.shape[1]
    box = (
        slice(int(y0 * fy), min(grey.shape[0], int(np.ceil(y1 * fy)))),
        slice(int(x0 * fx), min(grey.shape[1], int(np.ceil(x1 * fx)))),
    )
    return np.ascontiguousarray(grey[box]), mask[y0:y1, x0:x1], (box[0].start, box[1].start)


@dataclass(frozen=True)
class InputGeometry:
    """Where the pixels of a network input came from, as :func:`prepare_input_geometry` made it.

    Input pixel ``(r, c)`` (centre) lies at ``(scale[0] * r + offset[0], scale[1] * c + offset[1])``
    in the pixels of the image given (the crop, pad and resize are axis-aligned). ``mask``: the
    ``(size, size)`` float32 share of each input pixel that is tissue (0 on the padding).
    """

    scale: tuple[float, float]
    offset: tuple[float, float]
    mask: np.ndarray

    def source(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ys, xs)``: the source-image coordinates of the centres of a ``size`` x ``size`` input."""
        r = np.arange(size, dtype=np.float64)
        ys = self.scale[0] * r + self.offset[0]
        xs = self.scale[1] * r + self.offset[1]
        return ys, xs


def _block(k: int, start: float = 0.0) -> tuple[float, float]:
    """(scale, offset) of a block mean by ``k`` of an image from ``start``: out i <- in k*i + (k-1)/2."""
    return float(k), start + (k - 1) / 2.0


def _compose(outer: tuple[float, float], inner: tuple[float, float]) -> tuple[float, float]:
    """``outer(inner(x))`` of two maps ``x -> a * x + b``."""
    return outer[0] * inner[0], outer[0] * inner[1] + outer[1]


def _factor(shape: tuple, longest: int) -> int:
    """The whole factor of :func:`_downsample` (1 when the image fits)."""
    return max(1, -(-max(shape[:2]) // longest))


def prepare_input(image, size: int = 128, name: str = "image") -> np.ndarray:
    """A float32 (size, size) network input from a plate or section of any size, grey or RGB(A).

    Grey in [0, 1], crop to the tissue bounding box, CLAHE, brightfield inverted so tissue is
    bright, background set to 0 (outside the tissue mask closed over tears and narrow gaps, so dark
    tissue joined to the background by a tear is kept), zero-padded to a centred square with a
    small margin, resized.
    Raises :class:`InputError` when the image shows no tissue (or is NaN, constant, empty).
    Lazy arrays (dask, zarr, h5py) larger than the working size are read strip by strip and
    downsampled on the way, so a section larger than memory is not refused.
    """
    return prepare_input_geometry(image, size, name)[0]


@dataclass(frozen=True)
class TissueCrop:
    """The tissue of an image as :func:`prepare_input` crops it, before it is padded and resized.

    ``image``: float32, CLAHE applied, bright tissue, 0 outside ``mask`` (the tissue, closed over
    tears); ``k1`` / ``k2``: the whole downsampling factors of the image and of its coarse crop;
    ``start``: the coarse crop's first row and column (after ``k1``); ``first``: the tissue box's first
    row and column in the coarse crop (after ``k2``).
    """

    image: np.ndarray
    mask: np.ndarray
    k1: int
    k2: int
    start: tuple[int, int]
    first: tuple[int, int]


def tissue_crop(image, size: int = 128, name: str = "image") -> TissueCrop:
    """The cropped tissue of :func:`prepare_input` (see :class:`TissueCrop`); the same errors."""
    size = _check_size(size)
    shape = _lazy_layout(image)
    shape = shape[0] if shape is not None else np.shape(image)
    k1 = _factor(shape, WORK_FACTOR * size) if len(shape) >= 2 else 1
    grey = to_grey(downsample(image, WORK_FACTOR * size, name), name)
    # the tissue is found on a small copy (fast), then its outline refined on the finer crop
    small = _downsample(grey, max(SEGMENT_FACTOR * size, 256))
    mask, bright_bg, (low, t) = _segment(small)
    if mask.sum() < MIN_TISSUE_PIXELS:
        raise InputError(
            f"The {name} has no tissue: only {int(mask.sum())} pixels stand out from its background "
            f"(at least {MIN_TISSUE_PIXELS} at the working size {small.shape}). "
            "Pass a section or plate that shows the brain slice."
        )
    if bright_bg:
        grey = 1.0 - grey
    crop, region, start = _coarse_crop(grey, mask)
    # CLAHE's tiles are relative to the image: working at most at 2x the output size is plenty
    k2 = _factor(crop.shape, 2 * size)
    crop = np.clip(_downsample(crop, 2 * size), 0.0, 1.0)  # area sums may round past 1
    region = cv2.resize(region.astype(np.float32), crop.shape[::-1], interpolation=cv2.INTER_LINEAR)
    fine = region > 0.5
    if small.shape != grey.shape:  # the mask is coarser than the crop: refine the outline near it
        refined = _clean(_hysteresis(ndi.gaussian_filter(crop, 1.0), low, t) & (region > 0))
        if refined.sum() >= MIN_TISSUE_PIXELS:  # else a faint outline: keep the coarse mask
            fine = refined
    fine = _close(fine, CLOSING * max(fine.shape))
    y0, y1, x0, x1 = _box(fine)
    crop, crop_mask = crop[y0:y1, x0:x1], fine[y0:y1, x0:x1]
    crop = clahe(crop, CLAHE_CLIP)
    crop = np.where(crop_mask, crop, np.float32(0.0))
    return TissueCrop(crop, crop_mask, k1, k2, tuple(start), (y0, x0))


def prepare_input_geometry(image, size: int = 128, name: str = "image") -> tuple[np.ndarray, InputGeometry]:
    """:func:`prepare_input` and its :class:`InputGeometry` (input pixels -> image pixels, tissue mask)."""
    size = _check_size(size)
    return framed_input_geometry(tissue_crop(image, size, name), size)


def frame_offsets(shape: tuple[int, int], box=None, at=(0.5, 0.5)) -> tuple[int, int, int]:
    """``(side, row, column)``: the square side and the first row and column of a crop of ``shape``
    placed in a ``box`` (height, width; at least the crop's; default its own) at ``at`` (0: top or
    left, 1: bottom or right of the free room), the box centred in the square with :data:`MARGIN`."""
    h, w = shape
    bh, bw = (h, w) if box is None else (max(int(box[0]), h), max(int(box[1]), w))
    side = max(1, round(max(bh, bw) * (1 + 2 * MARGIN)))
    return side, (side - bh) // 2 + round(at[0] * (bh - h)), (side - bw) // 2 + round(at[1] * (bw - w))


def framed_input_geometry(
    tc: TissueCrop, size: int, box=None, at=(0.5, 0.5)
) -> tuple[np.ndarray, InputGeometry]:
    """The network input of a :func:`tissue_crop` placed as :func:`frame_offsets` says (default:
    :func:`prepare_input`'s centred framing) and its :class:`InputGeometry`."""
    crop, crop_mask, shape = tc.image, tc.mask, tc.image.shape
    side, oy, ox = frame_offsets(shape, box, at)
    square = np.zeros((side, side), dtype=np.float32)
    square[oy : oy + shape[0], ox : ox + shape[1]] = crop
    out = np.clip(_resize(square, (size, size)), 0.0, 1.0).astype(np.float32, copy=False)
    cover = np.zeros((side, side), dtype=np.float32)
    cover[oy : oy + shape[0], ox : ox + shape[1]] = crop_mask
    cover = np.clip(_resize(cover, (size, size)), 0.0, 1.0)
    # input pixel -> square (resize about pixel centres) -> fine crop -> coarse crop -> grey -> image
    geometry = []
    for axis, (pad, fine0) in enumerate(((oy, tc.first[0]), (ox, tc.first[1]))):
        m = (side / size, 0.5 * side / size - 0.5 - pad + fine0)
        m = _compose(_block(tc.k2, tc.start[axis]), m)
        geometry.append(_compose(_block(tc.k1), m))
    return out, InputGeometry(
        (geometry[0][0], geometry[1][0]), (geometry[0][1], geometry[1][1]), cover.astype(np.float32)
    )


def image_list(images: Sequence | np.ndarray) -> list:
    """``images`` (a list or tuple of images, or a numpy/dask/zarr stack whose first axis indexes them)
    as a list.

    Raises :class:`InputError` for no images, or a single 2D/RGB array (wrap it in a list).
    """
    if not isinstance(images, (list, tuple)) and hasattr(images, "shape") and hasattr(images, "__getitem__"):
        shape = tuple(images.shape)  # a numpy, dask or zarr stack: its first axis indexes the images
        if len(shape) == 2 or (len(shape) == 3 and looks_rgb(shape)):
            raise InputError(
                f"Several images are expected (a list, or an array (n, y, x)); got one image of shape "
                f"{shape}. Wrap it in a list."
            )
        images = [images[i] for i in range(shape[0])] if len(shape) > 0 else []
    elif not isinstance(images, (list, tuple)):
        raise InputError(f"A list of images is expected, got {type(images).__name__}.")
    if len(images) == 0:
        raise InputError("No images given: pass at least one plate or section.")
    return list(images)


def prepare_batch(images: Sequence | np.ndarray, size: int = 128) -> torch.Tensor:
    """(B, 1, size, size) float32 tensor of :func:`prepare_input` of each image.

    ``images``: a list (or tuple) of 2D/RGB images, or an array whose first axis indexes them.
    """
    images = image_list(images)
    size = _check_size(size)
    batch = np.stack([prepare_input(img, size, name=f"image {i}") for i, img in enumerate(images)])
    return torch.from_numpy(batch[:, None])
