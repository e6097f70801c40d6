"""npe2 contributions: the reader hook and the single-layer image and labels writers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError, UnsupportedFileError
from ._util import PathLike, full_suffix, is_nifti, is_tiff
from .nifti import write_nifti
from .pyramid_writer import OME_PYRAMID_DTYPES, write_ome_pyramid
from .read import LayerData, can_read, read_image
from .tiff import write_pyramidal_tiff, write_tiff

__all__ = ["get_reader", "write_image", "write_labels"]

ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]


def _as_paths(path: PathLike | Sequence[PathLike]) -> list[PathLike]:
    return [path] if isinstance(path, str | os.PathLike) else list(path)


def _read_all(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    return [layer for p in _as_paths(path) for layer in read_image(p)]


def get_reader(path: PathLike | Sequence[PathLike]) -> ReaderFunction | None:
    """Return a reader for NIfTI/TIFF files or folders of section TIFFs (or lists of them), else None."""
    paths = _as_paths(path)
    if not paths or not all(can_read(p) for p in paths):
        return None
    return _read_all


def _whole_slide(levels: Any, rgb: bool) -> bool:
    """A 2D multiscale image (grey or RGB) that the tile-by-tile OME-TIFF writer can hold.

    Such layers (slides, the histology engine's lazy warped pyramid) are written level by level,
    band by band, never loading level 0 whole; the layer's own levels are kept.
    """
    shape = tuple(levels[0].shape)
    planar = len(shape) == 2 or (rgb and len(shape) == 3 and shape[2] in (3, 4))
    return planar and np.dtype(levels[0].dtype) in OME_PYRAMID_DTYPES


def _write(path: str, data: Any, meta: dict[str, Any] | None, labels: bool) -> list[str]:
    meta = meta or {}
    spacing = meta.get("scale")
    metadata = meta.get("metadata") or {}
    rgb = bool(meta.get("rgb")) and not labels
    multiscale = isinstance(data, list | tuple) or bool(meta.get("multiscale"))
    levels = len(data) if multiscale else 1
    if is_tiff(path) and levels > 1 and not labels and _whole_slide(data, rgb):
        return [write_ome_pyramid(path, list(data), spacing_um=spacing)]
    base = np.asarray(data[0] if multiscale else data)
    if is_nifti(path):
        write_nifti(path, base, spacing, affine=metadata.get("nifti_affine"))
    elif is_tiff(path) and levels > 1:
        method = "nearest" if labels else "mean"
        write_pyramidal_tiff(path, base, levels, spacing=spacing, rgb=rgb, downsample=method)
    elif is_tiff(path):
        write_tiff(path, base, spacing, rgb=rgb, unit=metadata.get("unit"))
    else:
        raise UnsupportedFileError(
            f"Cannot write {path}: '{full_suffix(path) or 'no suffix'}' is not supported; "
            "use .nii, .nii.gz, .tif, .tiff, .ome.tif or .ome.tiff."
        )
    return [str(Path(path))]


def write_image(path: str, data: Any, meta: dict[str, Any] | None) -> list[str]:
    """npe2 image writer: NIfTI or TIFF by suffix, ``meta['scale']`` as spacing. Returns the path."""
    return _write(path, data, meta, labels=False)


def write_labels(path: str, data: Any, meta: dict[str, Any] | None) -> list[str]:
    """npe2 labels writer: like :func:`write_image`, keeping the integer dtype of the labels."""
    base = data[0] if isinstance(data, list | tuple) else data
    dtype = np.dtype(base.dtype if hasattr(base, "dtype") else np.asarray(base).dtype)
    if dtype.kind not in "iub":
        raise InputError(f"Cannot write {path}: labels must be integers, got {dtype}; round and cast them.")
    return _write(path, data, meta, labels=True)
