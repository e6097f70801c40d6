"""One entry point that reads any supported image into napari layer data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import UnsupportedFileError
from ._util import PathLike, full_suffix, is_nifti, is_tiff
from .nifti import read_nifti
from .slides import OPENSLIDE_SUFFIXES, open_slide
from .stack import read_section_folder, section_files
from .tiff import read_tiff

__all__ = ["LayerData", "SUPPORTED", "can_read", "read_image"]

LayerData = tuple[Any, dict[str, Any], str]
SUPPORTED = (
    ".nii, .nii.gz, .tif, .tiff, .ome.tif, .ome.tiff, .svs, a folder of 2D TIFF sections, or with the "
    f"openslide extra {', '.join(OPENSLIDE_SUFFIXES)}"
)


def can_read(path: PathLike) -> bool:
    """Whether :func:`read_image` handles ``path`` (by suffix; a folder must hold TIFFs)."""
    p = Path(path)
    if p.is_dir():
        try:
            return bool(section_files(p))
        except OSError:
            return False
    return is_nifti(p) or is_tiff(p) or full_suffix(p) in OPENSLIDE_SUFFIXES


def _read_openslide(path: Path) -> tuple[Any, dict[str, Any]]:
    """An OpenSlide slide as a lazy multiscale RGB layer (pixel size in um when the slide has one)."""
    slide = open_slide(path)
    multiscale = len(slide.levels) > 1
    meta: dict[str, Any] = {"name": slide.name, "rgb": True, "multiscale": multiscale}
    meta["scale"] = slide.spacing or (1.0, 1.0)
    meta["metadata"] = {"source_path": str(path), **({"unit": "um"} if slide.spacing else {})}
    return (slide.levels if multiscale else slide.levels[0]), meta


def read_image(path: PathLike) -> list[LayerData]:
    """Read a NIfTI, TIFF/OME-TIFF/SVS file, an OpenSlide slide or a folder of section TIFFs as layer data.

    Returns ``[(data, meta, "image")]`` where ``meta`` holds the layer ``name``, ``scale``
    (spacing, napari order) and ``metadata``. Unreadable, corrupt or unknown files raise
    :class:`~napari_nephi.core.errors.UnsupportedFileError`.
    """
    p = Path(path)
    if not p.exists():
        raise UnsupportedFileError(f"{p} does not exist; check the path and try again.")
    if p.is_dir():
        data, meta = read_section_folder(p)
    elif is_nifti(p):
        data, meta = read_nifti(p)
    elif is_tiff(p):
        data, meta = read_tiff(p)
    elif full_suffix(p) in OPENSLIDE_SUFFIXES:
        data, meta = _read_openslide(p)
    else:
        raise UnsupportedFileError(
            f"Cannot read {p}: '{full_suffix(p) or 'no suffix'}' is not a supported format. "
            f"napari-nephi reads {SUPPORTED}; convert the image to one of these."
        )
    return [(data, meta, "image")]
