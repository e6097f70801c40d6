"""The run state of a dock widget: one enum, one transition function, one signal."""

from __future__ import annotations

from enum import Enum

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QWidget


class RunState(Enum):
    """Where a widget's run is. Only :class:`RunStateMachine` changes it."""

    IDLE = "idle"  # nothing running: Run is enabled
    RUNNING = "running"  # a run is on (its worker may start a turn later): Cancel is enabled
    CANCELLING = "cancelling"  # Cancel was clicked; waiting for the worker to stop
    ADDING_RESULTS = "adding results"  # the worker returned; its layers are being put in the viewer


#: The states each state may move to.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.IDLE: frozenset({RunState.RUNNING}),
    RunState.RUNNING: frozenset({RunState.CANCELLING, RunState.ADDING_RESULTS, RunState.IDLE}),
    RunState.CANCELLING: frozenset({RunState.IDLE}),
    RunState.ADDING_RESULTS: frozenset({RunState.IDLE}),
}


class RunStateMachine(QObject):
    """Holds a :class:`RunState`; :meth:`to` is the only way to change it and emits :attr:`changed`."""

    changed = Signal(object, object)  # (old RunState, new RunState)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._state = RunState.IDLE

    @property
    def state(self) -> RunState:
        return self._state

    def is_(self, *states: RunState) -> bool:
        """Whether the current state is one of ``states``."""
        return self._state in states

    def can(self, new: RunState) -> bool:
        """Whether :meth:`to` may move to ``new`` now."""
        return new in TRANSITIONS[self._state]

    def to(self, new: RunState) -> None:
        """Move to ``new``; a move :data:`TRANSITIONS` does not allow is a bug and raises RuntimeError."""
        if not self.can(new):
            raise RuntimeError(f"A widget's run cannot go from {self._state.value} to {new.value}.")
        old, self._state = self._state, new
        self.changed.emit(old, new)

    def cancel(self, runner, status=None) -> None:
        """Cancel: a running job moves to CANCELLING, ``status`` (a label) says so, the runner stops."""
        if self.is_(RunState.RUNNING):
            self.to(RunState.CANCELLING)
            if status is not None:
                status.setText("Cancelling…")
            runner.cancel()


class RunControls(QWidget):
    """Run and Cancel buttons that follow a :class:`RunStateMachine`.

    Run is enabled only when idle, Cancel only while running. The buttons' ``clicked`` signals are
    the widget's to connect.
    """

    def __init__(self, machine: RunStateMachine, parent=None):
        super().__init__(parent)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        machine.changed.connect(self._follow)
        self._follow(None, machine.state)

    def _follow(self, _old, new: RunState) -> None:
        self.run_button.setEnabled(new is RunState.IDLE)
        self.cancel_button.setEnabled(new is RunState.RUNNING)
