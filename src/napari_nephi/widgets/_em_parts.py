"""Parts of the EM stack alignment widget: options, the report table and the inliers plot."""

from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QBrush, QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..engines.mito.features import DESCRIPTORS, DETECTORS, MATCHERS, MODELS

#: (report key, column title) of the report table.
COLUMNS = (
    ("section", "section"),
    ("neighbour", "to"),
    ("keypoints", "keypoints"),
    ("matches", "matches"),
    ("inliers", "inliers"),
    ("reprojection_error", "error px"),
    ("model", "model"),
    ("failed", "failed"),
    ("fallback", "fallback"),
)


class EMOptions(QWidget):
    """Alignment options as keyword arguments of ``napari_nephi.engines.mito.align_stack``."""

    def __init__(self, parent=None):
        super().__init__(parent)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
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
        self.use_masks = QCheckBox("restrict keypoints to the masks")
        self.middle = QCheckBox("middle section")
        self.reference = QSpinBox()
        self.reference.setRange(0, 1_000_000)
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
        form.addRow("detector", self.detector)
        form.addRow("", self.use_masks)
        form.addRow("descriptor", self.descriptor)
        form.addRow("matcher", self.matcher)
        form.addRow("model", self.model)
        form.addRow("", self.model_selection)
        form.addRow("reference section", self.reference)
        form.addRow("", self.middle)
        form.addRow("RANSAC threshold", self.threshold)
        form.addRow("ratio test", self.ratio)
        form.addRow("keypoints / section", self.max_keypoints)
        form.addRow("threads", self.workers)
        self.detector.currentTextChanged.connect(self._sync)
        self.middle.toggled.connect(self._sync)
        self._sync()

    def _sync(self, *_):
        mito = self.detector.currentText() == "mito"
        if mito:
            self.use_masks.setChecked(True)
        self.use_masks.setEnabled(not mito)
        self.reference.setEnabled(not self.middle.isChecked())

    def values(self) -> dict:
        return {
            "detector": self.detector.currentText(),
            "descriptor": self.descriptor.currentText(),
            "matcher": self.matcher.currentText(),
            "model": self.model.currentText(),
            "model_selection": self.model_selection.isChecked(),
            "use_masks": self.use_masks.isChecked(),
            "reference": "middle" if self.middle.isChecked() else self.reference.value(),
            "ransac_threshold": self.threshold.value(),
            "ratio": self.ratio.value(),
            "max_keypoints": self.max_keypoints.value(),
            "workers": self.workers.value() or None,
        }


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


class InliersPlot(QWidget):
    """RANSAC inliers per section as a polyline; failed sections as red dots. No dependencies."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.values: list[float] = []
        self.failed: set[int] = set()
        self.reference: int | None = None
        self.setMinimumHeight(100)
        self.setToolTip("RANSAC inliers per section (red: failed pair, blue: reference)")

    def set_data(self, values, failed=(), reference: int | None = None) -> None:
        self.values = [float(v) for v in values]
        self.failed = {int(k) for k in failed}
        self.reference = reference
        self.update()

    def paintEvent(self, event):  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        p.fillRect(self.rect(), pal.base())
        text = pal.text().color()
        left, right, top, bottom = 34, 8, 8, 18
        area = QRectF(left, top, max(1, self.width() - left - right), max(1, self.height() - top - bottom))
        p.setPen(QPen(text, 1))
        p.drawRect(area)
        vmax = max(self.values) if self.values else 0.0
        p.drawText(QRectF(0, top - 6, left - 4, 14), int(Qt.AlignRight), f"{vmax:.0f}")
        p.drawText(QRectF(0, area.bottom() - 8, left - 4, 14), int(Qt.AlignRight), "0")
        n = len(self.values)
        label = QRectF(left, area.bottom() + 2, area.width(), 14)
        p.drawText(label, int(Qt.AlignCenter), f"section (n = {n})")
        if n == 0:
            p.end()
            return
        scale = vmax if vmax > 0 else 1.0

        def pt(i, v):
            x = area.left() + (area.width() * (i / (n - 1) if n > 1 else 0.5))
            return QPointF(x, area.bottom() - area.height() * v / scale)

        path = QPainterPath(pt(0, self.values[0]))
        for i, v in enumerate(self.values[1:], start=1):
            path.lineTo(pt(i, v))
        p.setPen(QPen(QColor(60, 160, 90), 2))
        p.drawPath(path)
        for k in sorted(self.failed):
            if 0 <= k < n:
                p.setPen(Qt.NoPen)
                p.setBrush(QColor(220, 50, 50))
                p.drawEllipse(pt(k, self.values[k]), 3.5, 3.5)
        if self.reference is not None and 0 <= self.reference < n:
            p.setBrush(QColor(60, 110, 220))
            p.drawEllipse(pt(self.reference, self.values[self.reference]), 3.5, 3.5)
        p.end()
