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
    #: A run driven through :meth:`drive` is over: its results are in, or it failed or was cancelled.
    done = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._state = RunState.IDLE
        self._runner = None
        self._results_in = False
        self._handlers: dict = {}

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

    def drive(self, runner, finished, failed, cancelled, *, progressed=None, stopped=None) -> None:
        """Follow ``runner``'s signals through the run states; :attr:`done` says when a run is over.

        ``finished(result)`` is called in ADDING_RESULTS (a result that comes after Cancel goes to
        ``cancelled()`` instead); it calls :meth:`results_in` once its layers are in. ``failed(message)``
        and ``cancelled()`` report; ``stopped()`` (optional) cleans up after a failed or cancelled run,
        just before IDLE. The state goes back to IDLE, and :attr:`done` is emitted, only once the
        worker thread has ended too.
        """
        self._runner = runner
        self._handlers = {"finished": finished, "cancelled": cancelled, "stopped": stopped}
        if progressed is not None:
            runner.progressed.connect(progressed)
        runner.finished.connect(self._on_finished)
        runner.failed.connect(failed)
        runner.cancelled.connect(cancelled)
        runner.stopped.connect(self._on_stopped)

    def start(self) -> None:
        """A driven run starts: RUNNING, no results yet."""
        self._results_in = False
        self.to(RunState.RUNNING)

    def results_in(self) -> None:
        """The finished run's results are in the viewer: IDLE once the worker thread has ended."""
        self._results_in = True
        self._maybe_idle()

    def _on_finished(self, result) -> None:
        if self.is_(RunState.CANCELLING):  # it ended before it saw the Cancel: drop it
            self._handlers["cancelled"]()
            return
        self.to(RunState.ADDING_RESULTS)
        self._handlers["finished"](result)

    def _maybe_idle(self) -> None:
        if self.is_(RunState.ADDING_RESULTS) and self._results_in and not self._runner.busy:
            self.to(RunState.IDLE)
            self.done.emit()

    def _on_stopped(self) -> None:
        if self.is_(RunState.RUNNING, RunState.CANCELLING):  # failed or cancelled
            if self._handlers["stopped"] is not None:
                self._handlers["stopped"]()
            self.to(RunState.IDLE)
            self.done.emit()
        else:
            self._maybe_idle()

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
