"""Put result layers in the viewer, replacing the previous run's instead of piling up."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from qtpy.QtCore import QTimer

#: Pause between two layer changes of :meth:`ResultLayers.show_gradually`, in milliseconds. A
#: timer (not a zero-delay call, which Qt runs before pending timers and input) lets the event
#: loop draw the canvas and answer the user between two changes.
STEP_MS = 15

#: Name of the short-lived layers :func:`warm_up` adds and removes.
WARM_UP_NAME = "napari-nephi warm-up"

#: Keyword arguments that follow the data when a layer of a previous run is updated in place. The
#: look the user may have changed (colormap, opacity, blending, visibility) is kept.
_DATA_KWARGS = ("scale", "translate", "metadata", "contrast_limits", "features")

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


@contextlib.contextmanager
def not_selected(viewer) -> Iterator[None]:
    """Add layers without selecting them.

    napari makes every new layer the selected one, which swaps the layer-controls panel and
    restyles the viewer buttons: 15-20 ms of GUI time a layer that nobody asked for. This uses
    the layer list's ``_activate_on_insert`` switch where the napari version has it.
    """
    layers = viewer.layers
    flag = getattr(layers, "_activate_on_insert", None)
    if not isinstance(flag, bool):
        yield
        return
    layers._activate_on_insert = False
    try:
        yield
    finally:
        layers._activate_on_insert = flag


def _controls_container(viewer):
    """napari's layer-controls stack (``QtLayerControlsContainer``), where it builds each layer's
    controls on insert; ``None`` where this napari has no such stack or builds them on selection."""
    controls = getattr(getattr(getattr(viewer, "window", None), "_qt_viewer", None), "controls", None)
    if not callable(getattr(controls, "_add", None)) or not isinstance(
        getattr(controls, "widgets", None), dict
    ):
        return None
    try:
        from napari.settings import get_settings

        if get_settings().experimental.dynamic_layer_controls:
            return None
    except (ImportError, AttributeError):
        return None
    return controls


@contextlib.contextmanager
def controls_later(viewer) -> Iterator[Callable[[], None]]:
    """Insert layers without building their layer-controls widgets; yields the function that builds
    them, to be called in a later turn of the event loop.

    napari builds the controls panel of every new layer in the same turn as the insert (about 40 %
    of a new layer's 85-105 ms of GUI time here), so an insert is one stall over the 100 ms target;
    split in two, each half stays well under it. Until the build, each new layer has an empty
    placeholder panel, so napari's own handlers (selecting the layer, removing it) find one.
    """
    controls = _controls_container(viewer)
    if controls is None:
        yield lambda: None
        return
    from qtpy.QtWidgets import QWidget

    inserted = viewer.layers.events.inserted
    pending: list = []

    def placeholder(event) -> None:
        panel = QWidget()
        controls.addWidget(panel)
        controls.widgets[event.value] = panel
        pending.append((event.value, panel))

    def build() -> None:
        if not viewer_open(viewer):  # closed meanwhile: its panels are gone with the window
            pending.clear()
            return
        for layer, panel in pending:
            if controls.widgets.get(layer) is not panel:  # removed (and its panel with it) meanwhile
                continue
            controls.removeWidget(panel)
            panel.deleteLater()
            del controls.widgets[layer]
            controls._add(_Inserted(layer))
            if viewer.layers.selection.active is layer:
                controls.setCurrentWidget(controls.widgets[layer])
        pending.clear()

    inserted.disconnect(controls._add)
    inserted.connect(placeholder)
    try:
        yield build
    finally:
        inserted.disconnect(placeholder)
        inserted.connect(controls._add)


class _Inserted:
    """The part of napari's ``inserted`` event its controls stack reads."""

    def __init__(self, value):
        self.value = value


def viewer_open(viewer) -> bool:
    """False once the viewer's window has been closed (napari then drops ``window._qt_window``)."""
    window = getattr(viewer, "window", None)
    return window is None or hasattr(window, "_qt_window")


def warm_up(
    viewer,
    cancelled: Callable[[], bool] = lambda: False,
    done: Callable[[], None] | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Pay napari's once-per-viewer costs of showing results now, one step per event-loop turn.

    The first Labels layer of a viewer costs ~50 ms more than later ones (vispy builds the
    machinery of its polygon tool) and the first layer that draws text (any Points, Shapes or
    Vectors layer; text or not) renders the font's glyphs, ~50 ms. A tiny hidden Labels layer and
    an empty Points layer are added and removed, each in its own turn, unless the viewer has such
    layers already. Meant for when a widget opens: it starts once ``ready()`` (background imports
    done), ``cancelled()`` stops it (a run started) and ``done()`` is called at the end.
    """
    from napari.layers import Labels, Points, Shapes, Vectors

    window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    if window is None or window.property("napari_nephi_warm") or len(viewer.layers) == 0:
        if done is not None:
            done()
        return
    window.setProperty("napari_nephi_warm", True)
    made: list = []
    steps: list[Callable[[], None]] = []

    def adder(make):
        def step():
            with not_selected(viewer):
                made.append(viewer.add_layer(make()))

        return step

    def remover():
        while made:
            layer = made.pop()
            if layer in viewer.layers:
                remove_layer(viewer, layer)

    if not any(isinstance(ly, Labels) for ly in viewer.layers):
        ndim = viewer.dims.ndim
        steps += [
            adder(lambda: Labels(np.zeros((1,) * ndim, np.uint8), name=WARM_UP_NAME, visible=False)),
            remover,
        ]
    if not any(isinstance(ly, Points | Shapes | Vectors) for ly in viewer.layers):
        steps += [adder(lambda: Points(np.zeros((0, 2)), name=WARM_UP_NAME)), remover]

    def run(k: int = 0):
        if not viewer_open(viewer):
            return
        if cancelled():
            remover()
            k = len(steps)
        elif k == 0 and not ready():
            QTimer.singleShot(4 * STEP_MS, run)
            return
        if k < len(steps):
            steps[k]()
            QTimer.singleShot(STEP_MS, lambda: run(k + 1))
        elif done is not None:
            done()

    run()


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
    for key in _DATA_KWARGS:
        if key in kwargs:
            setattr(layer, key, kwargs[key])
    if "translate" not in kwargs:
        layer.translate = np.zeros(len(layer.translate))
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
    """Adds LayerData tuples to a viewer; a later :meth:`show` replaces the earlier layers."""

    def __init__(self, viewer):
        self.viewer = viewer
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
        A new layer is added hidden and shown in a later turn: adding it and drawing it the first
        time (shader compilation) are the two expensive parts. ``prebuilt`` may give, per entry, a
        napari layer already made from it off the GUI thread (hidden), to add instead of making one
        here. Layers of the previous run that the new one does not have are removed last.
        ``done(layers)`` is called at the end.
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

        def finish():
            self._layers = [ly for ly in result if ly is not None]
            self._roles = {id(ly): key for ly, key in zip(result, keys, strict=True) if ly is not None}
            if done is not None:
                done(self._layers)

        def run(k: int = 0):
            if not viewer_open(self.viewer):
                return
            if k < len(steps):
                steps[k]()
                self._layers = [ly for ly in result if ly is not None]
                QTimer.singleShot(STEP_MS, lambda: run(k + 1))
            else:
                finish()

        run()

    def _update_step(self, i, layer, data, kwargs, kind, result, restyle=False):
        def step():
            update_layer(layer, data, kwargs, kind, restyle)
            result[i] = layer

        return step

    def _add_steps(self, i, data, kwargs, kind, result, layer=None):
        """Insert (hidden, controls not built), build the layer's controls, show: one turn each."""
        visible = kwargs.get("visible", True)
        build: list[Callable[[], None]] = []

        def add():
            with not_selected(self.viewer), controls_later(self.viewer) as later:
                if layer is not None:
                    layer.visible = False
                    result[i] = self.viewer.add_layer(layer)
                else:
                    result[i] = getattr(self.viewer, f"add_{kind}")(data, **{**kwargs, "visible": False})
            build.append(later)

        def controls():
            while build:
                build.pop()()

        def show():
            if result[i] is not None and result[i] in self.viewer.layers:
                result[i].visible = True

        return [add, controls, show] if visible else [add, controls]

    def _remove_step(self, layer):
        def step():
            if layer in self.viewer.layers:
                remove_layer(self.viewer, layer)

        return step
