"""TIFF, OME-TIFF, ImageJ TIFF and pyramidal whole-slide (SVS, OME) reading and writing.

Spacing comes from OME-XML ``PhysicalSize{X,Y,Z}``, ImageJ ``spacing`` plus ``X/YResolution``, or
Aperio ``MPP``; otherwise 1. Pyramids open lazily as napari multiscale data (a list of dask
arrays on tifffile's zarr store); flat files are read into memory unless they are very large.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from ..core.errors import InputError, UnsupportedFileError
from ..core.grid import check_spacing
from ._util import (
    PathLike,
    atomic_write,
    check_not_empty,
    existing_file,
    full_suffix,
    is_tiff,
    reading,
    stem,
    writable_array,
)

__all__ = ["read_tiff", "write_pyramidal_tiff", "write_tiff"]

#: flat (single-level) files larger than this open lazily too
LAZY_BYTES = 1 << 30
#: dtypes ImageJ can open; others are written as OME-TIFF
_IMAGEJ_DTYPES = tuple(np.dtype(t) for t in ("uint8", "uint16", "float32"))
#: dtypes OME-XML can describe; others (int64, uint64) are written as tifffile "shaped" TIFF
_OME_DTYPES = tuple(
    np.dtype(t) for t in ("int8", "int16", "int32", "uint8", "uint16", "uint32", "float32", "float64")
)
_SPATIAL_AXES = {2: "YX", 3: "ZYX", 4: "TZYX"}


def _tidy(value: float) -> float:
    """Drop float noise from ratios of integers (``3 / 10`` -> ``0.3``)."""
    return float(f"{value:.12g}")


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _ome_spacing(tf: tifffile.TiffFile) -> tuple[dict[str, float], str | None]:
    images = tifffile.xml2dict(tf.ome_metadata).get("OME", {}).get("Image", {})
    image = images[0] if isinstance(images, list) else images
    pixels = image.get("Pixels", {}) if isinstance(image, dict) else {}
    keys = {"X": "PhysicalSizeX", "Y": "PhysicalSizeY", "Z": "PhysicalSizeZ", "T": "TimeIncrement"}
    out = {ax: v for ax, key in keys.items() if (v := _positive(pixels.get(key))) is not None}
    return out, pixels.get("PhysicalSizeXUnit")


def _resolution_spacing(page: tifffile.TiffPage) -> dict[str, float]:
    out = {}
    for ax, tag in (("X", "XResolution"), ("Y", "YResolution")):
        t = page.tags.get(tag)
        if t is not None and isinstance(t.value, tuple) and t.value[0] > 0 and t.value[1] > 0:
            out[ax] = _tidy(t.value[1] / t.value[0])
    return out


def _axis_spacing(tf: tifffile.TiffFile) -> tuple[dict[str, float], str | None]:
    """Spacing per tifffile axis letter (X, Y, Z, T) found in the file's metadata, and its unit."""
    if tf.is_ome and tf.ome_metadata:
        return _ome_spacing(tf)
    if tf.is_imagej and tf.imagej_metadata is not None:
        ij = tf.imagej_metadata
        out = _resolution_spacing(tf.pages.first)
        if (z := _positive(ij.get("spacing"))) is not None:
            out["Z"] = z
        if (t := _positive(ij.get("finterval"))) is not None:
            out["T"] = t
        return out, ij.get("unit")
    if tf.is_shaped and tf.shaped_metadata and "spacing" in tf.shaped_metadata[0]:
        shaped = tf.shaped_metadata[0]
        axes = str(shaped.get("axes", "")).replace("S", "")
        values = [_positive(v) for v in shaped["spacing"]]
        if len(values) == len(axes) and all(values):
            return dict(zip(axes, values)), shaped.get("unit")
    if tf.is_svs and (mpp := _positive(_svs_metadata(tf).get("MPP"))) is not None:
        return {"X": mpp, "Y": mpp}, "um"
    return {}, None


def _svs_metadata(tf: tifffile.TiffFile) -> dict[str, str]:
    """The Aperio ``key = value`` pairs of an SVS file's first page (``|``-separated; empty if none)."""
    fields = str(tf.pages.first.description or "").split("|")[1:]
    pairs = (field.split("=", 1) for field in fields if "=" in field)
    return {key.strip(): value.strip() for key, value in pairs}


class _CheckedLevel:
    """A zarr level whose reads raise :class:`UnsupportedFileError` naming the file when tiles are corrupt.

    Pixels of a lazy level are decoded only when napari or a computation asks for them, long after
    :func:`read_tiff` returned; a truncated or corrupt tile then still gives a clear error.
    """

    def __init__(self, array: Any, path: PathLike) -> None:
        self.array, self.path = array, path
        self.shape, self.dtype, self.ndim = tuple(array.shape), np.dtype(array.dtype), len(array.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        with reading(self.path, "TIFF", "tifffile"):
            return np.asarray(self.array[index])


def _lazy_levels(path: PathLike) -> list[da.Array]:
    """Every level of the first series as dask arrays on tifffile's zarr store; reads no pixels."""
    store = tifffile.imread(path, aszarr=True, series=0, multiscales=True)
    group = zarr.open(store, mode="r")
    levels = []
    for key in sorted(group.keys(), key=int):
        z = group[key]
        check_not_empty(path, z.shape)
        name = f"tiff-{tokenize(str(path), os.stat(path).st_mtime_ns, key)}"
        levels.append(da.from_array(_CheckedLevel(z, path), chunks=z.chunks, name=name, asarray=True))
    return levels


def read_tiff(path: PathLike, *, lazy: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Read the first image series of a TIFF as ``(data, meta)`` in napari axis order.

    Pyramids (series with more than one level) give ``data`` as a list of dask arrays, largest
    first, and ``meta["multiscale"] = True``. ``lazy=True`` also opens a flat file as dask;
    ``None`` does so only above 1 GiB. RGB(A) samples stay last (``meta["rgb"] = True``); a channel
    axis is reported as ``meta["channel_axis"]`` so napari shows one layer per channel.
    """
    p = existing_file(path)
    with reading(p, "TIFF", "tifffile"):
        with tifffile.TiffFile(p) as tf:
            if not tf.series:
                raise UnsupportedFileError(f"{p} holds no image; check that it is an image TIFF.")
            series = tf.series[0]
            axes, shape, dtype = series.axes, tuple(series.shape), np.dtype(series.dtype)
            rgb = axes.endswith("S") and shape[-1] in (3, 4)
            check_not_empty(p, shape[:-1] if rgb else shape)
            multiscale = len(series.levels) > 1
            spacing, unit = _axis_spacing(tf)
            if lazy is None:
                lazy = int(np.prod(shape)) * dtype.itemsize > LAZY_BYTES
            data = None if (multiscale or lazy) else series.asarray()
        if data is None:
            levels = _lazy_levels(p)
            data = levels if multiscale else levels[0]
        check_not_empty(p, data[0].shape if multiscale else data.shape)
    layer_axes = axes[:-1] if rgb else axes
    meta: dict[str, Any] = {"name": stem(p), "rgb": rgb, "multiscale": multiscale}
    channels = [i for i, ax in enumerate(layer_axes) if ax in "CS"]
    if len(channels) == 1 and len(layer_axes) > 2:
        meta["channel_axis"] = channels[0]
        layer_axes = layer_axes.replace(layer_axes[channels[0]], "")
    meta["scale"] = tuple(spacing.get(ax, 1.0) for ax in layer_axes)
    meta["metadata"] = {"source_path": str(p), "tiff_axes": axes}
    if unit:
        meta["metadata"]["unit"] = unit
    return data, meta


def _prepare(
    path: PathLike, data: Any, spacing: Sequence[float] | None, rgb: bool
) -> tuple[np.ndarray, str, tuple]:
    arr = writable_array(path, data, "biufc")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    ndim = arr.ndim - int(rgb)
    if rgb and arr.shape[-1] not in (3, 4):
        raise InputError(f"an RGB(A) image needs 3 or 4 samples last, got shape {arr.shape}.")
    if ndim not in _SPATIAL_AXES:
        raise InputError(
            f"TIFF export needs a 2D, 3D or 4D (t, z, y, x) image, got shape {arr.shape}"
            + (" with RGB samples last." if rgb else ".")
        )
    axes = _SPATIAL_AXES[ndim] + ("S" if rgb else "")
    return arr, axes, check_spacing(spacing, ndim)


def _ome_metadata(axes: str, sp: tuple[float, ...], unit: str | None) -> dict[str, Any]:
    keys = {"X": "PhysicalSizeX", "Y": "PhysicalSizeY", "Z": "PhysicalSizeZ", "T": "TimeIncrement"}
    meta: dict[str, Any] = {"axes": axes}
    meta.update({keys[ax]: s for ax, s in zip(axes.replace("S", ""), sp)})
    if unit:
        meta.update({f"PhysicalSize{ax}Unit": unit for ax in axes if ax in "XYZ"})
    return meta


def write_tiff(
    path: PathLike,
    data: Any,
    spacing: Sequence[float] | None = None,
    *,
    rgb: bool = False,
    unit: str | None = None,
    compression: str | None = None,
) -> str:
    """Write a 2D/3D/4D image (napari order, RGB(A) samples last if ``rgb``) as TIFF, atomically.

    ``.ome.tif(f)`` names, and dtypes ImageJ cannot hold, are written as OME-TIFF with
    ``PhysicalSize*``; others as ImageJ hyperstacks with ``X/YResolution`` and ``spacing``;
    64-bit integers, which neither describes, as tifffile "shaped" TIFF with the spacing in its
    JSON description. Either way :func:`read_tiff` gets data, dtype and spacing back.
    Returns the path.
    """
    if not is_tiff(path) or full_suffix(path) == ".svs":
        raise UnsupportedFileError(f"Cannot write {path} as TIFF: the name must end in .tif or .tiff.")
    arr, axes, sp = _prepare(path, data, spacing, rgb)
    photometric = "rgb" if rgb else "minisblack"
    ome = full_suffix(path).startswith(".ome") or arr.dtype not in _IMAGEJ_DTYPES
    ome = ome or (rgb and arr.dtype != np.uint8)
    kwargs: dict[str, Any] = {"photometric": photometric, "compression": compression}
    if arr.dtype not in _OME_DTYPES:
        shaped = {"axes": axes, "spacing": list(sp), **({"unit": unit} if unit else {})}
        kwargs.update(ome=False, shaped=True, metadata=shaped)
    elif ome:
        kwargs.update(ome=True, metadata=_ome_metadata(axes, sp, unit))
    else:
        ij: dict[str, Any] = {"axes": axes}
        if "Z" in axes:
            ij["spacing"] = sp[axes.index("Z")]
        if "T" in axes:
            ij["finterval"] = sp[axes.index("T")]
        if unit:
            ij["unit"] = unit
        kwargs.update(imagej=True, metadata=ij, resolution=(1.0 / sp[-1], 1.0 / sp[-2]))
    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, arr, **kwargs)
    return str(path)


def _downsample2(arr: np.ndarray, yx: tuple[int, int], method: str) -> np.ndarray:
    """Halve ``arr`` along the two axes ``yx``: 2x2 block mean (``"mean"``) or striding."""

    def every_other(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
        index = [slice(None)] * a.ndim
        index[yx[0]], index[yx[1]] = slice(dy, None, 2), slice(dx, None, 2)
        return a[tuple(index)]

    if method == "nearest":
        return every_other(arr, 0, 0)
    pad = [(0, 0)] * arr.ndim
    for ax in yx:
        pad[ax] = (0, arr.shape[ax] % 2)
    a = np.pad(arr.astype(np.float64), pad, mode="edge")
    mean = sum(every_other(a, dy, dx) for dy in (0, 1) for dx in (0, 1)) / 4.0
    if np.issubdtype(arr.dtype, np.integer):
        mean = np.round(mean)
    return mean.astype(arr.dtype)


def write_pyramidal_tiff(
    path: PathLike,
    data: Any,
    levels: int,
    *,
    tile: tuple[int, int] = (256, 256),
    spacing: Sequence[float] | None = None,
    rgb: bool = False,
    downsample: str = "mean",
    compression: str | None = "zlib",
) -> str:
    """Write ``data`` as a tiled OME-TIFF pyramid of ``levels`` levels, each half the previous.

    Reduced levels go in SubIFDs (``downsample`` is ``"mean"`` for images, ``"nearest"`` for
    labels); ``tile`` is (height, width), multiples of 16. Atomic; returns the path.
    """
    if not is_tiff(path) or full_suffix(path) == ".svs":
        raise UnsupportedFileError(f"Cannot write {path} as TIFF: the name must end in .tif or .tiff.")
    if int(levels) < 1:
        raise InputError(f"levels must be at least 1, got {levels}.")
    if len(tile) != 2 or any(int(t) <= 0 or int(t) % 16 for t in tile):
        raise InputError(f"tile must be two positive multiples of 16, got {tile}.")
    if downsample not in ("mean", "nearest"):
        raise InputError(f"downsample must be 'mean' or 'nearest', got {downsample!r}.")
    arr, axes, sp = _prepare(path, data, spacing, rgb)
    if arr.dtype not in _OME_DTYPES:
        raise InputError(f"OME-TIFF cannot hold {arr.dtype}; cast the image to int32 or float32 first.")
    if "T" in axes:
        raise InputError("pyramidal TIFF export supports 2D or 3D (z, y, x) images, not time series.")
    yx = (arr.ndim - 3, arr.ndim - 2) if rgb else (arr.ndim - 2, arr.ndim - 1)
    opts = {"tile": tuple(int(t) for t in tile), "photometric": "rgb" if rgb else "minisblack"}
    opts["compression"] = compression
    with atomic_write(path) as tmp, tifffile.TiffWriter(tmp, ome=True, bigtiff=arr.nbytes > 2**31) as tw:
        tw.write(arr, subifds=int(levels) - 1, metadata=_ome_metadata(axes, sp, None), **opts)
        level = arr
        for _ in range(int(levels) - 1):
            level = _downsample2(level, yx, downsample)
            tw.write(level, subfiletype=1, **opts)
    return str(path)
