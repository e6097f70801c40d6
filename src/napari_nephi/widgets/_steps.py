"""Spread GUI work over turns of the event loop, with timers owned by a widget."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from qtpy.QtCore import QObject, QTimer, Signal

#: Pause between two steps, in milliseconds. A timer (not a zero-delay call, which Qt runs before
#: pending timers and input) lets the event loop draw the canvas and answer the user between two
#: steps.
STEP_MS = 15


class StepQueue(QObject):
    """Runs queued callables one per turn of the event loop, :data:`STEP_MS` apart.

    The timer is a child of this object, which is meant to be a child of a widget: once the widget
    is deleted (its viewer closed) no queued step runs.
    """

    #: Emitted when the queue has run its last step.
    emptied = Signal()

    def __init__(self, parent: QObject | None = None, interval_ms: int = STEP_MS):
        super().__init__(parent)
        self._steps: deque[Callable[[], object]] = deque()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._next)

    @property
    def busy(self) -> bool:
        """Whether steps are waiting."""
        return bool(self._steps)

    def add(self, steps: Iterable[Callable[[], object]], *, now: bool = False) -> None:
        """Queue ``steps``; with ``now`` the first one runs at once (in this turn)."""
        self._steps.extend(steps)
        if now and self._steps and not self._timer.isActive():
            self._next()
        elif self._steps and not self._timer.isActive():
            self._timer.start()

    def later(self, step: Callable[[], object]) -> None:
        """Run ``step`` in a later turn, after the steps already queued."""
        self.add([step])

    def clear(self) -> None:
        """Drop the steps not run yet."""
        self._steps.clear()
        self._timer.stop()

    def _next(self) -> None:
        if not self._steps:
            return
        step = self._steps.popleft()
        try:
            step()
        finally:
            if self._steps:
                self._timer.start()
            else:
                self.emptied.emit()
