"""Put result layers in the viewer, replacing the previous run's instead of piling up."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QTimer


class ResultLayers:
    """Adds LayerData tuples to a viewer; a later :meth:`show` replaces the earlier layers."""

    def __init__(self, viewer):
        self.viewer = viewer
        self._layers: list = []

    @property
    def layers(self) -> list:
        return [ly for ly in self._layers if ly in self.viewer.layers]

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
        return new

    def show_gradually(self, layer_data: list, done: Callable[[list], None] | None = None) -> None:
        """Like :meth:`show`, one layer per turn of the event loop so the GUI keeps responding."""
        old = self.layers
        self._layers = []
        queue = list(layer_data)
        added: list = []

        def step():
            if old:
                self.viewer.layers.remove(old.pop())
            elif queue:
                data, kwargs, kind = queue.pop(0)
                added.append(getattr(self.viewer, f"add_{kind}")(data, **kwargs))
                self._layers = list(added)
            if old or queue:
                QTimer.singleShot(0, step)
            elif done is not None:
                done(added)

        step()
