"""A combo box of viewer layers that follows the layer list."""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox

NONE_TEXT = "(none)"


class LayerPicker(QComboBox):
    """Lists the viewer's layers of ``layer_types``; keeps up with adds, removals and renames."""

    layer_changed = Signal(object)

    def __init__(self, viewer, layer_types: tuple, optional: bool = False, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.layer_types = layer_types
        self.optional = optional
        self._layers: list = []
        events = viewer.layers.events
        self._viewer_events = (events.inserted, events.removed, events.reordered)
        for event in self._viewer_events:
            event.connect(self.refresh)
        self.destroyed.connect(lambda *_: self._let_go())
        self.currentIndexChanged.connect(lambda _: self.layer_changed.emit(self.layer()))
        self.refresh()

    def refresh(self, event=None) -> None:
        current = self.layer()
        for layer in self._layers:
            layer.events.name.disconnect(self.refresh)
        self._layers = [ly for ly in self.viewer.layers if isinstance(ly, self.layer_types)]
        for layer in self._layers:
            layer.events.name.connect(self.refresh)
        self.blockSignals(True)
        self.clear()
        if self.optional:
            self.addItem(NONE_TEXT)
        for layer in self._layers:
            self.addItem(layer.name)
        if current is not None and current in self._layers:
            self.setCurrentIndex(self._layers.index(current) + int(self.optional))
        self.blockSignals(False)
        if self.layer() is not current:
            self.layer_changed.emit(self.layer())

    def _let_go(self) -> None:
        """Disconnect from the viewer's and the layers' events (this picker is being deleted)."""
        for event in self._viewer_events:
            event.disconnect(self.refresh)
        for layer in self._layers:
            layer.events.name.disconnect(self.refresh)
        self._layers = []

    def layers(self) -> list:
        """The layers it lists, in the viewer's order."""
        return list(self._layers)

    def layer(self):
        """The chosen layer, or None."""
        i = self.currentIndex() - int(self.optional)
        if 0 <= i < len(self._layers):
            return self._layers[i]
        return None

    def set_layer(self, layer) -> None:
        """Choose ``layer`` if it is listed; ``None`` chooses "(none)" in an optional picker."""
        if layer is None and self.optional:
            self.setCurrentIndex(0)
        elif layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer) + int(self.optional))
