"""Parts of the "Atlas lookup" widget: where the atlas comes from, the plate gallery, the nudges.

Each part is a small Qt widget that says what changed through its signals; the widget wires them.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels, Points
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QWidget,
)

from ._pickers import LayerPicker

#: The kinds of atlas source, as shown in the source combo box.
SOURCES = ("image layer", "file or folder", "brainglobe atlas")
#: Size of a gallery thumbnail, in pixels.
THUMB = 96


class AtlasSource(QWidget):
    """The atlas to train on: an Image layer, a file or folder path, or a brainglobe atlas name.

    Also the optional annotation (a Labels layer, or a path for a file source) and the plate axis.
    ``changed`` is emitted whenever any of them changes.
    """

    changed = Signal()

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.kind = QComboBox()
        self.kind.addItems(SOURCES)
        self.layer = LayerPicker(viewer, (Image,))
        self.path = QLineEdit()
        self.path.setPlaceholderText("3D volume (NIfTI, TIFF) or folder of plate TIFFs")
        self.browse = QPushButton("file…")
        self.browse.setToolTip("Choose a volume file (NIfTI, TIFF)")
        self.browse_folder = QPushButton("folder…")
        self.browse_folder.setToolTip("Choose a folder of 2D plate images (in natural name order)")
        self.brainglobe = QLineEdit("allen_mouse_25um")
        self.brainglobe.setToolTip("A brainglobe atlas in the local cache (brainglobe install -a NAME)")
        self.annotation = LayerPicker(viewer, (Labels,), optional=True)
        self.annotation_path = QLineEdit()
        self.annotation_path.setPlaceholderText("optional labels file or folder")
        self.plate_axis = QSpinBox()
        self.plate_axis.setRange(0, 2)
        self.plate_axis.setToolTip("The axis of the volume along which the plates lie")
        path_row = QWidget()
        row = QHBoxLayout(path_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.path)
        row.addWidget(self.browse)
        row.addWidget(self.browse_folder)
        self.where = QStackedWidget()
        for w in (self.layer, path_row, self.brainglobe):
            self.where.addWidget(w)
        self.labels_where = QStackedWidget()
        for w in (self.annotation, self.annotation_path, QWidget()):
            self.labels_where.addWidget(w)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("atlas from", self.kind)
        form.addRow("atlas", self.where)
        form.addRow("annotation", self.labels_where)
        form.addRow("plate axis", self.plate_axis)
        self.kind.currentIndexChanged.connect(self._sync)
        self.browse.clicked.connect(lambda: self._browse(folder=False))
        self.browse_folder.clicked.connect(lambda: self._browse(folder=True))
        for signal in (self.layer.layer_changed, self.annotation.layer_changed):
            signal.connect(lambda *_: self.changed.emit())
        for edit in (self.path, self.brainglobe, self.annotation_path):
            edit.textChanged.connect(lambda *_: self.changed.emit())
        self.plate_axis.valueChanged.connect(lambda *_: self.changed.emit())
        self._sync()

    def _sync(self, *_) -> None:
        i = self.kind.currentIndex()
        self.where.setCurrentIndex(i)
        self.labels_where.setCurrentIndex(i)
        self.plate_axis.setEnabled(i != 2)
        self.changed.emit()

    def _browse(self, folder: bool) -> None:
        """Ask for the atlas volume file, or (``folder``) the folder of its plates."""
        if folder:
            path = QFileDialog.getExistingDirectory(self, "Folder of atlas plates")
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Atlas reference volume")
        if path:
            self.path.setText(path)

    def set_kind(self, kind: str) -> None:
        """Choose the kind of source (one of :data:`SOURCES`)."""
        self.kind.setCurrentIndex(SOURCES.index(kind))

    def spec(self) -> dict:
        """What to train on: ``kind`` and, by kind, ``layer``/``annotation`` layers, ``path``/
        ``annotation_path`` strings or ``name``; and ``plate_axis``."""
        kind = SOURCES[self.kind.currentIndex()]
        out = {"kind": kind, "plate_axis": self.plate_axis.value()}
        if kind == "image layer":
            out.update(layer=self.layer.layer(), annotation=self.annotation.layer())
        elif kind == "file or folder":
            out.update(path=self.path.text().strip(), annotation_path=self.annotation_path.text().strip())
        else:
            out.update(name=self.brainglobe.text().strip())
        return out


def thumbnail_icon(image: np.ndarray) -> QIcon:
    """A grey 2D array in [0, 1] as an icon."""
    grey = np.ascontiguousarray(np.clip(np.nan_to_num(image) * 255.0, 0, 255).astype(np.uint8))
    h, w = grey.shape
    qimage = QImage(grey.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
    return QIcon(QPixmap.fromImage(qimage))


class PlateGallery(QListWidget):
    """The top plates as thumbnails with their distances, best first; clicking one chooses it.

    ``plate_chosen(int)`` is emitted with the plate index when the choice changes (also when
    :meth:`set_hits` preselects the best).
    """

    plate_chosen = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setViewMode(QListWidget.ViewMode.IconMode)
        self.setFlow(QListWidget.Flow.LeftToRight)
        self.setWrapping(False)
        self.setIconSize(QSize(THUMB, THUMB))
        self.setMovement(QListWidget.Movement.Static)
        self.setSelectionMode(QListWidget.SelectionMode.SingleSelection)
        self.setFixedHeight(THUMB + 56)
        self.currentItemChanged.connect(self._changed)

    def set_hits(
        self, hits: list[tuple[int, float]], thumbnails: list[np.ndarray], what: str = "embedding distance"
    ) -> None:
        """Show ``hits`` ``[(plate, distance), ...]`` (best first) with a thumbnail each; choose the best.

        ``what``: the kind of distance, for the tooltips."""
        self.blockSignals(True)
        self.clear()
        for (plate, distance), thumb in zip(hits, thumbnails, strict=True):
            item = QListWidgetItem(thumbnail_icon(thumb), f"plate {int(plate)}\nd = {float(distance):.3f}")
            item.setData(Qt.ItemDataRole.UserRole, int(plate))
            item.setToolTip(f"plate {int(plate)}, {what} {float(distance):.4f}")
            self.addItem(item)
        self.blockSignals(False)
        if self.count():
            self.setCurrentRow(0)

    def plates(self) -> list[int]:
        """The plates shown, best first."""
        return [int(self.item(i).data(Qt.ItemDataRole.UserRole)) for i in range(self.count())]

    def chosen(self) -> int | None:
        """The chosen plate, or None when the gallery is empty."""
        item = self.currentItem()
        return None if item is None else int(item.data(Qt.ItemDataRole.UserRole))

    def choose(self, plate: int) -> None:
        """Select ``plate`` if it is shown, else clear the selection (a plate stepped to by hand)."""
        plates = self.plates()
        self.blockSignals(True)
        if plate in plates:
            self.setCurrentRow(plates.index(plate))
        else:
            self.setCurrentRow(-1)
        self.blockSignals(False)

    def _changed(self, current, _previous) -> None:
        if current is not None:
            self.plate_chosen.emit(int(current.data(Qt.ItemDataRole.UserRole)))


class PlateAdjust(QWidget):
    """The plate to register and its manual corrections.

    A plate number with previous / next buttons, a rotation (degrees) and a scale applied to the
    plate before registering, and optional landmark pairs (a Points layer on the section and one on
    the plate). ``plate_changed(int)`` when the number changes; ``changed`` on any change.
    """

    plate_changed = Signal(int)
    changed = Signal()

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.plate = QSpinBox()
        self.plate.setRange(0, 0)
        self.previous = QPushButton("◀")
        self.next = QPushButton("▶")
        for b, tip in ((self.previous, "previous plate"), (self.next, "next plate")):
            b.setToolTip(tip)
            b.setFixedWidth(32)
        self.rotation = QDoubleSpinBox()
        self.rotation.setRange(-180.0, 180.0)
        self.rotation.setSingleStep(2.0)
        self.rotation.setSuffix(" °")
        self.rotation.setToolTip("Rotate the plate (counter-clockwise) before registering")
        self.scale = QDoubleSpinBox()
        self.scale.setRange(0.25, 4.0)
        self.scale.setSingleStep(0.05)
        self.scale.setValue(1.0)
        self.scale.setToolTip("Scale the plate about its centre before registering")
        self.section_points = LayerPicker(viewer, (Points,), optional=True)
        self.plate_points = LayerPicker(viewer, (Points,), optional=True)
        for picker in (self.section_points, self.plate_points):
            picker.setToolTip("Landmark pairs (same order in both layers) start the registration")
        row = QWidget()
        line = QHBoxLayout(row)
        line.setContentsMargins(0, 0, 0, 0)
        line.addWidget(self.previous)
        line.addWidget(self.plate, 1)
        line.addWidget(self.next)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("plate", row)
        form.addRow("rotation", self.rotation)
        form.addRow("scale", self.scale)
        form.addRow("section landmarks", self.section_points)
        form.addRow("plate landmarks", self.plate_points)
        self.previous.clicked.connect(lambda: self.step(-1))
        self.next.clicked.connect(lambda: self.step(1))
        self.plate.valueChanged.connect(self._plate_changed)
        for signal in (self.rotation.valueChanged, self.scale.valueChanged):
            signal.connect(lambda *_: self.changed.emit())
        for picker in (self.section_points, self.plate_points):
            picker.layer_changed.connect(lambda *_: self.changed.emit())
        self.set_plates(0)

    def set_plates(self, n: int) -> None:
        """The number of plates of the atlas (0: none yet; everything disabled)."""
        self.plate.setRange(0, max(n - 1, 0))
        for w in (self.plate, self.previous, self.next):
            w.setEnabled(n > 0)

    def set_plate(self, plate: int) -> None:
        """Show ``plate`` (without emitting :attr:`plate_changed` when it is already shown)."""
        self.plate.setValue(int(plate))

    def step(self, delta: int) -> None:
        """Go ``delta`` plates forward (negative: back), within the atlas."""
        self.plate.setValue(self.plate.value() + int(delta))

    def reset(self) -> None:
        """No rotation, scale 1."""
        self.rotation.setValue(0.0)
        self.scale.setValue(1.0)

    def values(self) -> dict:
        """``plate``, ``rotation`` (degrees), ``scale`` and the landmark layers (or None)."""
        return {
            "plate": self.plate.value(),
            "rotation": self.rotation.value(),
            "scale": self.scale.value(),
            "section_points": self.section_points.layer(),
            "plate_points": self.plate_points.layer(),
        }

    def _plate_changed(self, value: int) -> None:
        self.plate_changed.emit(int(value))
        self.changed.emit()
