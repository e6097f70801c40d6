"""Parts of the "Histology registration" widget: slide pickers with pixel sizes, options, stage bars.

Each part is a plain Qt widget that reports through signals and has no numerical work: the widget
(:mod:`.histology_widget`) assembles them.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..io.slides import um_per_unit
from ._options import folded
from ._pickers import LayerPicker

#: The engine's stages, in the order they run, and how the widget labels them.
STAGES = ("rigid", "affine", "nonrigid", "refine")
STAGE_LABELS = {
    "rigid": ("rigid", "Low resolution: any rotation, mirrored slides"),
    "affine": ("affine network", "Multi-magnification local-affine network at the working level"),
    "nonrigid": ("non-rigid network", "Multi-magnification non-rigid network at the working level"),
    "refine": ("refinement", "Tile-wise instance optimisation at a finer level"),
}
#: Stain channels offered. "fluorescence": a grey slide layer is the nuclear channel (DAPI) of a
#: fluorescence image (napari shows one layer per channel), compared with the brightfield slide's
#: haematoxylin (the engine's ``channel="hematoxylin"``).
CHANNELS = ("auto", "hematoxylin", "od", "grey", "fluorescence")
#: What each entry of :data:`CHANNELS` asks the engine for.
ENGINE_CHANNEL = {**{c: c for c in CHANNELS[:-1]}, "fluorescence": "hematoxylin"}


def stage_of(name: str) -> str | None:
    """The stage (one of :data:`STAGES`) a progress event's ``stage`` text belongs to, or None."""
    first = name.split(":")[0].split(" ")[0].strip().lower()
    return first if first in STAGES else None


class SlideChooser(QWidget):
    """An Image layer picker and the slide's level-0 pixel size in um/px.

    The size comes from the layer's scale, converted to um when the layer's metadata gives its unit
    (napari-nephi's reader sets it for a file with a pixel size: such a size is known, even a 10x
    scan at 1 um/px). Otherwise a scale of 1 (napari's default) means "unknown", as does a unit that
    is no length ("pixel"): the user types the size (which confirms it) or ticks "confirmed".
    """

    changed = Signal()

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.picker = narrow(LayerPicker(viewer, (Image,)))
        self.size = QDoubleSpinBox()
        self.size.setRange(0.0001, 10000.0)
        self.size.setDecimals(4)
        self.size.setSuffix(" um/px")
        self.size.setToolTip("Level-0 pixel size (e.g. 0.25 at 40x, 0.5 at 20x)")
        self.confirmed = QCheckBox("confirmed")
        self.confirmed.setToolTip("Tick when the pixel size shown is right")
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.picker)
        row = QHBoxLayout()
        row.addWidget(self.size, 1)
        row.addWidget(self.confirmed)
        box.addLayout(row)
        self.picker.layer_changed.connect(self._follow_layer)
        self.size.valueChanged.connect(self._typed)
        self.confirmed.toggled.connect(lambda *_: self.changed.emit())
        self._follow_layer(self.picker.layer())

    def layer(self):
        """The chosen Image layer, or None."""
        return self.picker.layer()

    def set_layer(self, layer) -> None:
        self.picker.set_layer(layer)

    def _follow_layer(self, layer) -> None:
        scale = np.ones(2) if layer is None else np.asarray(layer.scale[-2:], float)
        unit = None if layer is None else (layer.metadata or {}).get("unit")
        factor = um_per_unit(unit)
        self.size.blockSignals(True)
        self.size.setValue(float(np.mean(scale)) * (factor or 1.0))
        self.size.blockSignals(False)
        known = factor is not None if unit else not np.allclose(scale, 1.0)
        self.confirmed.setChecked(layer is not None and known)
        self.changed.emit()

    def _typed(self, _value) -> None:
        self.confirmed.setChecked(True)
        self.changed.emit()

    def pixel_size(self) -> float | None:
        """The confirmed pixel size in um/px, or None while it is unknown."""
        return float(self.size.value()) if self.confirmed.isChecked() else None

    def set_pixel_size(self, um: float) -> None:
        """Set (and so confirm) the pixel size."""
        self.size.setValue(float(um))
        self.confirmed.setChecked(True)


class HistologyOptions(QWidget):
    """The engine's options: channel, flips, working level, stages, iterations, refinement level."""

    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.channel = QComboBox()
        self.channel.addItems(CHANNELS)
        self.channel.setToolTip(
            "Stain channel compared across slides: auto, haematoxylin, optical density, grey, or "
            "fluorescence: a slide is the nuclear channel layer (DAPI) of a fluorescence image, compared "
            "with the other slide's haematoxylin"
        )
        self.allow_flip = QCheckBox("mirrored slides")
        self.allow_flip.setToolTip("Slides may be mounted mirrored (a flip is searched too)")
        self.allow_flip.setChecked(True)
        self.working_um = _auto_um("Pixel size of the networks' level (auto: about 2048 px across)")
        self.refine_um = _auto_um("Pixel size of the refinement (auto: half the working level's)")
        self.stages = {s: QCheckBox(STAGE_LABELS[s][0]) for s in STAGES}
        for s, box in self.stages.items():
            box.setChecked(True)
            box.setToolTip(STAGE_LABELS[s][1])
        self.affine_iterations = _spin(1, 10, 2, "Iterations of the local-affine network (MASN(k))")
        self.nonrigid_iterations = _spin(1, 10, 1, "Iterations of the non-rigid network")
        stages = QVBoxLayout()
        for box in self.stages.values():
            stages.addWidget(box)
        form = QFormLayout()
        form.addRow("stain channel", self.channel)
        form.addRow("flips", self.allow_flip)
        form.addRow("working level", self.working_um)
        form.addRow("stages", stages)
        advanced = QWidget()
        more = QFormLayout(advanced)
        more.addRow("affine iterations", self.affine_iterations)
        more.addRow("non-rigid iterations", self.nonrigid_iterations)
        more.addRow("refinement level", self.refine_um)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(form)
        box.addWidget(folded("advanced options", advanced))
        self.channel.currentIndexChanged.connect(self._on_change)
        for w in (self.affine_iterations, self.nonrigid_iterations):
            w.valueChanged.connect(self._on_change)
        for w in (self.working_um, self.refine_um):
            w.valueChanged.connect(self._on_change)
        for w in (self.allow_flip, *self.stages.values()):
            w.toggled.connect(self._on_change)

    def _on_change(self, *_) -> None:
        self.changed.emit()

    def chosen_stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if self.stages[s].isChecked())

    def values(self) -> dict:
        """Keyword options of ``register(..., method="histology")``; "auto" values are left out."""
        opts: dict = {
            "channel": ENGINE_CHANNEL[self.channel.currentText()],
            "allow_flip": self.allow_flip.isChecked(),
            "stages": self.chosen_stages(),
            "affine_iterations": self.affine_iterations.value(),
            "nonrigid_iterations": self.nonrigid_iterations.value(),
        }
        for name, box in (("working_um", self.working_um), ("refine_um", self.refine_um)):
            if box.value() > 0:
                opts[name] = float(box.value())
        return opts


class StageProgress(QWidget):
    """One progress bar per chosen stage; a later stage's first event completes the earlier ones."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.bars = {s: QProgressBar() for s in STAGES}
        self.labels = {s: QLabel(s) for s in STAGES}
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        for s in STAGES:
            self.bars[s].setFormat(f"{s} %p%")
            form.addRow(self.labels[s], self.bars[s])
        self._shown: tuple[str, ...] = ()
        self.start(())

    def start(self, stages) -> None:
        """Show empty bars for ``stages`` only."""
        self._shown = tuple(s for s in STAGES if s in stages)
        for s in STAGES:
            self.bars[s].setRange(0, 1)
            self.bars[s].setValue(0)
            self.bars[s].setVisible(s in self._shown)
            self.labels[s].setVisible(s in self._shown)

    def advance(self, event) -> str | None:
        """Move the bar of the event's stage; returns that stage (None for other events)."""
        stage = stage_of(event.stage or "")
        if stage is None or stage not in self._shown:
            return None
        for earlier in self._shown[: self._shown.index(stage)]:
            self._fill(earlier)
        bar = self.bars[stage]
        bar.setRange(0, max(int(event.total), 1))
        bar.setValue(min(max(int(event.step), 0), bar.maximum()))
        return stage

    def _fill(self, stage: str) -> None:
        bar = self.bars[stage]
        bar.setValue(bar.maximum())

    def finish(self) -> None:
        """Every shown stage is done."""
        for s in self._shown:
            self._fill(s)

    def values(self) -> dict[str, float]:
        """Fraction done per shown stage."""
        return {s: self.bars[s].value() / max(self.bars[s].maximum(), 1) for s in self._shown}


def narrow(box: QComboBox, letters: int = 14) -> QComboBox:
    """A combo box whose width does not grow with long layer names (the dock stays narrow)."""
    box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(letters)
    return box


def _auto_um(tip: str) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(0.0, 10000.0)
    box.setDecimals(3)
    box.setSuffix(" um/px")
    box.setSpecialValueText("auto")
    box.setToolTip(tip)
    return box


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setValue(value)
    box.setToolTip(tip)
    return box


class SlidePreview:
    """One Image layer showing the engine's low-resolution previews, updated in place."""

    def __init__(self, viewer):
        self.viewer = viewer
        self.layer = None

    def show(self, data, where: dict, name: str):
        """Show ``data`` (grey or RGB) at ``where`` (layer ``scale`` and ``translate``); returns the layer."""
        data = np.asarray(data)
        rgb = data.ndim == 3 and data.shape[-1] in (3, 4)
        layer = self.layer
        if (
            layer is not None
            and layer in self.viewer.layers
            and layer.rgb == rgb
            and layer.data.ndim == data.ndim
        ):
            layer.data = data
            layer.scale, layer.translate = where["scale"], where["translate"]
            return layer
        self.remove()
        self.layer = self.viewer.add_image(data, name=name, rgb=rgb, opacity=0.6, **where)
        return self.layer

    def remove(self) -> None:
        layer, self.layer = self.layer, None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
