"""Sample data for napari's File > Open Sample, generated or bundled: nothing is downloaded.

Every function returns a list of napari ``LayerData`` tuples ``(data, kwargs, layer_type)``.
Where a sample has a known answer it travels in the layer ``metadata``:

* ``"true_displacement"``: the pull-back field ``(D, *shape)`` in voxels of the fixed grid, with
  ``DisplacementTransform(field).warp(moving) ~= fixed`` (see :mod:`napari_nephi.synthetic.bundled`);
* ``"true_matrices"`` / ``"true_angles"``: per-section matrices mapping aligned to acquired
  section coordinates (see :func:`napari_nephi.synthetic.em_stack`).
"""

from __future__ import annotations

import numpy as np

from .core.transform import DisplacementTransform
from .synthetic import (
    em_stack,
    ihc_stains,
    mri_pair,
    random_smooth_displacement,
    section_from_atlas,
    tc_pair,
    toy_atlas,
)
from .synthetic.atlas import ATLAS_REGIONS

__all__ = ["tc_sample", "ihc_sample", "mri_sample", "em_sample", "atlas_sample"]

_CONVENTION = "pull-back: DisplacementTransform(true_displacement).warp(moving) ~= fixed"


def _fixed(data, name, scale):
    return (data, {"name": name, "scale": tuple(scale), "colormap": "gray"}, "image")


def _moving(data, name, scale, metadata=None):
    kwargs = {
        "name": name,
        "scale": tuple(scale),
        "colormap": "magenta",
        "blending": "additive",
    }
    if metadata:
        kwargs["metadata"] = metadata
    return (data, kwargs, "image")


def _labels(data, name, scale, metadata=None, features=None):
    kwargs = {"name": name, "scale": tuple(scale), "opacity": 0.5}
    if metadata:
        kwargs["metadata"] = metadata
    if features:
        kwargs["features"] = features
    return (data, kwargs, "labels")


def tc_sample():
    """Triangles-and-circles pair (2D, 128 x 128) with label maps (1 body, 2 circle, 3 triangle)."""
    fixed, moving, fixed_labels, moving_labels = tc_pair(seed=0)
    sc = (1.0, 1.0)
    return [
        _fixed(fixed, "fixed (T&C)", sc),
        _moving(moving, "moving (T&C)", sc),
        _labels(fixed_labels, "fixed labels (T&C)", sc),
        _labels(moving_labels, "moving labels (T&C)", sc),
    ]


#: The IHC sample's moving image: the hematoxylin channel stained this much weaker (times, plus).
IHC_STAINING = (0.8, 0.1)


def ihc_sample():
    """scikit-image's IHC slide, one stain: its hematoxylin channel (fixed) and a smoothly deformed
    copy stained 20 % weaker (moving), like two serial sections of one stain.

    Not hematoxylin against DAB (:func:`~napari_nephi.synthetic.ihc_pair`): the two stains mark
    different structures (normalised correlation 0.06 where they are aligned), so no similarity
    the engines offer can register them (nephi predict 3.8 px endpoint error against 3.4 px
    unregistered; the histology engine's rigid search ran away).
    """
    fixed = ihc_stains()["hematoxylin"]
    disp, disp_inv = random_smooth_displacement(fixed.shape, 12.0, 48.0, seed=0, return_inverse=True)
    gain, offset = IHC_STAINING
    moving = DisplacementTransform(disp_inv).warp(gain * fixed + offset)
    sc = (1.0, 1.0)
    meta = {"true_displacement": disp, "convention": _CONVENTION}
    return [
        _fixed(fixed, "fixed (IHC hematoxylin)", sc),
        _moving(np.ascontiguousarray(moving, np.float32), "moving (IHC hematoxylin, deformed)", sc, meta),
    ]


def mri_sample():
    """nibabel's anatomical MRI (3D, 2 mm voxels) and a smoothly deformed copy."""
    fixed, moving, disp, spacing = mri_pair(seed=0)
    meta = {"true_displacement": disp, "spacing": spacing, "convention": _CONVENTION}
    return [
        _fixed(fixed, "fixed (MRI)", spacing),
        _moving(moving, "moving (MRI)", spacing, meta),
    ]


def em_sample():
    """A small synthetic EM stack (8 sections, each rotated at random) with mitochondria labels."""
    data = em_stack(n_sections=8, shape=(256, 256), seed=0, rotate=True)
    sc = (1.0, 1.0, 1.0)
    meta = {
        "true_matrices": data["matrices"],
        "true_angles": data["angles"],
        "convention": "matrices[k] maps aligned (y, x) to coordinates in section k (pull-back)",
    }
    return [
        (data["stack"], {"name": "EM stack (rotated)", "scale": sc, "metadata": meta}, "image"),
        _labels(data["masks"], "mitochondria (EM)", sc),
    ]


def _region_table() -> dict:
    return {"index": list(ATLAS_REGIONS), "name": list(ATLAS_REGIONS.values())}


def atlas_sample():
    """A toy 3D brain atlas with region labels, and an oblique partial section cut from it."""
    reference, labels = toy_atlas(seed=0)
    section = section_from_atlas(reference, 20, tilt_degrees=(8.0, 5.0), crop=(0.0, 0.1, 0.0, 0.35))
    sc = (1.0, 1.0, 1.0)
    return [
        (reference, {"name": "toy atlas", "scale": sc, "colormap": "gray"}, "image"),
        # region names as the layer's features: napari shows them on hover, the Atlas lookup widget reads them
        _labels(labels, "toy atlas labels", sc, features=_region_table()),
        (section, {"name": "section (toy atlas)", "scale": (1.0, 1.0)}, "image"),
    ]
