"""A dock widget's body: scrolls when the dock is shorter than its content."""

from __future__ import annotations

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

#: The most height a dock widget asks for, in pixels: three of them docked fit on a screen.
MAX_HEIGHT = 900

#: The height a dock widget can be squeezed to; its content then scrolls.
MIN_HEIGHT = 200


class ScrollPanel(QScrollArea):
    """Holds ``content``; asks for its height up to :data:`MAX_HEIGHT` and scrolls below that."""

    def __init__(self, content: QWidget, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(content)

    def _width(self) -> int:
        return self.widget().minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt name)
        return QSize(self._width(), min(self.widget().sizeHint().height(), MAX_HEIGHT))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt name)
        return QSize(self._width(), min(self.widget().minimumSizeHint().height(), MIN_HEIGHT))


def scrolling_body(widget: QWidget) -> QVBoxLayout:
    """Give ``widget`` a scrolling body; returns the body's layout to fill."""
    content = QWidget()
    body = QVBoxLayout(content)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    widget.panel = ScrollPanel(content)
    outer.addWidget(widget.panel)
    return body
