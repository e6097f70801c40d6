"""Put result layers in the viewer, replacing the previous run's instead of piling up."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Sequence

import numpy as np
from qtpy.QtCore import QObject

from .. import overlays
from ._steps import StepQueue

#: Name of the short-lived layers :func:`warm_up` adds and removes.
WARM_UP_NAME = "napari-nephi warm-up"

#: Keyword arguments that follow the data when a layer of a previous run is updated in place. The
#: look the user may have changed (colormap, opacity, blending, visibility) is kept.
_DATA_KWARGS = ("scale", "translate", "metadata", "contrast_limits", "features", "edge_width")

#: Of those, the numeric ones: set only when they change (napari refreshes the layer each time).
_NUMERIC = ("scale", "translate", "contrast_limits", "edge_width")

#: The look of a layer and napari's defaults, set when a layer is adopted for another role.
_LOOK = (("colormap", None), ("opacity", 1.0), ("blending", "translucent"), ("visible", True))


#: Layers holding more than this many bytes get their data swapped for a tiny array before a
#: removal that may not free them at once (see :func:`remove_layer`).
BIG_LAYER_BYTES = 16 * 2**20


def remove_layer(viewer, layer) -> None:
    """Remove ``layer`` from ``viewer`` without a full garbage collection on the GUI thread.

    napari runs ``gc.collect()`` after every layer removal to free the layer's GPU resources at
    once; in a process that has imported torch a full collection pauses the GUI 150-250 ms. Here
    the collection runs with the existing objects frozen (``gc.freeze``, or already frozen by a
    run, see ``FullCollectionPause``): it only looks at objects made since, so a layer older than
    the freeze is left for Python's next full collection. A big layer's data is swapped for a
    tiny array first so that its arrays and textures are freed at once by reference counting.
    """
    if _nbytes(layer) > BIG_LAYER_BYTES:
        _drop_data(layer)
    if gc.get_freeze_count() == 0:  # nobody else froze objects: we may unfreeze everything after
        gc.freeze()
        try:
            viewer.layers.remove(layer)
        finally:
            gc.unfreeze()
    else:
        viewer.layers.remove(layer)


#: Viewers :func:`warm_up` has warmed up (or is warming up).
_warmed: weakref.WeakSet = weakref.WeakSet()


def warm_up(
    viewer,
    queue: StepQueue,
    cancelled: Callable[[], bool] = lambda: False,
    done: Callable[[], None] | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Pay napari's once-per-viewer costs of showing results now, one step per event-loop turn.

    The first Labels layer of a viewer costs ~50 ms more than later ones (vispy builds the
    machinery of its polygon tool) and the first layer that draws text (any Points, Shapes or
    Vectors layer; text or not) renders the font's glyphs, ~50 ms. A tiny hidden Labels layer and
    an empty Points layer are added and removed, each in its own turn of ``queue``, unless the
    viewer has such layers already; the selection is given back afterwards. Meant for when a
    widget opens: it starts once ``ready()`` (background imports done), ``cancelled()`` stops it
    (a run started) and ``done()`` is called at the end. Once per viewer.
    """
    from napari.layers import Labels, Points, Shapes, Vectors

    if viewer in _warmed or len(viewer.layers) == 0:
        if done is not None:
            done()
        return
    _warmed.add(viewer)
    made: list = []
    steps: list[Callable[[], None]] = []
    selected: list = [None]

    def adder(make):
        def step():
            selected[0] = viewer.layers.selection.active
            made.append(viewer.add_layer(make()))

        return step

    def remover():
        while made:
            layer = made.pop()
            if layer in viewer.layers:
                remove_layer(viewer, layer)
        if selected[0] is not None and selected[0] in viewer.layers:
            viewer.layers.selection.active = selected[0]

    if not any(isinstance(ly, Labels) for ly in viewer.layers):
        ndim = viewer.dims.ndim
        steps += [
            adder(lambda: Labels(np.zeros((1,) * ndim, np.uint8), name=WARM_UP_NAME, visible=False)),
            remover,
        ]
    if not any(isinstance(ly, Points | Shapes | Vectors) for ly in viewer.layers):
        steps += [adder(lambda: Points(np.zeros((0, 2)), name=WARM_UP_NAME)), remover]
    pending = list(steps)

    def run() -> None:
        if cancelled():
            remover()
            pending.clear()
        elif len(pending) == len(steps) and not ready():
            queue.later(run)
            return
        if pending:
            pending.pop(0)()
            queue.later(run)
        elif done is not None:
            done()

    queue.later(run)


def _nbytes(layer) -> int:
    data = layer.data
    if isinstance(data, list):
        return sum(int(getattr(d, "nbytes", 0)) for d in data)
    return int(getattr(data, "nbytes", 0))


def _drop_data(layer) -> None:
    kind = type(layer).__name__.lower()
    try:
        if kind == "shapes":
            layer.data = []
        elif kind in ("points", "vectors"):
            layer.data = np.zeros((0, *np.shape(layer.data)[1:]), np.float64)
        elif kind in ("image", "labels") and not getattr(layer, "multiscale", False):
            shape = [1] * layer.data.ndim
            if getattr(layer, "rgb", False):
                shape[-1] = layer.data.shape[-1]
            layer.data = np.zeros(shape, layer.data.dtype)
    except Exception:  # noqa: BLE001  the layer is going away anyway; never fail a removal on this
        pass


def _same_numbers(old, new) -> bool:
    """Whether two numeric sequences hold the same values (False when they cannot be compared)."""
    try:
        return bool(np.array_equal(np.asarray(old, float), np.asarray(new, float)))
    except (TypeError, ValueError):
        return False


def _kind(layer) -> str:
    return type(layer).__name__.lower()


def can_update(layer, data, kind: str) -> bool:
    """Whether ``layer`` can take ``data`` in place (same type and dimensionality, RGB kept)."""
    if _kind(layer) != kind or getattr(layer, "multiscale", False):
        return False
    if kind == "shapes":
        return len(data) == 0 or np.shape(data[0])[-1] == layer.ndim
    if kind in ("points", "vectors"):
        return np.ndim(data) == np.ndim(layer.data) and np.shape(data)[-1] == np.shape(layer.data)[-1]
    if np.ndim(data) != layer.data.ndim:
        return False
    return not getattr(layer, "rgb", False) or np.shape(data)[-1] == layer.data.shape[-1]


def update_layer(layer, data, kwargs: dict, kind: str, restyle: bool = False) -> None:
    """Give an existing layer new data and name; scale, metadata, contrast limits and features follow.

    With ``restyle`` the look (colormap, opacity, blending, visibility) is set too, to the given values or
    napari's defaults: for a layer that showed something else before (a live preview).
    """
    if kind == "shapes":
        shape_type = kwargs.get("shape_type", "path")
        types = list(shape_type) if isinstance(shape_type, list | tuple) else [shape_type] * len(data)
        layer.data = list(zip(data, types, strict=True))  # new shapes take the current style
    else:
        layer.data = data
    kwargs = {"translate": np.zeros(len(layer.translate)), **kwargs}
    for key in _DATA_KWARGS:
        if key in kwargs and not (key in _NUMERIC and _same_numbers(getattr(layer, key), kwargs[key])):
            setattr(layer, key, kwargs[key])  # each change redraws the layer: only what changed
    if restyle:
        for key, default in _LOOK:
            value = kwargs.get(key, default)
            if value is not None:
                setattr(layer, key, value)
        if kind == "image" and "contrast_limits" not in kwargs:
            layer.reset_contrast_limits()
    if "name" in kwargs:
        layer.name = kwargs["name"]


class ResultLayers:
    """Adds LayerData tuples to a viewer; a later :meth:`show` replaces the earlier layers.

    ``parent`` (the widget) owns the timer of :meth:`show_gradually`: once it is deleted, with its
    viewer, no step is left to run.
    """

    def __init__(self, viewer, parent: QObject | None = None):
        self.viewer = viewer
        self.queue = StepQueue(parent)
        self._layers: list = []
        self._roles: dict[int, tuple] = {}  # id(layer) -> (role, kind)

    @property
    def layers(self) -> list:
        return [ly for ly in self._layers if ly in self.viewer.layers]

    def layer_with_role(self, role: str, kind: str):
        """The previous run's layer with this role and type that is still in the viewer, or None."""
        return next((ly for ly in self.layers if self._roles.get(id(ly)) == (role, kind)), None)

    def clear(self) -> None:
        for layer in self.layers:
            self.viewer.layers.remove(layer)
        self._layers = []

    def show(self, layer_data: list) -> list:
        """Add ``(data, kwargs, type)`` tuples; update in place layers of the same name and type."""
        previous = {(ly.name, type(ly).__name__.lower()): ly for ly in self.layers}
        new = []
        for data, kwargs, kind in layer_data:
            key = (kwargs.get("name"), kind)
            old = previous.pop(key, None)
            if old is not None:
                self.viewer.layers.remove(old)
            add = getattr(self.viewer, f"add_{kind}")
            new.append(add(data, **kwargs))
        for layer in previous.values():
            self.viewer.layers.remove(layer)
        self._layers = new
        self._roles = {}
        return new

    def show_gradually(
        self,
        layer_data: list,
        done: Callable[[list], None] | None = None,
        *,
        roles: Sequence[str] | None = None,
        adopt: dict | None = None,
        prebuilt: Sequence | None = None,
    ) -> None:
        """Like :meth:`show`, spread over turns of the event loop so the GUI keeps responding.

        ``roles`` (default: the layer names) match layers across runs: a layer of the previous run
        with the same role and type takes the new data in place (no new layer, no removal), so a
        second run costs the viewer almost nothing. ``adopt`` maps a role to an existing layer of
        the viewer (e.g. the live preview) to update in place when the previous run has none.
        A new layer is added hidden and shown in a later turn: adding it (napari's own work) and
        drawing it the first time (shader compilation) are the two expensive parts. ``prebuilt``
        may give, per entry, a napari layer already made from it off the GUI thread (hidden), to
        add instead of making one here. Layers of the previous run that the new one does not have
        are removed last. ``done(layers)`` is called at the end.
        """
        roles = list(roles) if roles is not None else [kw.get("name") for _, kw, _ in layer_data]
        adopt = dict(adopt or {})
        prebuilt = list(prebuilt) if prebuilt is not None else [None] * len(layer_data)
        previous = {self._roles.get(id(ly)): ly for ly in self.layers}
        steps: list[Callable[[], None]] = []
        result: list = [None] * len(layer_data)
        for i, ((data, kwargs, kind), role) in enumerate(zip(layer_data, roles, strict=True)):
            old = previous.pop((role, kind), None)
            adopted = False
            if old is None or not can_update(old, data, kind):
                if old is not None:
                    previous[(role, "replaced")] = old
                old = adopt.get(role)
                if old is not None and old in self.viewer.layers and can_update(old, data, kind):
                    adopted = adopt.pop(role) is not None
                else:
                    old = None
            if old is not None:
                steps.append(self._update_step(i, old, data, kwargs, kind, result, adopted))
            else:
                steps += self._add_steps(i, data, kwargs, kind, result, prebuilt[i])
        leftovers = list(previous.values()) + [ly for ly in adopt.values() if ly in self.viewer.layers]
        steps += [self._remove_step(ly) for ly in leftovers]
        keys = [(role, kind) for role, (_, _, kind) in zip(roles, layer_data, strict=True)]

        def progressed(step):
            def run():
                step()
                self._layers = [ly for ly in result if ly is not None]

            return run

        def finish():
            self._layers = [ly for ly in result if ly is not None]
            self._roles = {id(ly): key for ly, key in zip(result, keys, strict=True) if ly is not None}
            if done is not None:
                done(self._layers)

        self.queue.add([progressed(step) for step in steps] + [finish], now=True)

    def _update_step(self, i, layer, data, kwargs, kind, result, restyle=False):
        def step():
            update_layer(layer, data, kwargs, kind, restyle)
            result[i] = layer
            overlays.style_layer(layer, self.viewer)  # colour bar, 3D view of the new data

        return step

    def _add_steps(self, i, data, kwargs, kind, result, layer=None):
        """Insert hidden, then show: one turn each."""
        visible = kwargs.get("visible", True)

        def add():
            if layer is not None:
                layer.visible = False
                result[i] = self.viewer.add_layer(layer)
            else:
                result[i] = getattr(self.viewer, f"add_{kind}")(data, **{**kwargs, "visible": False})
            overlays.style_layer(result[i], self.viewer)  # colour bar, 3D view of the current slice

        def show():
            if result[i] is not None and result[i] in self.viewer.layers:
                result[i].visible = True

        return [add, show] if visible else [add]

    def _remove_step(self, layer):
        def step():
            if layer in self.viewer.layers:
                remove_layer(self.viewer, layer)

        return step
