"""Write a tiled pyramidal OME-TIFF tile by tile from lazy (dask) or numpy levels, in bounded memory.

Level 0 is the main image, coarser levels its SubIFDs (the layout QuPath, OMERO and tifffile read
as one multiscale image); the physical pixel size goes into the OME-XML ``PhysicalSizeX/Y`` in um.
A level is computed one band of tile rows at a time (aligned to its dask chunks, so each chunk
is computed once), never whole; the file appears only when complete.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import dask.array as da
import numpy as np
import tifffile

from ..core.errors import InputError, UnsupportedFileError
from ..core.grid import check_spacing
from ..core.options import check_choice, check_int
from ..core.progress import Progress, ProgressCallback
from ._util import PathLike, atomic_write, full_suffix, is_tiff
from .slides import as_slide

__all__ = ["write_ome_pyramid"]

#: bands taller than this many rows are cut into tile-row bands (huge dask chunks)
MAX_BAND_ROWS = 4096
_COMPRESSIONS = (None, "none", "zlib", "deflate", "lzw", "zstd", "jpeg", "lzma", "packbits")
_OME_DTYPES = tuple(np.dtype(t) for t in ("uint8", "uint16", "int8", "int16", "int32", "uint32", "float32"))


def _bands(level: Any, tile: int) -> list[tuple[int, int]]:
    """Row ranges computed at once: whole tile rows, ending at the dask row chunks' ends when possible."""
    rows = level.shape[0]
    edges = [rows]
    if isinstance(level, da.Array) and max(level.chunks[0]) <= MAX_BAND_ROWS:
        edges = [int(e) for e in np.cumsum(level.chunks[0])]
    height = max(tile, MAX_BAND_ROWS // tile * tile)
    out, start = [], 0
    for edge in edges:
        stop = min(rows, math.ceil(edge / tile) * tile)
        while stop > start:
            end = min(stop, start + height)
            out.append((start, end))
            start = end
    return out


def _tiles(level: Any, tile: int, bands: list[tuple[int, int]], on_band) -> Iterator[np.ndarray]:
    """Tiles of ``level`` in row-major order, computing one band of rows at a time (then ``on_band()``)."""
    for y0, y1 in bands:
        part = level[y0:y1]
        band = part.compute() if isinstance(part, da.Array) else np.asarray(part)
        on_band()
        for ty in range(0, y1 - y0, tile):
            for tx in range(0, band.shape[1], tile):
                yield np.ascontiguousarray(band[ty : ty + tile, tx : tx + tile])


def _check_levels(levels: Sequence[Any]) -> tuple[np.dtype, tuple[int, ...]]:
    samples = {tuple(lvl.shape[2:]) for lvl in levels}
    dtypes = {np.dtype(lvl.dtype) for lvl in levels}
    if len(samples) != 1 or len(dtypes) != 1:
        raise InputError("Every pyramid level must have the same samples per pixel and dtype.")
    dtype, (spp,) = dtypes.pop(), samples
    if dtype not in _OME_DTYPES:
        raise InputError(
            f"An OME-TIFF pyramid cannot hold {dtype}; cast the image to uint8, uint16 or float32."
        )
    for k, lvl in enumerate(levels):
        if len(lvl.shape) not in (2, 3) or (spp and spp[0] not in (1, 3, 4)) or 0 in lvl.shape:
            raise InputError(
                f"Pyramid level {k} has shape {tuple(lvl.shape)}; give (y, x) or (y, x, 3) levels, "
                "largest first."
            )
        if k and any(lvl.shape[a] > levels[k - 1].shape[a] for a in (0, 1)):
            raise InputError(
                f"Pyramid level {k} is larger than level {k - 1}; give the levels largest first."
            )
    return dtype, spp


def write_ome_pyramid(
    path: PathLike,
    levels: Sequence[Any] | Any,
    *,
    spacing_um: Sequence[float] | float | None = None,
    tile: int = 512,
    compression: str | None = "zlib",
    progress: Progress | ProgressCallback | None = None,
) -> str:
    """Write ``levels`` (largest first; dask or numpy, (y, x) or (y, x, 3)) as a tiled pyramidal OME-TIFF.

    A single array gets its coarser levels built lazily (2x2 means). ``spacing_um`` is the level-0
    pixel size (y, x) in um. ``tile`` is a multiple of 16. ``progress``: a Progress (or a callback)
    told after every band of rows; cancelling leaves no file. Atomic; returns the path.
    """
    if not is_tiff(path) or full_suffix(path) == ".svs":
        raise UnsupportedFileError(f"Cannot write {path} as OME-TIFF: the name must end in .ome.tif or .tif.")
    levels = list(levels) if isinstance(levels, list | tuple) else as_slide(levels, rgb=False).levels
    if not levels:
        raise InputError("There is no pyramid level to write; give at least one image.")
    dtype, spp = _check_levels(levels)
    tile = check_int("tile", tile, 16, 4096)
    if tile % 16:
        raise InputError(f"Option tile must be a multiple of 16, got {tile}.")
    compression = check_choice("compression", compression, _COMPRESSIONS)
    compression = None if compression == "none" else compression
    steps = Progress(progress) if progress is None or callable(progress) else progress
    rgb = spp in ((3,), (4,))
    meta: dict[str, Any] = {"axes": "YXS" if spp else "YX"}
    if spacing_um is not None:
        sp = check_spacing((spacing_um, spacing_um) if np.isscalar(spacing_um) else spacing_um, 2)
        meta.update(PhysicalSizeY=sp[0], PhysicalSizeX=sp[1], PhysicalSizeYUnit="µm", PhysicalSizeXUnit="µm")
    plan = [_bands(lvl, tile) for lvl in levels]
    total, done = sum(len(b) for b in plan), [0]

    def on_band() -> None:
        done[0] += 1
        steps.step(done[0], total, stage="write OME-TIFF")

    nbytes = sum(int(np.prod(lvl.shape)) for lvl in levels) * dtype.itemsize
    opts: dict[str, Any] = {"tile": (tile, tile), "dtype": dtype, "compression": compression}
    opts["photometric"] = "rgb" if rgb else "minisblack"
    steps.check()
    with atomic_write(path) as tmp, tifffile.TiffWriter(tmp, ome=True, bigtiff=nbytes > 2**31 - 2**26) as tw:
        for k, lvl in enumerate(levels):
            shape = tuple(int(n) for n in lvl.shape)
            extra = {"subifds": len(levels) - 1, "metadata": meta} if k == 0 else {"subfiletype": 1}
            tw.write(_tiles(lvl, tile, plan[k], on_band), shape=shape, **opts, **extra)
    return str(path)
