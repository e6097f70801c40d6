"""Deterministic generators of test and demo data; nothing is downloaded.

* :func:`random_smooth_displacement`: random diffeomorphic fields with a known bound.
* :func:`triangles_and_circles`, :func:`tc_pair`: the 2D shapes set of ICON / NePhi.
* :func:`ihc_pair`, :func:`mri_pair`: bundled real images with a known deformation.
* :func:`em_stack`: synthetic serial-section EM with mitochondria masks and per-section rotations.
* :func:`toy_atlas`, :func:`section_from_atlas`: a brain-like 3D atlas and oblique sections.
* :func:`brain_phantom`, :func:`atlas_queries`: a richer brain phantom with labels and benchmark
  sections cut from another brain (oblique, partial, another stain), with their true plates.
* :func:`restain`, :func:`slide_pair`: re-stained real slides with a known rigid + smooth map.

Conventions: axes ``(y, x)`` / ``(z, y, x)``; displacements are pull-back fields in voxels:
``DisplacementTransform(u).warp(moving)`` samples ``moving(x + u(x))``.
"""

from .atlas import ATLAS_REGIONS, section_from_atlas, toy_atlas
from .atlas_sections import atlas_queries
from .brain_phantom import PHANTOM_REGIONS, brain_phantom
from .bundled import ihc_pair, ihc_stains, mri_pair, mri_path, mri_volume
from .deformation import integrate_velocity, random_smooth_displacement
from .em import em_stack, rotation_matrix
from .histology import SlidePair, restain, slide_pair
from .shapes import TC_LABELS, tc_pair, triangles_and_circles

__all__ = [
    "ATLAS_REGIONS",
    "PHANTOM_REGIONS",
    "SlidePair",
    "TC_LABELS",
    "atlas_queries",
    "brain_phantom",
    "em_stack",
    "ihc_pair",
    "ihc_stains",
    "integrate_velocity",
    "mri_pair",
    "mri_path",
    "mri_volume",
    "random_smooth_displacement",
    "restain",
    "rotation_matrix",
    "section_from_atlas",
    "slide_pair",
    "tc_pair",
    "toy_atlas",
    "triangles_and_circles",
]
