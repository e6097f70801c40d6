"""A folder of 2D section TIFFs (an EM series, serial histology) as one lazy ``(n, y, x)`` stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import tifffile

from ..core.errors import InputError, UnsupportedFileError
from ._util import PathLike, check_not_empty, is_tiff, natural_key, reading
from .tiff import _axis_spacing

__all__ = ["read_section_folder", "section_files"]


def section_files(folder: PathLike) -> list[Path]:
    """TIFF files directly inside ``folder`` (hidden files skipped), in natural name order."""
    p = Path(folder)
    files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and is_tiff(f)]
    return sorted(files, key=lambda f: natural_key(f.name))


def _read_section(path: Path, dtype: np.dtype) -> np.ndarray:
    with reading(path, "TIFF", "tifffile"):
        return tifffile.imread(path, series=0).astype(dtype, copy=False)


def read_section_folder(path: PathLike) -> tuple[da.Array, dict[str, Any]]:
    """Stack the 2D section TIFFs of a folder, in natural order (``s2`` before ``s10``), lazily.

    Only headers are read here; each section is read when its slice is computed. In-plane spacing
    comes from the first section; the section spacing is 1. RGB sections give ``(n, y, x, 3)``.
    Sections of different dtypes are cast to a common one.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UnsupportedFileError(f"{folder} is not a folder; pass a folder of 2D section TIFFs.")
    files = section_files(folder)
    if not files:
        raise UnsupportedFileError(
            f"{folder} holds no TIFF file (.tif, .tiff); put the sections there as 2D TIFFs."
        )
    headers = []
    for f in files:
        with reading(f, "TIFF", "tifffile"), tifffile.TiffFile(f) as tf:
            if not tf.series:
                raise UnsupportedFileError(f"{f} holds no image; remove it from {folder}.")
            series = tf.series[0]
            sample_axis = series.axes.endswith("S") and series.shape[-1] in (3, 4)
            check_not_empty(f, series.shape[:-1] if sample_axis else series.shape)
            headers.append((tuple(series.shape), np.dtype(series.dtype), series.axes))
    with reading(files[0], "TIFF", "tifffile"), tifffile.TiffFile(files[0]) as tf:
        spacing, unit = _axis_spacing(tf)
    shape, _, axes = headers[0]
    dtype = np.result_type(*[d for _, d, _ in headers])
    rgb = axes.endswith("S") and shape[-1] in (3, 4)
    if len(shape) - int(rgb) != 2:
        raise InputError(f"{files[0]} has shape {shape}; every file in a section folder must be 2D.")
    odd = [(f.name, s) for f, (s, _, _) in zip(files, headers) if s != shape]
    if odd:
        listed = ", ".join(f"{name} {s}" for name, s in odd[:5])
        raise InputError(
            f"Sections in {folder} differ in shape: {files[0].name} is {shape} but {listed}. "
            "Pad or crop them to one size first."
        )
    sections = [da.from_delayed(dask.delayed(_read_section)(f, dtype), shape, dtype) for f in files]
    meta = {
        "name": folder.name,
        "rgb": rgb,
        "multiscale": False,
        "scale": (1.0, spacing.get("Y", 1.0), spacing.get("X", 1.0)),
        "metadata": {"source_path": str(folder), "section_files": [str(f) for f in files]},
    }
    if unit:
        meta["metadata"]["unit"] = unit
    return da.stack(sections), meta
