"""The "Histology registration" widget's work off the GUI thread: the run and its result layers,
and annotations carried from the moving slide to the fixed slide.

Everything here returns napari LayerData tuples ``(data, kwargs, type)`` built by the library
(``napari_nephi.register``, :mod:`napari_nephi.overlays`, :mod:`napari_nephi.io.annotations`); the
layers are placed in the world frame of the fixed slide's layer (:class:`Frame`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import overlays
from ..core.errors import DimensionMismatchError, InputError
from ..core.lazy_warp import warp_lazy
from ..core.progress import Progress
from ..core.transform import AffineTransform, ComposedTransform, IdentityTransform
from ..engines.histology.grids import Grid
from ..engines.registry import register
from ..io.annotations import carry, carry_points, from_napari_shapes, to_napari_shapes

#: The checkerboard and difference are made on the first warped level whose longer side is at most this.
LOW_SIDE = 1024
#: The layers of a run, bottom to top, by role.
ROLES = ("warped", "checkerboard", "difference", "jacobian", "grid")


@dataclass(frozen=True)
class Frame:
    """Where a slide's level-0 pixels are in the world: its layer's ``scale`` and ``translate``."""

    scale: tuple[float, float]
    translate: tuple[float, float]

    @classmethod
    def of(cls, layer) -> Frame:
        return cls(tuple(float(s) for s in layer.scale[-2:]), tuple(float(t) for t in layer.translate[-2:]))

    def at(self, factor: float) -> dict:
        """``scale`` and ``translate`` of a grid of ``factor`` level-0 pixels per pixel (pyramid centres)."""
        s = np.asarray(self.scale)
        return {
            "scale": tuple(s * factor),
            "translate": tuple(np.asarray(self.translate) + s * (factor - 1) / 2),
        }


def levels_of(layer) -> list:
    """An Image layer's data as a list of levels (level 0 first), without copying."""
    return list(layer.data) if layer.multiscale else [layer.data]


def _grey(image: np.ndarray) -> np.ndarray:
    return image.mean(axis=-1) if image.ndim == 3 else image


def _low_level(warped: list) -> int:
    for k, level in enumerate(warped):
        if max(level.shape[:2]) <= LOW_SIDE:
            return k
    return len(warped) - 1


def comparison_layers(reg, fixed_levels: list, frame: Frame, name: str) -> list:
    """Checkerboard and difference of the fixed slide and the warped one at a low pyramid level."""
    k = _low_level(reg.warped)
    warped = np.asarray(reg.warped[k])
    factor = 2.0**k
    fixed = warp_lazy(
        fixed_levels, IdentityTransform(2), warped.shape[:2], out_level_scale=factor, dtype=np.float32
    )
    fixed = np.asarray(fixed)
    where = {**frame.at(factor), "visible": False}
    board = overlays.checkerboard(_grey(fixed), _grey(warped), name=f"{name} checkerboard")
    diff = overlays.difference(_grey(fixed), _grey(warped), name=f"{name} difference")
    return [(d, {**kw, **where}, kind) for d, kw, kind in (board, diff)]


def working_transform(reg) -> tuple[ComposedTransform, float]:
    """The registration's transform between the working grids of both slides, and that grid's factor.

    Working-grid pixel ``i`` of the fixed slide is centred on its level-0 pixel ``(i + 0.5) f - 0.5``;
    the map goes to the moving slide's working grid (same um/px), so its displacement is in working
    pixels and its Jacobian is that of the deformation.
    """
    t = reg.transform
    um_f, um_m = float(np.mean(t.spacing)), float(np.mean(t.moving_spacing))
    um = float(reg.settings.get("working_um") or um_f)
    fixed_grid = Grid(tuple(t.shape), um_f, um)
    moving_grid = Grid(tuple(t.moving_shape), um_m, um)
    composed = ComposedTransform(
        [AffineTransform(fixed_grid.to_level0()), t, AffineTransform(moving_grid.from_level0())],
        shape=fixed_grid.shape,
        moving_shape=moving_grid.shape,
        spacing=(um, um),
        moving_spacing=(um, um),
    )
    return composed, fixed_grid.factor


def deformation_layers(reg, frame: Frame, name: str) -> list:
    """The Jacobian determinant (hidden) and the deformation grid on the working level."""
    tw, factor = working_transform(reg)
    shape = tw.shape
    u = tw.displacement(shape)
    where = frame.at(factor)
    jac = overlays.jacobian_layer(tw, shape, displacement=u, name=f"{name} Jacobian determinant")
    grid = overlays.deformation_grid(tw, shape, displacement=u, name=f"{name} deformation grid")
    return [
        (jac[0], {**jac[1], **where, "visible": False}, jac[2]),
        (grid[0], {**grid[1], **where}, grid[2]),
    ]


def result_layers(reg, fixed_levels: list, frame: Frame, name: str, progress: Progress | None = None) -> list:
    """Every result layer of a run, in :data:`ROLES` order; the warped slide stays lazy (multiscale)."""
    warped = reg.warped
    rgb = warped[0].ndim == 3 and warped[0].shape[-1] in (3, 4)
    layers = [(warped, {"name": f"{name} warped", "multiscale": True, "rgb": rgb, **frame.at(1.0)}, "image")]
    for build in (
        lambda: comparison_layers(reg, fixed_levels, frame, name),
        lambda: deformation_layers(reg, frame, name),
    ):
        if progress is not None:
            progress.check()
        layers += build()
    return layers


def register_slides(
    progress, cancel, *, fixed, moving, rgb, spacing, moving_spacing, options: dict, frame: Frame, name: str
) -> dict:
    """Run ``register(..., method="histology")`` and build the result layers (in a worker thread)."""
    reg = register(
        fixed,
        moving,
        method="histology",
        spacing=spacing,
        moving_spacing=moving_spacing,
        rgb=rgb,
        progress=progress,
        cancel=cancel,
        **options,
    )
    fixed_levels = list(fixed) if isinstance(fixed, list | tuple) else [fixed]
    prog = Progress(progress, cancel)
    prog.step(0, 1, stage="result layers")
    layers = result_layers(reg, fixed_levels, frame, name, prog)
    prog.step(1, 1, stage="result layers")
    return {"registration": reg, "layers": layers}


def save_registration(progress, cancel, *, registration, folder: str) -> dict:
    """``registration.save(folder)`` (in a worker thread): transform, warped pyramid, metrics, settings."""
    Progress(progress, cancel).check()
    return {"saved": str(registration.save(folder))}


# -- annotations -----------------------------------------------------------------------------------
def _affine(func) -> tuple[np.ndarray, np.ndarray]:
    """The 2x2 matrix and offset of an affine map of 2D points given as a function of one point."""
    origin = np.asarray(func(np.zeros(2)), float)[-2:]
    cols = [np.asarray(func(e), float)[-2:] - origin for e in np.eye(2)]
    return np.stack(cols, axis=1), origin


def points_between(points: np.ndarray, source, target) -> np.ndarray:
    """Data coordinates ``(N, 2)`` of layer ``source`` as data coordinates of layer ``target``
    (through the world frame; napari layer transforms are affine)."""
    to_world, o1 = _affine(source.data_to_world)
    to_data, o2 = _affine(target.world_to_data)
    world = np.asarray(points, float) @ to_world.T + o1
    return world @ to_data.T + o2


def _check_2d(layer) -> None:
    if layer.ndim != 2:
        raise DimensionMismatchError(
            f"{layer.name} is {layer.ndim}D; annotations are carried between 2D slides: draw them "
            "on a 2D layer."
        )


def carried_annotations(layer, moving_layer, fixed_frame: Frame, transform) -> tuple:
    """A Shapes or Points ``layer`` drawn on ``moving_layer`` carried onto the fixed slide (LayerData).

    Vertices go to the moving slide's level-0 pixels, then to the fixed slide's through
    ``transform`` (fixed -> moving level-0 pixels, inverted per vertex); names and classes are kept.
    """
    _check_2d(layer)
    kind = type(layer).__name__.lower()
    where = {**fixed_frame.at(1.0), "name": f"{layer.name} on the fixed slide"}
    features = layer.features
    if kind == "points":
        pts = points_between(np.asarray(layer.data, float), layer, moving_layer)
        moved = carry_points(pts, transform)
        colour = layer.face_color[0] if len(layer.face_color) else "yellow"
        return moved, {**where, "features": features.copy(), "face_color": colour}, "points"
    if kind != "shapes":
        raise InputError(f"{layer.name} is a {kind} layer; choose a Shapes or Points layer to transfer.")
    if len(layer.data) == 0:
        raise InputError(f"{layer.name} holds no shapes; draw them on the moving slide first.")
    data = [points_between(np.asarray(s, float), layer, moving_layer) for s in layer.data]
    props = {k: list(features[k]) for k in ("name", "classification") if k in features.columns}
    annotations = carry(from_napari_shapes(data, list(layer.shape_type), props), transform)
    shapes, types, props = to_napari_shapes(annotations)
    width = float(np.mean(layer.edge_width)) if len(layer.edge_width) else 1.0
    width *= float(np.mean(np.abs(layer.scale[-2:]))) / float(np.mean(np.abs(fixed_frame.scale)))
    kwargs = {**where, "shape_type": types, "features": props, "edge_color": layer.edge_color[0],
              "face_color": "transparent", "edge_width": width}  # fmt: skip
    return shapes, kwargs, "shapes"
