"""Whole slides as lazy pyramids: open SVS/TIFF/OME-TIFF (and OpenSlide formats), wrap arrays, pick levels.

A :class:`Slide` holds its levels largest first, each ``(y, x)`` or ``(y, x, C)`` (RGB samples last)
and lazy (dask, or an array-like read on demand); nothing reads level 0 whole. Level ``k`` pixel
``i`` is centred on level-0 pixel ``(i + 0.5) * f - 0.5`` where ``f`` is the level's downsample
factor (:func:`downsample_factors`: the whole factor of a 2x2-mean pyramid, 2967 -> 1484 -> 742
being halvings, else level-0 size / level size per axis), the convention the lazy warp reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from ..core.errors import InputError, UnsupportedFileError
from ..core.grid import check_spacing
from ..core.lazy_warp import level_factors
from ._util import PathLike, existing_file, full_suffix, is_tiff, reading, stem
from .tiff import _downsample2, read_tiff

__all__ = [
    "OPENSLIDE_SUFFIXES",
    "Slide",
    "as_slide",
    "downsample_factors",
    "level_for_spacing",
    "open_slide",
    "read_region",
    "um_per_unit",
]

#: suffixes read through the optional ``openslide`` extra
OPENSLIDE_SUFFIXES = (".mrxs", ".ndpi", ".scn", ".vms", ".vmu", ".bif", ".svslide")
#: coarser levels are added lazily until the longer side is at most this many pixels
SMALLEST_LEVEL = 512
#: chunk side of the dask arrays made here
CHUNK = 1024
#: default pixel budget of :func:`read_region` (64 MB of RGB uint8)
MAX_PIXELS = 1 << 24
_UNIT_TO_UM = {"um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0}
_UNIT_TO_UM.update(
    {"micrometer": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "inch": 25400.0, "in": 25400.0}
)
_EXTRA_HINT = 'pip install "napari-nephi[openslide]"'


@dataclass
class Slide:
    """A whole slide: ``levels`` (lazy arrays, level 0 first), ``spacing`` (level-0 um/px, (y, x), or
    ``None`` when unknown), ``rgb`` (samples last are RGB) and ``name``."""

    levels: list[Any]
    spacing: tuple[float, float] | None = None
    rgb: bool = False
    name: str = "slide"

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of level 0."""
        return tuple(int(n) for n in self.levels[0].shape)

    def level_spacing(self, level: int) -> tuple[float, float] | None:
        """um/px (y, x) of ``level``, or ``None`` when the slide's pixel size is unknown."""
        if self.spacing is None:
            return None
        f = downsample_factors(self.levels, level)
        return (self.spacing[0] * f[0], self.spacing[1] * f[1])


def downsample_factors(levels: Sequence[Any], level: int) -> tuple[float, float]:
    """Level-0 pixels per pixel of ``levels[level]`` along (y, x), as the lazy warp reads them.

    A level whose size is a rounding of level 0 by a whole factor (2967 -> 1484 or 1483) has that
    factor exactly; other sizes give the plain ratio (:func:`napari_nephi.core.lazy_warp.level_factors`).
    """
    return level_factors([levels[0], levels[level]])[1]


def _lazy(array: Any, name: str) -> da.Array:
    if isinstance(array, da.Array):
        return array
    chunks = (CHUNK, CHUNK) + tuple(array.shape[2:])
    return da.from_array(array, chunks=chunks, name=f"{name}-{tokenize(id(array), array.shape)}")


def _half(level: da.Array) -> da.Array:
    """A lazy 2x2-mean halving (odd edges repeated, as the TIFF pyramid writer does), chunks >= 128."""
    even = level.rechunk({a: 2 * math.ceil(max(level.chunks[a][0], 256) / 2) for a in (0, 1)})
    chunks = tuple(tuple(math.ceil(c / 2) for c in axis) for axis in even.chunks[:2]) + even.chunks[2:]
    return even.map_blocks(_downsample2, (0, 1), "mean", chunks=chunks, dtype=level.dtype)


def _check_level(level: Any, what: str) -> None:
    shape = tuple(getattr(level, "shape", ()))
    if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[2] <= 4):
        raise InputError(
            f"{what} has shape {shape}; a slide must be 2D (y, x) or 2D with up to 4 samples last "
            "(y, x, 3 for RGB). Pick one plane or channel of a stack first."
        )
    if min(shape[:2]) < 1:
        raise InputError(f"{what} has shape {shape}, an empty axis; give a non-empty image.")
    if np.dtype(level.dtype).kind not in "biuf":
        raise InputError(f"{what} has dtype {level.dtype}, not numbers; cast the image first.")


def as_slide(
    data: Any, spacing: Sequence[float] | float | None = None, *, rgb: bool | None = None, name: str = "slide"
) -> Slide:
    """A :class:`Slide` from a numpy/dask array or a list of levels (napari multiscale data).

    Coarser levels are added lazily (2x2 means) until the longer side is at most 512 pixels.
    ``rgb`` defaults to "3 samples last"; RGBA drops its alpha lazily. ``spacing`` is level-0 um/px.
    """
    given = list(data) if isinstance(data, list | tuple) else [data]
    if not given:
        raise InputError("A slide needs at least one level; got an empty list.")
    for k, level in enumerate(given):
        _check_level(level, f"Slide level {k}")
    samples = {tuple(level.shape[2:]) for level in given}
    if len(samples) > 1:
        raise InputError(f"Slide levels disagree on samples per pixel: {sorted(samples)}.")
    for k in range(1, len(given)):
        if any(given[k].shape[a] > given[k - 1].shape[a] for a in (0, 1)):
            raise InputError(
                f"Slide level {k} ({given[k].shape[:2]}) is larger than level {k - 1} "
                f"({given[k - 1].shape[:2]}); give the levels largest first."
            )
    if rgb is None:
        rgb = given[0].ndim == 3 and given[0].shape[2] in (3, 4)
    levels = [_lazy(level, name) for level in given]
    if rgb and levels[0].shape[2:] == (4,):
        levels = [level[..., :3] for level in levels]
    while max(levels[-1].shape[:2]) > SMALLEST_LEVEL:
        levels.append(_half(levels[-1]))
    sp = None
    if spacing is not None:
        sp = check_spacing((spacing, spacing) if np.isscalar(spacing) else spacing, 2)
    return Slide(levels, sp, bool(rgb), name)


def um_per_unit(unit: Any) -> float | None:
    """Micrometres in one ``unit`` of a file's (or a layer's metadata) pixel size; None when the unit
    is no length ("pixel": an uncalibrated ImageJ image) or unknown."""
    return _UNIT_TO_UM.get(str(unit).strip().lower()) if unit else None


def _spacing_from_meta(meta: dict[str, Any]) -> tuple[float, float] | None:
    scale = tuple(float(s) for s in meta.get("scale", ())[-2:])
    unit = meta.get("metadata", {}).get("unit")
    if len(scale) != 2 or (unit is None and scale == (1.0, 1.0)):
        return None  # no pixel size in the file (the reader's fallback 1)
    factor = um_per_unit(unit) if unit else 1.0
    if factor is None:
        return None  # "pixel" (ImageJ, uncalibrated) or a unit we cannot convert: unknown, asked for
    return (scale[0] * factor, scale[1] * factor)


def _open_tiff(path: Path) -> Slide:
    data, meta = read_tiff(path, lazy=True)
    levels = data if isinstance(data, list) else [data]
    if "channel_axis" in meta:
        axis = meta["channel_axis"]
        levels = [da.moveaxis(level, axis, -1) for level in levels]
    if levels[0].ndim != (3 if (meta["rgb"] or "channel_axis" in meta) else 2):
        raise InputError(
            f"{path} holds an image of shape {levels[0].shape} (axes {meta['metadata']['tiff_axes']}); "
            "a slide is one 2D plane, grey or RGB. Save one plane of the stack as its own file."
        )
    return as_slide(levels, _spacing_from_meta(meta), rgb=meta["rgb"], name=meta["name"])


class _OpenSlideLevel:
    """One level of an OpenSlide image as an array ``(y, x, 3)`` uint8 (transparent pixels white)."""

    def __init__(self, handle: Any, level: int, path: Path) -> None:
        self.handle, self.level, self.path = handle, level, path
        w, h = handle.level_dimensions[level]
        self.shape, self.dtype, self.ndim = (int(h), int(w), 3), np.dtype(np.uint8), 3
        self.downsample = float(handle.level_downsamples[level])

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        ys, xs = (index + (slice(None),) * 2)[:2]
        (y0, y1, _), (x0, x1, _) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[(slice(None),) * 2 + index[2:]]
        location = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        with reading(self.path, "an OpenSlide slide"):
            rgba = np.asarray(self.handle.read_region(location, self.level, (x1 - x0, y1 - y0)))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        return rgb[(slice(None), slice(None)) + index[2:]]


def _open_openslide(path: Path) -> Slide:
    try:
        import openslide
    except ImportError as exc:
        raise UnsupportedFileError(
            f"Cannot read {path}: '{full_suffix(path)}' slides are read through OpenSlide, which is not "
            f"installed. Install the extra with: {_EXTRA_HINT} (no system library needed), or convert the "
            "slide to a pyramidal OME-TIFF."
        ) from exc
    with reading(path, "an OpenSlide slide"):
        handle = openslide.OpenSlide(str(path))
        props = handle.properties
        mpp = [props.get(openslide.PROPERTY_NAME_MPP_Y), props.get(openslide.PROPERTY_NAME_MPP_X)]
    levels = [_OpenSlideLevel(handle, k, path) for k in range(handle.level_count)]
    spacing = tuple(float(v) for v in mpp) if all(mpp) else None
    return as_slide(levels, spacing, rgb=True, name=stem(path))


def open_slide(path: PathLike) -> Slide:
    """Open a whole slide lazily: SVS, pyramidal or flat TIFF/OME-TIFF; OpenSlide formats with the extra.

    ``.mrxs``, ``.ndpi``, ``.scn``, ``.vms``, ``.bif`` ... need ``pip install "napari-nephi[openslide]"``
    (an :class:`UnsupportedFileError` says so when it is missing). Pixel size comes from the file
    (OME ``PhysicalSize``, Aperio ``MPP``, OpenSlide ``mpp``), else ``spacing`` is ``None``.
    """
    p = existing_file(path)
    if full_suffix(p) in OPENSLIDE_SUFFIXES:
        return _open_openslide(p)
    if is_tiff(p):
        return _open_tiff(p)
    raise UnsupportedFileError(
        f"Cannot open {p} as a slide: '{full_suffix(p) or 'no suffix'}' is not a slide format. "
        f"napari-nephi opens .svs, .tif, .tiff, .ome.tif(f), and with the openslide extra "
        f"{', '.join(OPENSLIDE_SUFFIXES)}."
    )


def level_for_spacing(slide: Slide, target_um: float) -> tuple[int, float]:
    """The coarsest level whose pixels are at most ``target_um`` (um/px), and its mean um/px.

    Level 0 when ``target_um`` is finer than level 0. Unknown pixel size gives an :class:`InputError`.
    """
    if slide.spacing is None:
        raise InputError(
            f"The pixel size of slide {slide.name!r} is unknown; give it (spacing in um/px, e.g. 0.25)."
        )
    if not isinstance(target_um, int | float) or not math.isfinite(target_um) or target_um <= 0:
        raise InputError(f"The target pixel size must be a positive number of um/px, got {target_um!r}.")
    best = 0
    for k in range(len(slide.levels)):
        if float(np.mean(slide.level_spacing(k))) <= target_um * (1 + 1e-6):
            best = k
    return best, float(np.mean(slide.level_spacing(best)))


def _compute(level: Any) -> np.ndarray:
    return level.compute() if isinstance(level, da.Array) else np.asarray(level[:])


def read_region(slide: Slide, level: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Level ``level`` of ``slide`` in memory, never more than ``max_pixels`` pixels.

    When it is larger, the finest coarser level that fits is read instead, or (none fitting) the
    coarsest level is halved lazily until it fits; compare the shape with level 0 to get the factor.
    """
    if (
        isinstance(level, bool)
        or not isinstance(level, int | np.integer)
        or not 0 <= level < len(slide.levels)
    ):
        raise InputError(f"level must be a whole number in 0..{len(slide.levels) - 1}, got {level!r}.")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int | np.integer) or max_pixels < 1:
        raise InputError(f"max_pixels must be a positive whole number, got {max_pixels!r}.")
    for candidate in slide.levels[level:]:
        if candidate.shape[0] * candidate.shape[1] <= max_pixels:
            return _compute(candidate)
    small = _lazy(slide.levels[-1], slide.name)
    while small.shape[0] * small.shape[1] > max_pixels and max(small.shape[:2]) > 1:
        small = _half(small)
    return _compute(small)
