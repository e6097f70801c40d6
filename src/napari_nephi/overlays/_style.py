"""Styling that needs a live napari layer: the Jacobian's colour bar and 3D views of one slice.

No napari import: the functions take napari objects and use only their public API (a layer's
``colorbar``, ``data``, ``features``, ``plane``, ``world_to_data`` and events; ``viewer.dims``).
"""

from __future__ import annotations

import weakref

import numpy as np

#: ``metadata`` key of the overlays whose 3D view shows one slice (see :func:`style_layer`).
SLICE_VIEW = "view_3d"


def style_layer(layer, viewer=None) -> None:
    """Finish an overlay layer made from this package's LayerData once it is in a viewer.

    * a layer whose ``metadata`` has a ``"legend"`` (the Jacobian determinant) shows napari's
      colour bar (``layer.colorbar``: its colormap between its contrast limits);
    * with ``viewer``: a 3D deformation grid (``metadata["view_3d"] == "current slice"``) shows,
      in napari's 3D view, only the grid lines of the slice the 2D view was at (the dims point of
      its ``slice_axis``; the nearest slice with lines); in the 2D view every slice keeps its
      lines. A 3D Jacobian drawn as a plane (``depiction="plane"``) moves its plane to that slice.

    Layers this does not concern are left unchanged, so a widget may call it on every layer it
    adds: ``overlays.style_layer(layer, viewer)``. Call it again after giving a styled layer new
    data and features (a new run updating its layers in place): that applies the 3D view to them;
    until then the new data shows whole.
    """
    metadata = getattr(layer, "metadata", None) or {}
    if metadata.get("legend") and hasattr(layer, "colorbar"):
        layer.colorbar.visible = True
    if viewer is not None and metadata.get(SLICE_VIEW) == "current slice":
        if layer in _VIEWS:
            _VIEWS[layer].update()
        else:
            _VIEWS[layer] = _SliceView(layer, viewer)
            _VIEWS[layer].connect()


#: The 3D slice views made by :func:`style_layer`, one per live layer.
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _SliceView:
    """Keeps a 3D overlay on the current slice in napari's 3D view (see :func:`style_layer`)."""

    def __init__(self, layer, viewer):
        self.layer, self.viewer = layer, viewer
        self.axis = int(layer.metadata["slice_axis"])
        self.full: tuple | None = None  # (data, features) of every slice while the 3D view shows one
        self.busy = False

    def connect(self) -> None:
        # plain functions, not bound methods: napari's events hold methods only weakly, and
        # nothing else keeps this object alive
        def update(event=None):
            self.update()

        def on_new_data(event=None):
            self.on_new_data()

        self._callbacks = (update, on_new_data)
        self.viewer.dims.events.ndisplay.connect(update)
        self.viewer.dims.events.point.connect(update)
        self.layer.events.data.connect(on_new_data)
        self.update()

    def disconnect(self) -> None:
        update, on_new_data = self._callbacks
        self.viewer.dims.events.ndisplay.disconnect(update)
        self.viewer.dims.events.point.disconnect(update)
        self.layer.events.data.disconnect(on_new_data)

    def current_slice(self) -> int:
        """The slice index along ``axis`` of the viewer's dims point, in the layer's voxels."""
        point = np.asarray(self.viewer.dims.point, dtype=np.float64)[-self.layer.ndim :]
        return int(round(float(self.layer.world_to_data(point)[self.axis])))

    def on_new_data(self, event=None) -> None:
        """Data replaced from outside (a new run): that is now every slice, shown whole until the
        next :meth:`update` (the caller may still set matching features, so it is not cut here)."""
        if not self.busy:
            self.full = None

    def update(self, event=None) -> None:
        if self.layer not in self.viewer.layers:
            self.disconnect()
            _VIEWS.pop(self.layer, None)
            return
        if getattr(self.layer, "depiction", None) == "plane":
            if self.viewer.dims.ndisplay == 3:  # the plane is only drawn there
                self._move_plane()
            return
        data = self.layer.data
        if not (isinstance(data, np.ndarray) and data.ndim == 3):
            return  # only a Vectors grid ((N, 2, D) segments) is cut; Shapes paths show every slice
        three_d = self.viewer.dims.ndisplay == 3
        if not three_d and self.full is None:
            return
        self.busy = True
        try:
            if self.full is None:
                self.full = (np.asarray(self.layer.data), self.layer.features.copy())
            data, features = self.full
            if three_d:
                keep = slice_rows(data, self.axis, self.current_slice())
                data, features = data[keep], features.iloc[keep].reset_index(drop=True)
            else:
                self.full = None
            self.layer.data = data
            self.layer.features = features
        finally:
            self.busy = False

    def _move_plane(self) -> None:
        position = list(self.layer.plane.position)
        position[self.axis] = float(self.current_slice())
        self.layer.plane.position = tuple(position)


def slice_rows(segments: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Indices of the Vectors ``segments`` ``(N, 2, D)`` on the grid slice nearest to ``index``."""
    starts = np.asarray(segments)[:, 0, axis]
    if len(starts) == 0:
        return np.zeros(0, dtype=np.int64)
    levels = np.unique(starts)
    nearest = levels[np.argmin(np.abs(levels - index))]
    return np.flatnonzero(starts == nearest)
