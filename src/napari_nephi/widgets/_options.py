"""The options panel of the registration widget: method, its parameters and the device.

Method-specific rows are shown only for their method, and the shared ones (iterations,
resolution levels) only for methods whose engine takes them; ``values()`` returns just the
options that method's engine takes (``engine_info(method).options``), ready for
``napari_nephi.register``. A value of 0 in an "auto" spin box means
"use the engine's default or preset". The rows most runs leave alone sit in a folded "advanced
options" section (:func:`folded`), so the dock stays short.
"""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..core.device import available_devices
from ..engines.nephi import engine as nephi_engine
from ..engines.nephi.initial import INITIALS
from ..engines.nephi.weights import BUILTIN, DEFAULTS
from ..engines.registry import available_methods, engine_info

AFFINE_KINDS = ("rigid", "similarity", "affine", "translation")
AFFINE_SIMILARITIES = ("ncc", "mse", "nmi", "lncc")
NEPHI_MODES = ("optimize", "predict", "predict+refine")
NEPHI_PRESETS = ("fast", "accurate")
NEPHI_REGULARIZERS = ("gradicon", "jacobian", "symmetric_jacobian", "bending", "diffusion", "cycle")
NEPHI_REPRESENTATIONS = ("modulated", "siren", "relu_fourier")
#: Global stage of a NePhi run: "auto" leaves it to the engine (affine when optimising, none when
#: predicting), the others are the engine's ``initial`` values.
NEPHI_INITIALS = ("auto", *INITIALS)
#: The coarse stage's warp blur on volumes (the engine's ``coarse_warp_blur``): "default" leaves it to the
#: engine (on, with its bending weight 0.03 and no neural steps, on volumes up to
#: ``engine.VOLUME_DEFAULT_MAX_VOXELS`` in optimize mode with the fast preset, not divided, and with the
#: preset's neural steps up to ``engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS`` since session 40; the earlier
#: default otherwise); "off" gives the earlier volume default at any size (no blur, weight 0.1, the preset's
#: neural steps). 2D ignores it. No "on": the option ``"all"`` above the second cap keeps weight 0.1 and the
#: neural steps, a combination never measured (review 1 of session 38, B4); Python and ``--option`` still
#: reach it.
NEPHI_WARP_BLURS = {"default": None, "off": False}


def model_placeholder() -> str:
    """Hint of the model field: the built-in models by name, and that empty means the default."""
    defaults = ", ".join(f"{name} in {d}D" for d, name in sorted(DEFAULTS.items()))
    return f"default ({defaults}); built-in {', '.join(BUILTIN)}; or a model file (.pt)"


def _combo(items, current=None) -> QComboBox:
    box = QComboBox()
    box.addItems(list(items))
    if current is not None:
        box.setCurrentText(current)
    return box


def folded(title: str, content: QWidget) -> QCollapsible:
    """A section that shows ``content`` when its title is clicked; closed at first."""
    section = QCollapsible(title, expandedIcon="▼", collapsedIcon="▶")
    section.setDuration(0)  # no animation: the dock's height follows at once
    section.addWidget(content)
    section.layout().setContentsMargins(0, 0, 0, 0)
    return section


def refold(section: QCollapsible) -> None:
    """Make an open section take its content's new height (after rows were shown or hidden)."""
    if section.isExpanded():
        section.expand(animate=False)


def _auto_spin(maximum: int, step: int = 1) -> QSpinBox:
    box = QSpinBox()
    box.setRange(0, maximum)
    box.setSingleStep(step)
    box.setSpecialValueText("auto")
    return box


class RegistrationOptions(QWidget):
    """Method-specific settings as a dict ready for ``napari_nephi.register``."""

    changed = Signal()

    def __init__(self, method: str = "affine", parent=None):
        super().__init__(parent)
        self.form = QFormLayout()
        self.advanced_form = QFormLayout()
        # whole-slide engines (histology) have their own widget and return a pyramid, not an image
        methods = [m for m in available_methods() if not engine_info(m).whole_slides]
        self.method = _combo(methods, method if method in methods else methods[0])
        self.iterations = _auto_spin(100000)
        self.levels = _auto_spin(8)
        self.device = QComboBox()
        for value, label in [("auto", "auto")] + available_devices():
            self.device.addItem(label, value)
        # affine
        self.kind = _combo(AFFINE_KINDS, "affine")
        self.similarity = _combo(AFFINE_SIMILARITIES)
        # nephi
        self.mode = _combo(NEPHI_MODES)
        self.preset = _combo(NEPHI_PRESETS)
        self.regularizer = _combo(NEPHI_REGULARIZERS)
        self.representation = _combo(NEPHI_REPRESENTATIONS)
        self.initial = _combo(NEPHI_INITIALS)
        self.warp_blur = _combo(NEPHI_WARP_BLURS)
        # the caps are read here, when the panel is built, so a cap set at run time is the one named
        first_cap = nephi_engine.VOLUME_DEFAULT_MAX_VOXELS
        steps_cap = nephi_engine.VOLUME_DEFAULT_STEPS_MAX_VOXELS
        self.warp_blur.setToolTip(
            "Volumes (coarse_warp_blur): default: the coarse stage matches the trilinear warp's smoothing, "
            f"bending weight 0.03, no neural steps, on volumes up to {first_cap:,} voxels in "
            "optimize mode with the fast preset, not divided"
            + (f" (with the preset's neural steps up to {steps_cap:,})" if steps_cap else "")
            + " (otherwise: the earlier default); off: the "
            "earlier volume default at any size (no blur, weight 0.1, the preset's neural steps)."
        )
        self.reg_weight = QDoubleSpinBox()
        self.reg_weight.setRange(0.0, 1000.0)
        self.reg_weight.setDecimals(4)
        self.reg_weight.setSingleStep(0.01)
        self.reg_weight.setSpecialValueText("auto")
        self.sample_points = _auto_spin(10_000_000, 1024)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText(model_placeholder())
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_path)
        model_row.addWidget(browse)
        self.model_row = QWidget()
        self.model_row.setLayout(model_row)
        model_row.setContentsMargins(0, 0, 0, 0)

        # (label, widget, advanced) per method: advanced rows go in the folded section
        self._rows = {
            "affine": [("transform", self.kind, False), ("similarity", self.similarity, True)],
            "nephi": [
                ("mode", self.mode, False),
                ("preset", self.preset, False),
                ("model file", self.model_row, False),
                ("global stage", self.initial, True),
                ("coarse warp blur (3D)", self.warp_blur, True),
                ("regulariser", self.regularizer, True),
                ("regularisation weight", self.reg_weight, True),
                ("representation", self.representation, True),
                ("sampled points", self.sample_points, True),
            ],
        }
        self.form.addRow("method", self.method)
        for rows in self._rows.values():
            for label, widget, advanced in rows:
                (self.advanced_form if advanced else self.form).addRow(label, widget)
        #: rows of options several engines take: (option name, widget), shown where the engine takes it
        self._shared = [("iterations", self.iterations), ("levels", self.levels)]
        self.advanced_form.addRow("iterations", self.iterations)
        self.advanced_form.addRow("resolution levels", self.levels)
        self.advanced_form.addRow("device", self.device)
        advanced = QWidget()
        advanced.setLayout(self.advanced_form)
        self.advanced = folded("advanced options", advanced)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(self.form)
        box.addWidget(self.advanced)
        for w in (self.method, self.kind, self.similarity, self.device, self.mode, self.preset,
                  self.regularizer, self.representation, self.initial, self.warp_blur):  # fmt: skip
            w.currentIndexChanged.connect(self._on_change)
        for w in (self.iterations, self.levels, self.sample_points, self.reg_weight):
            w.valueChanged.connect(self._on_change)
        self.model_path.textChanged.connect(self._on_change)
        self._on_change()

    def _browse_model(self) -> None:
        path = QFileDialog.getOpenFileName(self, "Trained NePhi model", filter="PyTorch (*.pt *.pth)")[0]
        if path:
            self.model_path.setText(path)

    def _on_change(self, *_):
        method = self.method.currentText()
        for name, rows in self._rows.items():
            for _label, widget, advanced in rows:
                self._set_row_visible(self.advanced_form if advanced else self.form, widget, name == method)
        for option, widget in self._shared:
            self._set_row_visible(self.advanced_form, widget, self._takes(method, option))
        self.model_row.setEnabled(self.mode.currentText() != "optimize")
        refold(self.advanced)
        self.changed.emit()

    @staticmethod
    def _set_row_visible(form: QFormLayout, widget: QWidget, visible: bool) -> None:
        label = form.labelForField(widget)
        widget.setVisible(visible)
        if label is not None:
            label.setVisible(visible)

    @staticmethod
    def _takes(method: str, option: str) -> bool:
        """Whether the engine ``method`` takes ``option`` (one taking ``**kwargs`` takes any)."""
        valid = engine_info(method).options
        return valid is None or option in valid

    def values(self) -> dict:
        """Options for ``register``: only those the chosen engine takes; "auto" values are left out
        so the engine decides."""
        method = self.method.currentText()
        opts: dict = {"method": method, "device": self.device.currentData()}
        for option, widget in self._shared:
            if widget.value() and self._takes(method, option):
                opts[option] = widget.value()
        if method == "affine":
            opts["kind"] = self.kind.currentText()
            opts["similarity"] = self.similarity.currentText()
        elif method == "nephi":
            opts["mode"] = self.mode.currentText()
            opts["preset"] = self.preset.currentText()
            opts["regularizer"] = self.regularizer.currentText()
            opts["representation"] = self.representation.currentText()
            if self.reg_weight.value() > 0:
                opts["reg_weight"] = self.reg_weight.value()
            if self.sample_points.value():
                opts["sample_points"] = self.sample_points.value()
            if self.initial.currentText() != "auto":
                opts["initial"] = self.initial.currentText()
            if NEPHI_WARP_BLURS[self.warp_blur.currentText()] is not None:
                opts["coarse_warp_blur"] = NEPHI_WARP_BLURS[self.warp_blur.currentText()]
            if opts["mode"] != "optimize" and self.model_path.text().strip():
                opts["weights"] = self.model_path.text().strip()  # else the engine's default model
        return {k: v for k, v in opts.items() if k in ("method", "device") or self._takes(method, k)}
