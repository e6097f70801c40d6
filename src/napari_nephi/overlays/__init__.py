"""Registration -> napari layer data, without importing napari or Qt.

Every function returns napari LayerData tuples ``(data, kwargs, layer_type)`` that a widget (or
``viewer.add_layer(napari.layers.Layer.create(*t))``) turns into layers: a deformation grid
(Shapes, paths), the Jacobian determinant (Image), folds (Labels), warped labels (Labels),
checkerboard and difference images (Image) and landmark residuals (Vectors). Coordinates are
voxels of the fixed grid in napari axis order; physical voxel size becomes the layer ``scale``.
Once a layer is in a viewer, :func:`style_layer` adds what only a live layer can have (the
Jacobian's colour bar, the 3D view of the current slice).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.errors import InputError
from ._common import DIVERGING, LayerData, check_shape, layer_scale, normalise
from ._grid import auto_line_width, auto_spacing, deformation_grid, grid_as_vectors, grid_image
from ._maps import (
    JACOBIAN_LEGEND,
    checkerboard,
    difference,
    folds_layer,
    jacobian_layer,
    landmark_residuals,
    warped_labels_layer,
)
from ._style import style_layer

__all__ = [
    "DIVERGING",
    "JACOBIAN_LEGEND",
    "LayerData",
    "auto_line_width",
    "auto_spacing",
    "checkerboard",
    "deformation_grid",
    "grid_as_vectors",
    "grid_image",
    "difference",
    "folds_layer",
    "jacobian_layer",
    "landmark_residuals",
    "normalise",
    "registration_layers",
    "style_layer",
    "warped_labels_layer",
]


def registration_layers(
    reg,
    fixed_shape: Sequence[int],
    moving_labels=None,
    fixed_points=None,
    moving_points=None,
    scale: Sequence[float] | None = None,
    name_prefix: str = "",
    *,
    fixed=None,
    spacing_px: float | None = None,
    slice_axis: int = 0,
    include_warped: bool = False,
    grid_style: str = "paths",
) -> list[LayerData]:
    """All overlays of a :class:`~napari_nephi.core.registration.Registration`, bottom to top.

    In order: the warped image (only with ``include_warped``), checkerboard and difference (only
    when the ``fixed`` image is given; hidden at first), the Jacobian determinant (hidden at first),
    folds, the deformation grid (``"warped"`` convention, see :func:`deformation_grid`), warped
    labels (when ``moving_labels`` is given) and landmark residuals (when both point sets are
    given; TRE statistics in that layer's ``metadata["tre"]``). ``grid_style="vectors"`` gives the
    grid as a Vectors layer (:func:`grid_as_vectors`, cheaper for napari to draw). Every layer gets
    ``scale``, the fixed image's voxel size (default ``reg.transform.spacing``), and a name starting with
    ``name_prefix``. The displacement field is computed once and shared. ``spacing_px=None``: the
    grid spacing adapts to the image (:func:`auto_spacing`). In 3D, ``slice_axis`` is the axis
    the grid is drawn across and the Jacobian's 3D plane is normal to. Call :func:`style_layer`
    on each layer once it is in the viewer.
    """
    if grid_style not in ("paths", "vectors"):
        raise InputError(f"grid_style must be 'paths' or 'vectors', not {grid_style!r}.")
    t = reg.transform
    shape = check_shape(t, fixed_shape)
    sc = layer_scale(scale, len(shape), t.spacing)

    def named(layer: LayerData, **extra) -> LayerData:
        data, kwargs, kind = layer
        kwargs = {**kwargs, **extra, "scale": sc, "name": f"{name_prefix}{kwargs['name']}"}
        return data, kwargs, kind

    layers: list[LayerData] = []
    if include_warped:
        layers.append(named((np.asarray(reg.warped), {"name": "warped", "colormap": "gray"}, "image")))
    if fixed is not None:
        layers.append(named(checkerboard(fixed, reg.warped), visible=False))
        layers.append(named(difference(fixed, reg.warped), visible=False))
    u = t.displacement(shape)
    jac = jacobian_layer(t, shape, displacement=u, slice_axis=slice_axis)
    layers.append(named(jac, visible=False))
    layers.append(named(folds_layer(jac[0])))
    grid = deformation_grid(t, shape, spacing_px, slice_axis=slice_axis, displacement=u)
    layers.append(named(grid_as_vectors(grid) if grid_style == "vectors" else grid))
    if moving_labels is not None:
        layers.append(named(warped_labels_layer(t, moving_labels, shape)))
    if fixed_points is not None and moving_points is not None:
        vectors, _ = landmark_residuals(t, fixed_points, moving_points, sc)
        layers.append(named(vectors))
    return layers
