"""Readers and writers: NIfTI, TIFF/OME-TIFF (pyramids included), section folders, napari hooks.

Arrays are in napari axis order ``(z, y, x)``; spacing travels as ``meta["scale"]``.
"""

from .napari_io import get_reader, write_image, write_labels
from .nifti import read_nifti, write_nifti
from .read import can_read, read_image
from .stack import read_section_folder
from .tiff import read_tiff, write_pyramidal_tiff, write_tiff

__all__ = [
    "can_read",
    "get_reader",
    "read_image",
    "read_nifti",
    "read_section_folder",
    "read_tiff",
    "write_image",
    "write_labels",
    "write_nifti",
    "write_pyramidal_tiff",
    "write_tiff",
]
