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
    """Holds a :class:`RunState`; :meth:`to` is the only way to change it and emits :attr:`changed`.

    A widget may drive several runners (the register widget: its registrations, "Apply saved
    transform" and "Save transform") through one machine: one state, so one job at a time and one
    set of buttons. :meth:`start` binds the runner whose job holds the state (:attr:`job`); the
    signals of every other driven runner are ignored until that job is over, so a late signal of one
    job never moves the state of another.
    """

    changed = Signal(object, object)  # (old RunState, new RunState)
    #: A job driven through :meth:`drive` is over: its results are in, or it failed or was cancelled.
    done = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._state = RunState.IDLE
        self._jobs: dict = {}  # driven runner -> its handlers
        self._runner = None  # the runner whose job holds the state; None when no driven job is on
        self._results_in = False

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def job(self):
        """The runner whose job holds the state (bound by :meth:`start`), or None."""
        return self._runner

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
        if new is RunState.IDLE:  # no job holds an idle state (also when it is moved there by hand)
            self._runner = None
        self.changed.emit(old, new)

    def drive(
        self,
        runner,
        finished,
        failed,
        cancelled,
        *,
        progressed=None,
        stopped=None,
        done=None,
        cancellable=True,
    ) -> None:
        """Follow ``runner``'s signals through the run states while its job holds the state.

        ``finished(result)`` is called in ADDING_RESULTS (a result that comes after Cancel goes to
        ``cancelled()`` instead); it calls :meth:`results_in` once its layers are in. ``failed(message)``
        and ``cancelled()`` report; ``stopped()`` (optional) cleans up after a failed or cancelled job,
        just before IDLE; ``done()`` (optional) is called for every end of the job, just after IDLE,
        before :attr:`done` is emitted. The state goes back to IDLE only once the worker thread has
        ended too. Each runner is driven once. A job that is not ``cancellable`` (a save, whose files
        are written to their end) ignores :meth:`cancel`, and :class:`RunControls` keeps its Cancel
        button disabled.
        """
        if runner in self._jobs:
            raise RuntimeError("This runner is driven already.")
        self._jobs[runner] = {
            "finished": finished, "failed": failed, "cancelled": cancelled,
            "progressed": progressed, "stopped": stopped, "done": done,
            "cancellable": bool(cancellable), "relay": _Relay(self, runner),
        }  # fmt: skip

    def start(self, runner=None) -> None:
        """``runner``'s job starts (default: the only driven runner): RUNNING, held by that job."""
        if runner is None:
            if len(self._jobs) > 1:
                raise RuntimeError("Several runners are driven; say which one's job starts.")
            runner = next(iter(self._jobs), None)
        if not self.can(RunState.RUNNING):
            self.to(RunState.RUNNING)  # raises, and binds nothing
        self._runner, self._results_in = runner, False
        self.to(RunState.RUNNING)

    @property
    def cancellable(self) -> bool:
        """Whether :meth:`cancel` would stop the job that holds the state (True when no driven job does)."""
        return self._runner is None or self._jobs[self._runner]["cancellable"]

    def results_in(self) -> None:
        """The finished job's results are in the viewer: IDLE once its worker thread has ended."""
        self._results_in = True
        self._maybe_idle()

    def not_started(self) -> None:
        """The job's worker never started (Cancel came first): report it cancelled, then IDLE."""
        self._relay(self._runner, "cancelled")
        self._on_stopped(self._runner)

    def cancel(self, runner=None, status=None) -> None:
        """Cancel: a running job moves to CANCELLING, ``status`` (a label) says so, its runner stops.

        ``runner``: the runner to stop (default: the one whose job holds the state). A job driven
        with ``cancellable=False`` is left to run.
        """
        if self.is_(RunState.RUNNING) and self.cancellable:
            self.to(RunState.CANCELLING)
            if status is not None:
                status.setText("Cancelling…")
            runner = self._runner if runner is None else runner
            if runner is not None:
                runner.cancel()

    def _relay(self, runner, name: str, *args) -> None:
        handler = self._jobs[runner][name] if runner is not None else None
        if runner is self._runner and handler is not None:
            handler(*args)

    def _on_finished(self, runner, result) -> None:
        if runner is not self._runner:
            return
        if self.is_(RunState.CANCELLING):  # it ended before it saw the Cancel: drop it
            self._jobs[runner]["cancelled"]()
            return
        self.to(RunState.ADDING_RESULTS)
        self._jobs[runner]["finished"](result)

    def _maybe_idle(self) -> None:
        runner = self._runner
        if (
            self.is_(RunState.ADDING_RESULTS)
            and self._results_in
            and not (runner is not None and runner.busy)
        ):
            self._idle()

    def _on_stopped(self, runner) -> None:
        if runner is not self._runner:
            return
        if self.is_(RunState.RUNNING, RunState.CANCELLING):  # failed or cancelled
            self._relay(runner, "stopped")
            self._idle()
        else:
            self._maybe_idle()

    def _idle(self) -> None:
        runner = self._runner
        self.to(RunState.IDLE)
        done = self._jobs[runner]["done"] if runner is not None else None
        if done is not None:
            done()
        self.done.emit()


class _Relay(QObject):
    """Passes one driven runner's signals to its machine, naming the runner.

    A QObject (a child of the machine) rather than a lambda: Qt drops the signals it has not
    delivered yet when it is deleted with the widget, as it did when the widget received them.
    """

    def __init__(self, machine: RunStateMachine, runner):
        super().__init__(machine)
        self.machine, self.runner = machine, runner
        runner.progressed.connect(self.progressed)
        runner.finished.connect(self.finished)
        runner.failed.connect(self.failed)
        runner.cancelled.connect(self.cancelled)
        runner.stopped.connect(self.stopped)

    def progressed(self, event) -> None:
        self.machine._relay(self.runner, "progressed", event)

    def finished(self, result) -> None:
        self.machine._on_finished(self.runner, result)

    def failed(self, message) -> None:
        self.machine._relay(self.runner, "failed", message)

    def cancelled(self) -> None:
        self.machine._relay(self.runner, "cancelled")

    def stopped(self) -> None:
        self.machine._on_stopped(self.runner)


class RunControls(QWidget):
    """Run and Cancel buttons that follow a :class:`RunStateMachine`.

    Run is enabled only when idle, Cancel only while a job that can be cancelled is running. The
    buttons' ``clicked`` signals are the widget's to connect.
    """

    def __init__(self, machine: RunStateMachine, parent=None):
        super().__init__(parent)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        self._machine = machine
        machine.changed.connect(self._follow)
        self._follow(None, machine.state)

    def _follow(self, _old, new: RunState) -> None:
        self.run_button.setEnabled(new is RunState.IDLE)
        self.cancel_button.setEnabled(new is RunState.RUNNING and self._machine.cancellable)
