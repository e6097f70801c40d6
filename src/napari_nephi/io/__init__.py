"""Readers and writers: NIfTI, TIFF/OME-TIFF (pyramids included), whole slides, section folders,
annotations (QuPath GeoJSON, CSV landmarks), napari hooks.

Arrays are in napari axis order ``(z, y, x)``; spacing travels as ``meta["scale"]``.
"""

from .annotations import carry, read_geojson, read_landmarks_csv, write_geojson, write_landmarks_csv
from .napari_io import get_reader, write_image, write_labels
from .nifti import read_nifti, write_nifti
from .pyramid_writer import write_ome_pyramid
from .read import can_read, read_image
from .slides import Slide, as_slide, open_slide
from .stack import read_section_folder
from .tiff import read_tiff, write_pyramidal_tiff, write_tiff

__all__ = [
    "Slide",
    "as_slide",
    "carry",
    "open_slide",
    "read_geojson",
    "read_landmarks_csv",
    "write_geojson",
    "write_landmarks_csv",
    "write_ome_pyramid",
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
