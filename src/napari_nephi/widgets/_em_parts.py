"""Parts of the EM stack alignment widget: options, the report table and the inliers plot."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..engines.mito.detrend import (
    DEFAULT_DRIFT_CORRECTION,
    DEFAULT_REFERENCE,
    DRIFT_CORRECTIONS,
    MIN_WINDOW,
    SERIAL_SECTIONS,
)
from ..engines.mito.distortion import DEFAULT_ELASTIC
from ..engines.mito.elastic import ELASTIC_SOLVER, ELASTIC_SOLVERS, default_solver
from ..engines.mito.features import DESCRIPTORS, DETECTORS, MATCHERS, MODELS
from ..engines.mito.organelles import DEFAULT_READING, READINGS
from ..engines.mito.solve import DRIFT_PRIOR, GLOBAL_MODEL, GLOBAL_MODELS, NEIGHBOURS
from ._options import folded
from ._plot import CurvePlot

#: (report key, column title) of the report table.
COLUMNS = (
    ("section", "section"),
    ("neighbour", "to"),
    ("keypoints", "keypoints"),
    ("matches", "matches"),
    ("inliers", "inliers"),
    ("reprojection_error", "error px"),
    ("model", "model"),
    ("refined", "refined"),
    ("tracking_error", "track px"),
    ("failed", "failed"),
    ("fallback", "fallback"),
)


class EMOptions(QWidget):
    """Alignment options as keyword arguments of ``napari_nephi.engines.mito.align_stack``.

    Detector, descriptor, matcher and model are shown; the rest sits in a folded "advanced
    options" section.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        form = QFormLayout()
        more = QFormLayout()
        self.detector = QComboBox()
        self.detector.addItems(DETECTORS)
        self.descriptor = QComboBox()
        self.descriptor.addItems(DESCRIPTORS)
        self.matcher = QComboBox()
        self.matcher.addItems(MATCHERS)
        self.model = QComboBox()
        self.model.addItems(MODELS)
        self.model_selection = QCheckBox("prefer simpler models when as good")
        self.model_selection.setChecked(True)
        self.refine = QCheckBox("sub-pixel refinement (track keypoints)")
        self.refine.setChecked(True)
        self.refine.setToolTip(
            "Refine each pair map by Lucas-Kanade tracking of the keypoints; keeps long stacks from drifting"
        )
        self.use_masks = QCheckBox("restrict keypoints to the masks")
        self.middle = QCheckBox("middle section")
        self.reference = QSpinBox()
        self.reference.setRange(-1, 1_000_000)  # -1: "auto" (section 0, the middle where drift is removed)
        self.reference.setSpecialValueText("auto")
        self.reference.setValue(-1 if DEFAULT_REFERENCE == "auto" else int(DEFAULT_REFERENCE))
        self.reference.setToolTip(
            "auto: section 0, or the middle section where the drift correction removes a drift (what the "
            "keypoints cannot see grows from the reference)"
        )
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.1, 100.0)
        self.threshold.setSingleStep(0.5)
        self.threshold.setValue(3.0)
        self.threshold.setSuffix(" px")
        self.ratio = QDoubleSpinBox()
        self.ratio.setRange(0.05, 1.0)
        self.ratio.setSingleStep(0.05)
        self.ratio.setValue(0.8)
        self.max_keypoints = QSpinBox()
        self.max_keypoints.setRange(10, 100_000)
        self.max_keypoints.setValue(1000)
        self.workers = QSpinBox()
        self.workers.setRange(0, 256)
        self.workers.setSpecialValueText("all cores")
        self.neighbours = _spin(
            QSpinBox(), 1, 64, "1 (chain)",
            "Sections each section is matched to; above 1 all sections are placed at once by a robust "
            "global least-squares solve over all pairs instead of chaining neighbour maps",
        )  # fmt: skip
        self.neighbours.setValue(NEIGHBOURS)
        self.elastic = QCheckBox("elastic refinement (smooth per-section warp)")
        self.elastic.setToolTip(
            "After the alignment, a smooth displacement per section toward its neighbours, for sections "
            "distorted by cutting; slower"
        )
        self.elastic_auto = QCheckBox("elastic: auto (only where the sections are measured distorted)")
        self.elastic_auto.setToolTip(
            "Measure whether the sections are distorted (the neighbour pairs' residuals through every "
            "section point opposite ways) and run the elastic refinement only there; the reading is in the "
            "report's metrics (distortion)"
        )
        self.elastic_auto.setChecked(DEFAULT_ELASTIC == "auto")
        self.elastic_auto.toggled.connect(self._elastic_enabled)
        self.elastic_solver = _choice(
            ELASTIC_SOLVERS,
            ELASTIC_SOLVER,
            "joint: the fields' affine part solved for all sections at once from dense flows (errors do not "
            "add up along the stack; for distorted sections; the default); local: each section toward the "
            "median of its neighbours alone (better with 1 neighbour: the chain cannot join the joint solve)",
        )
        self.elastic_solver.setEnabled(False)
        self.elastic.toggled.connect(self._elastic_enabled)
        # until the user picks a solver it follows the engine's default: "local" with the chain
        self._solver_chosen = False
        self.elastic_solver.activated.connect(self._choose_solver)
        self.elastic_landmarks = QCheckBox("joint: place by the mitochondria (landmarks)")
        self.elastic_landmarks.setToolTip(
            "With the joint solver and masks: each flow pair's rotation and translation from the "
            "mitochondria regions (default); distorted stacks gain, drifting ones lose a little"
        )
        self.elastic_landmarks.setChecked(True)  # the engine's default with the joint solver (session 19)
        self.elastic_landmarks.setEnabled(False)
        self.elastic_solver.currentTextChanged.connect(self._landmarks_enabled)
        self.elastic.toggled.connect(self._landmarks_enabled)
        self.elastic_auto.toggled.connect(self._landmarks_enabled)
        self.global_model = QComboBox()
        self.global_model.addItems(GLOBAL_MODELS)
        self.global_model.setCurrentText(GLOBAL_MODEL)
        self.drift_prior = _spin(
            QDoubleSpinBox(), 0.0, 1000.0, "off",
            "Global solve: weight of the penalty on each section's scale and shear (holds back slow "
            "accumulated drift, but also resists real slow shape changes)",
        )  # fmt: skip
        self.drift_prior.setSingleStep(0.1)
        self.drift_prior.setValue(DRIFT_PRIOR)
        self.guided_pairs = QCheckBox("guided far pairs (start from the chain; cheaper)")
        self.guided_pairs.setChecked(True)
        self.guided_pairs.setToolTip(
            "Global solve with sub-pixel refinement: a further pair starts from the chain's composed map and "
            "is kept when descriptor matches near it confirm it; off: every further pair is matched in full"
        )
        self.drift_correction = _choice(
            DRIFT_CORRECTIONS,
            DEFAULT_DRIFT_CORRECTION,
            "Slow drift through depth. auto (default): remove the trend of the section positions through "
            "depth only where it is more than the sections' own scatter explains and the rest of the image "
            "(mitochondria left out) moves with it: organelle drift is removed, placement jitter and "
            "FIB-SEM/SBEM stage drift are kept. detrend: always remove it (not for stage drift). none: the "
            "placement as solved. Skipped below 10 sections",
        )
        self.drift_window = _spin(
            _WindowSpinBox(), 0.0, 100_000.0, "whole stack (one line)",
            "Detrend: sigma, in sections, of the Gaussian window of a local line at every section (at least "
            "4; widened where fewer than 10 placed sections lie under it); 0: one straight line",
        )  # fmt: skip
        self.drift_window.setDecimals(1)
        # windows in (0, MIN_WINDOW) are refused by the engine: the arrows step from 0 to the minimum
        # and back (_WindowSpinBox.stepBy), a typed value is raised to it when the edit ends
        self.drift_window.setKeyboardTracking(False)
        self.drift_window.valueChanged.connect(self._snap_window)
        self.organelle_reading = _choice(
            READINGS,
            DEFAULT_READING,
            "Drift correction auto on stacks that get the elastic step: whose drift the trend is, read from "
            "the rest of the image (background) or from each mitochondrion against the tissue right around "
            "it (local), which each section's distortion does not throw off; local-grid: the tissue's step "
            "there taken over a grid of tiles around it (opt-in)",
        )
        self.serial_sections = QPushButton("serial-section TEM settings")
        self.serial_sections.setToolTip(
            "Set what serial-section TEM stacks whose organelles may drift need: the middle section as the "
            "reference and drift correction auto (the default since session 22; advanced options)"
        )
        self.serial_sections.clicked.connect(self.use_serial_sections)
        shown = [("detector", self.detector), ("", self.use_masks), ("descriptor", self.descriptor),
                 ("matcher", self.matcher), ("model", self.model), ("", self.serial_sections)]  # fmt: skip
        folded_rows = [("", self.model_selection), ("", self.refine), ("reference section", self.reference),
                       ("", self.middle), ("RANSAC threshold", self.threshold), ("ratio test", self.ratio),
                       ("keypoints / section", self.max_keypoints), ("threads", self.workers),
                       ("neighbours", self.neighbours), ("global model", self.global_model),
                       ("drift prior", self.drift_prior), ("", self.guided_pairs),
                       ("drift correction", self.drift_correction),
                       ("drift window", self.drift_window), ("organelle reading", self.organelle_reading),
                       ("", self.elastic), ("", self.elastic_auto),
                       ("elastic solver", self.elastic_solver), ("", self.elastic_landmarks)]  # fmt: skip
        for layout, rows in ((form, shown), (more, folded_rows)):
            for label, widget in rows:
                layout.addRow(label, widget)
        advanced = QWidget()
        advanced.setLayout(more)
        self.advanced = folded("advanced options", advanced)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addLayout(form)
        box.addWidget(self.advanced)
        self.detector.currentTextChanged.connect(self._sync)
        self.middle.toggled.connect(self._sync)
        self.neighbours.valueChanged.connect(self._sync)
        self.refine.toggled.connect(self._sync)
        self.drift_correction.currentTextChanged.connect(self._sync)
        self.use_masks.toggled.connect(self._landmarks_enabled)  # the landmarks are the masks' regions
        self._sync()
        self._elastic_enabled()
        self._landmarks_enabled()

    def _sync(self, *_):
        mito = self.detector.currentText() == "mito"
        if mito:
            self.use_masks.setChecked(True)
        self.use_masks.setEnabled(not mito)
        self.reference.setEnabled(not self.middle.isChecked())
        many = self.neighbours.value() > 1
        self.global_model.setEnabled(many)
        self.drift_prior.setEnabled(many)
        self.guided_pairs.setEnabled(many and self.refine.isChecked())  # guided pairs need the refinement
        if not self._solver_chosen:
            self.elastic_solver.setCurrentText(default_solver(many))
        self.drift_window.setEnabled(self.drift_correction.currentText() != "none")
        self.organelle_reading.setEnabled(self.drift_correction.currentText() == "auto")

    def _choose_solver(self, *_):
        self._solver_chosen = True

    def _elastic_on(self) -> bool:
        """Whether the elastic step may run (on, or auto)."""
        return self.elastic_auto.isChecked() or self.elastic.isChecked()

    def _elastic_enabled(self, *_):
        self.elastic.setEnabled(not self.elastic_auto.isChecked())  # auto decides
        self.elastic_solver.setEnabled(self._elastic_on())

    def _landmarks_enabled(self, *_):
        self.elastic_landmarks.setEnabled(
            self._elastic_on() and self.elastic_solver.currentText() == "joint" and self.use_masks.isChecked()
        )

    def use_serial_sections(self, *_):
        """The fields set as :data:`~napari_nephi.engines.mito.detrend.SERIAL_SECTIONS` says."""
        self.middle.setChecked(SERIAL_SECTIONS["reference"] == "middle")
        self.drift_correction.setCurrentText(SERIAL_SECTIONS["drift_correction"])

    def _snap_window(self, v: float):
        if 0 < v < MIN_WINDOW:  # typed (the arrows never land there): raised to the minimum
            self.drift_window.setValue(MIN_WINDOW)  # emits again with the raised value

    def values(self) -> dict:
        return {
            "detector": self.detector.currentText(),
            "descriptor": self.descriptor.currentText(),
            "matcher": self.matcher.currentText(),
            "model": self.model.currentText(),
            "model_selection": self.model_selection.isChecked(),
            "refine": self.refine.isChecked(),
            "use_masks": self.use_masks.isChecked(),
            "reference": (
                "middle"
                if self.middle.isChecked()
                else "auto"
                if self.reference.value() < 0
                else self.reference.value()
            ),
            "ransac_threshold": self.threshold.value(),
            "ratio": self.ratio.value(),
            "max_keypoints": self.max_keypoints.value(),
            "workers": self.workers.value() or None,
            "neighbours": self.neighbours.value(),
            "global_model": self.global_model.currentText(),
            "drift_prior": self.drift_prior.value(),
            "guided_pairs": self.guided_pairs.isChecked(),
            "drift_correction": self.drift_correction.currentText(),
            "drift_window": self.drift_window.value()
            if self.drift_correction.currentText() != "none"
            else 0.0,
            "elastic": "auto" if self.elastic_auto.isChecked() else self.elastic.isChecked(),
            "elastic_solver": self.elastic_solver.currentText(),
            "elastic_landmarks": self.elastic_landmarks.isEnabled() and self.elastic_landmarks.isChecked(),
            "organelle_reading": self.organelle_reading.currentText(),
        }


class _WindowSpinBox(QDoubleSpinBox):
    """The drift window: its arrows jump between 0 ("whole stack") and ``MIN_WINDOW``."""

    def stepBy(self, steps: int) -> None:
        target = self.value() + steps * self.singleStep()
        if 0 < target < MIN_WINDOW:
            target = MIN_WINDOW if steps > 0 else 0.0
        self.setValue(target)


def _choice(items, current: str, tip: str) -> QComboBox:
    """A combo box of ``items`` showing ``current``, with a tooltip."""
    box = QComboBox()
    box.addItems(items)
    box.setCurrentText(current)
    box.setToolTip(tip)
    return box


def _spin(box, low, high, special: str, tip: str):
    """``box`` (a QSpinBox or QDoubleSpinBox) from ``low`` to ``high``, at ``low`` shown as ``special``."""
    box.setRange(low, high)
    box.setValue(low)
    box.setSpecialValueText(special)
    box.setToolTip(tip)
    return box


class ReportTable(QTableWidget):
    """One row per section; failed pairs highlighted, identity fallbacks in red."""

    FAILED = QColor(255, 220, 150)
    IDENTITY = QColor(255, 170, 170)

    def __init__(self, parent=None):
        super().__init__(0, len(COLUMNS), parent)
        self.setHorizontalHeaderLabels([title for _, title in COLUMNS])
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QTableWidget.NoEditTriggers)
        self.setSelectionBehavior(QTableWidget.SelectRows)
        self.setMinimumHeight(140)

    def clear_rows(self, n: int) -> None:
        self.clearContents()
        self.setRowCount(n)

    def set_row(self, row: dict) -> None:
        k = int(row["section"])
        if k >= self.rowCount():
            self.setRowCount(k + 1)
        for c, (key, _) in enumerate(COLUMNS):
            v = row.get(key)
            if v is None:
                text = ""
            elif isinstance(v, bool):
                text = "yes" if v else ""
            elif isinstance(v, float):
                text = f"{v:.2f}"
            else:
                text = str(v)
            item = QTableWidgetItem(text)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
            if row.get("fallback") == "identity":
                item.setBackground(QBrush(self.IDENTITY))
            elif row.get("failed"):
                item.setBackground(QBrush(self.FAILED))
            tip = row.get("tried")
            if tip:
                item.setToolTip("tried: " + "; ".join(tip))
            self.setItem(k, c, item)

    def set_rows(self, rows: list) -> None:
        self.clear_rows(len(rows))
        for r in rows:
            self.set_row(r)

    def column_values(self, key: str) -> list[str]:
        c = [k for k, _ in COLUMNS].index(key)
        return [self.item(r, c).text() if self.item(r, c) else "" for r in range(self.rowCount())]


class InliersPlot(CurvePlot):
    """RANSAC inliers per section; failed sections as red dots, the reference as a blue one."""

    def __init__(self, parent=None):
        super().__init__("section", "RANSAC inliers per section (red: failed pair, blue: reference)", parent)
        self.setMinimumHeight(100)
        self.failed: set[int] = set()
        self.reference: int | None = None

    def set_data(self, values, failed=(), reference: int | None = None) -> None:
        self.failed = {int(k) for k in failed}
        self.reference = reference
        markers = {k: QColor(220, 50, 50) for k in self.failed}
        if reference is not None:
            markers[int(reference)] = QColor(60, 110, 220)
        self.set_values(values, markers)
