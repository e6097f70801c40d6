"""An atlas reference for the ``atlas`` engine: a 3D volume file, or a folder of 2D plate images.

A folder's plates may differ in size (a printed atlas scanned page by page), so they are read one
by one into a list instead of being stacked (:func:`napari_nephi.io.read_section_folder` needs
one size). Annotations (region labels) are read the same way and must match the plates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import InputError, UnsupportedFileError
from ._util import PathLike
from .read import read_image
from .stack import section_files

__all__ = ["read_reference", "read_plate"]


def _first_level(path: PathLike) -> tuple[np.ndarray, dict]:
    data, meta, _ = read_image(path)[0]
    if meta.get("multiscale"):
        data = data[0]
    return np.asarray(data), meta


def read_plate(path: PathLike, what: str = "section") -> np.ndarray:
    """One 2D image (grey ``(y, x)`` or RGB ``(y, x, 3|4)``) from a NIfTI or TIFF file."""
    data, meta = _first_level(path)
    spatial = data.ndim - (1 if meta.get("rgb") else 0)
    if spatial == 3 and data.shape[0] == 1:  # a one-page stack or a one-slice NIfTI
        data = data[0]
        spatial = 2
    if spatial != 2:
        raise InputError(
            f"The {what} {path} is {spatial}D {tuple(data.shape)}; a {what} must be one 2D image "
            "(grey or RGB). Save each section as its own 2D TIFF."
        )
    return data


def read_reference(path: PathLike, what: str = "reference") -> tuple[np.ndarray | list[np.ndarray], dict]:
    """An atlas reference (or its annotation) from ``path``.

    A file gives its volume (``(z, y, x)``, RGB ``(z, y, x, 3)``), a folder the list of its 2D
    TIFF images in natural name order (``p2`` before ``p10``), sizes free. Returns the data and the
    reader's meta of the first file (``scale``, ``name``).
    """
    p = Path(path)
    if not p.exists():
        raise UnsupportedFileError(f"The {what} {p} does not exist; check the path and try again.")
    if not p.is_dir():
        data, meta = _first_level(p)
        spatial = data.ndim - (1 if meta.get("rgb") else 0)
        if spatial != 3:
            raise InputError(
                f"The {what} {p} is {spatial}D {tuple(data.shape)}; pass a 3D volume (plates along "
                "one axis) or a folder of 2D plate images."
            )
        return data, meta
    try:
        files = section_files(p)
    except OSError as exc:
        raise UnsupportedFileError(f"Cannot list the {what} folder {p}: {exc.strerror or exc}.") from exc
    if not files:
        raise UnsupportedFileError(
            f"The {what} folder {p} holds no TIFF file (.tif, .tiff); put one 2D image per plate there."
        )
    plates = [read_plate(f, f"{what} plate") for f in files]
    _, meta = _first_level(files[0])
    meta = {**meta, "name": p.name, "files": [str(f) for f in files]}
    return plates, meta
