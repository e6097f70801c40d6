"""A dependency-free line plot for loss curves and per-section counts."""

from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QWidget

LINE = QColor(60, 160, 90)


class CurvePlot(QWidget):
    """Plots ``values`` as a polyline; ``markers`` maps an index to a dot colour."""

    def __init__(self, xlabel: str = "step", tooltip: str = "", parent=None):
        super().__init__(parent)
        self.xlabel = xlabel
        self.values: list[float] = []
        self.markers: dict[int, QColor] = {}
        self.setMinimumHeight(90)
        self.setToolTip(tooltip)

    def set_values(self, values, markers: dict | None = None) -> None:
        self.values = [float(v) for v in values]
        self.markers = dict(markers or {})
        self.update()

    def append(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def clear(self) -> None:
        self.set_values([])

    def paintEvent(self, event):  # noqa: N802 (Qt name)
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        pal = self.palette()
        p.fillRect(self.rect(), pal.base())
        text = pal.text().color()
        left, right, top, bottom = 46, 8, 8, 18
        area = QRectF(left, top, max(1, self.width() - left - right), max(1, self.height() - top - bottom))
        p.setPen(QPen(text, 1))
        p.drawRect(area)
        n = len(self.values)
        p.drawText(
            QRectF(left, area.bottom() + 2, area.width(), 14), int(Qt.AlignCenter), f"{self.xlabel} (n = {n})"
        )
        if n == 0:
            p.end()
            return
        lo, hi = min(self.values), max(self.values)
        lo = min(lo, 0.0) if lo >= 0 and hi > 0 and lo / hi < 0.2 else lo
        span = hi - lo if hi > lo else 1.0
        p.drawText(QRectF(0, top - 6, left - 4, 14), int(Qt.AlignRight), f"{hi:.3g}")
        p.drawText(QRectF(0, area.bottom() - 8, left - 4, 14), int(Qt.AlignRight), f"{lo:.3g}")

        def pt(i, v):
            x = area.left() + area.width() * (i / (n - 1) if n > 1 else 0.5)
            return QPointF(x, area.bottom() - area.height() * (v - lo) / span)

        path = QPainterPath(pt(0, self.values[0]))
        for i, v in enumerate(self.values[1:], start=1):
            path.lineTo(pt(i, v))
        p.setPen(QPen(LINE, 2))
        p.drawPath(path)
        p.setPen(Qt.NoPen)
        for i, colour in sorted(self.markers.items()):
            if 0 <= i < n:
                p.setBrush(QColor(colour))
                p.drawEllipse(pt(i, self.values[i]), 3.5, 3.5)
        p.end()
