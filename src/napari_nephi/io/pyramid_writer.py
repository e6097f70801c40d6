"""Write a tiled pyramidal OME-TIFF tile by tile from lazy (dask) or numpy levels, in bounded memory.

Level 0 is the main image, coarser levels its SubIFDs (the layout QuPath, OMERO and tifffile read
as one multiscale image); the physical pixel size goes into the OME-XML ``PhysicalSizeX/Y`` in um.
A level is computed one band of tile rows at a time (aligned to its dask chunks, so each chunk
is computed once), never whole, and a band wider than :data:`~.tile_bands.MAX_BAND_BYTES` in column
groups (:mod:`.tile_bands`); the file appears only when complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..core.errors import InputError, UnsupportedFileError
from ..core.grid import check_spacing
from ..core.options import check_choice, check_int
from ..core.progress import Progress, ProgressCallback
from ._util import PathLike, atomic_write, full_suffix, is_tiff
from .slides import as_slide
from .tile_bands import iter_tiles, plan_bands

__all__ = ["OME_PYRAMID_DTYPES", "check_tile", "write_ome_pyramid"]

_COMPRESSIONS = (None, "none", "zlib", "deflate", "lzw", "zstd", "jpeg", "lzma", "packbits")
#: dtypes an OME-TIFF pyramid holds
OME_PYRAMID_DTYPES = tuple(
    np.dtype(t) for t in ("uint8", "uint16", "int8", "int16", "int32", "uint32", "float32")
)


def check_tile(tile: Any, name: str = "tile") -> int:
    """``tile`` (the option ``name``) as a TIFF tile side: a multiple of 16 in [16, 4096]."""
    tile = check_int(name, tile, 16, 4096)
    if tile % 16:
        raise InputError(
            f"Option {name} must be a multiple of 16 (the TIFF tile rule), got {tile}; e.g. 512."
        )
    return tile


def _check_levels(levels: Sequence[Any]) -> tuple[np.dtype, tuple[int, ...]]:
    samples = {tuple(lvl.shape[2:]) for lvl in levels}
    dtypes = {np.dtype(lvl.dtype) for lvl in levels}
    if len(samples) != 1 or len(dtypes) != 1:
        raise InputError("Every pyramid level must have the same samples per pixel and dtype.")
    dtype, (spp,) = dtypes.pop(), samples
    if dtype not in OME_PYRAMID_DTYPES:
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
    tile = check_tile(tile)
    compression = check_choice("compression", compression, _COMPRESSIONS)
    compression = None if compression == "none" else compression
    steps = Progress(progress) if progress is None or callable(progress) else progress
    rgb = spp in ((3,), (4,))
    meta: dict[str, Any] = {"axes": "YXS" if spp else "YX"}
    if spacing_um is not None:
        sp = check_spacing((spacing_um, spacing_um) if np.isscalar(spacing_um) else spacing_um, 2)
        meta.update(PhysicalSizeY=sp[0], PhysicalSizeX=sp[1], PhysicalSizeYUnit="µm", PhysicalSizeXUnit="µm")
    plan = [plan_bands(lvl, tile) for lvl in levels]
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
            tiles = iter_tiles(lvl, tile, plan[k], on_band, spill_dir=Path(tmp).parent)
            tw.write(tiles, shape=shape, **opts, **extra)
    return str(path)
