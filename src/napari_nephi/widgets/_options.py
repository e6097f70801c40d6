"""The options panel of the registration widget: method, parameters and device."""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QSpinBox, QWidget

from ..core.device import available_devices
from ..core.registration import available_methods

AFFINE_KINDS = ("rigid", "similarity", "affine", "translation")
SIMILARITIES = ("ncc", "mse", "nmi", "lncc")


class RegistrationOptions(QWidget):
    """Method-specific settings as a dict ready for ``napari_nephi.register``."""

    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        form = QFormLayout(self)
        self.method = QComboBox()
        self.method.addItems(available_methods())
        self.method.setCurrentText("affine")
        self.kind = QComboBox()
        self.kind.addItems(AFFINE_KINDS)
        self.kind.setCurrentText("affine")
        self.similarity = QComboBox()
        self.similarity.addItems(SIMILARITIES)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 100000)
        self.iterations.setValue(150)
        self.levels = QSpinBox()
        self.levels.setRange(1, 8)
        self.levels.setValue(3)
        self.device = QComboBox()
        for value, label in [("auto", "auto")] + available_devices():
            self.device.addItem(label, value)
        form.addRow("method", self.method)
        form.addRow("transform", self.kind)
        form.addRow("similarity", self.similarity)
        form.addRow("iterations / level", self.iterations)
        form.addRow("resolution levels", self.levels)
        form.addRow("device", self.device)
        for w in (self.method, self.kind, self.similarity, self.device):
            w.currentIndexChanged.connect(self._on_change)
        for w in (self.iterations, self.levels):
            w.valueChanged.connect(self._on_change)
        self._on_change()

    def _on_change(self, *_):
        affine = self.method.currentText() == "affine"
        self.kind.setEnabled(affine)
        self.similarity.setEnabled(affine)
        self.changed.emit()

    def values(self) -> dict:
        opts = {
            "method": self.method.currentText(),
            "device": self.device.currentData(),
            "iterations": self.iterations.value(),
            "levels": self.levels.value(),
        }
        if opts["method"] == "affine":
            opts["kind"] = self.kind.currentText()
            opts["similarity"] = self.similarity.currentText()
        return opts
