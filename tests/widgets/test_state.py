"""One run-state machine driving several runners (session 44): each runner's signals act on its own job."""

import pytest
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QLabel

from napari_nephi.widgets._state import RunState, RunStateMachine


class FakeRunner(QObject):
    """The signals of a :class:`RegistrationRunner`, emitted by hand; ``busy`` set by hand."""

    progressed = Signal(object)
    finished = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    stopped = Signal()

    def __init__(self):
        super().__init__()
        self.busy = False
        self.cancels = 0

    def cancel(self) -> None:
        self.cancels += 1

    def end(self) -> None:
        """The worker thread ends."""
        self.busy = False
        self.stopped.emit()


class Calls:
    """Records every handler call of one driven runner as ``(name, *args)``."""

    def __init__(self):
        self.seen = []

    def __getattr__(self, name):
        return lambda *args: self.seen.append((name, *args))


def _machine(n=2):
    machine = RunStateMachine()
    runners, calls = [FakeRunner() for _ in range(n)], [Calls() for _ in range(n)]
    for runner, c in zip(runners, calls, strict=True):
        machine.drive(
            runner, c.finished, c.failed, c.cancelled, progressed=c.progressed, stopped=c.stopped, done=c.done
        )
    done = []
    machine.done.connect(lambda: done.append(machine.state))
    return machine, runners, calls, done


def _signal_everything(runner):
    runner.progressed.emit("event")
    runner.finished.emit("result")
    runner.failed.emit("message")
    runner.cancelled.emit()
    runner.stopped.emit()


def test_a_finished_job_goes_to_idle_only_when_its_worker_has_ended_and_the_other_runner_is_ignored(qtbot):
    machine, (a, b), (ca, cb), done = _machine()
    machine.start(a)
    a.busy = True
    assert machine.job is a and machine.is_(RunState.RUNNING)
    _signal_everything(b)  # a late signal of the other job moves nothing
    assert machine.is_(RunState.RUNNING) and cb.seen == [] and done == []
    a.progressed.emit("event")
    a.finished.emit("result")
    assert machine.is_(RunState.ADDING_RESULTS)
    machine.results_in()
    assert machine.is_(RunState.ADDING_RESULTS)  # the worker thread has not ended yet
    a.end()
    assert machine.is_(RunState.IDLE) and machine.job is None
    assert ca.seen == [("progressed", "event"), ("finished", "result"), ("done",)]
    assert done == [RunState.IDLE] and cb.seen == []


def test_a_job_whose_worker_ends_before_its_results_are_in_goes_idle_with_them(qtbot):
    machine, (a, b), (ca, cb), done = _machine()
    machine.start(b)
    b.busy = True
    b.finished.emit(1)
    b.end()
    assert machine.is_(RunState.ADDING_RESULTS) and done == []
    machine.results_in()
    assert machine.is_(RunState.IDLE) and cb.seen == [("finished", 1), ("done",)] and done == [RunState.IDLE]
    assert ca.seen == []


def test_a_failed_job_reports_cleans_up_and_goes_idle(qtbot):
    machine, (a, b), (ca, cb), done = _machine()
    machine.start(b)
    b.busy = True
    b.failed.emit("it broke")
    a.end()  # the other runner's end: ignored
    assert machine.is_(RunState.RUNNING)
    b.end()
    assert cb.seen == [("failed", "it broke"), ("stopped",), ("done",)]
    assert machine.is_(RunState.IDLE) and done == [RunState.IDLE] and ca.seen == []


def test_cancel_stops_the_runner_of_the_job_that_holds_the_state(qtbot):
    machine, (a, b), (ca, cb), done = _machine()
    status = QLabel()
    machine.start(b)
    b.busy = True
    machine.cancel(status=status)
    assert machine.is_(RunState.CANCELLING) and status.text() == "Cancelling…"
    assert (a.cancels, b.cancels) == (0, 1)
    b.finished.emit("too late")  # it ended before it saw the Cancel: dropped
    b.end()
    assert cb.seen == [("cancelled",), ("stopped",), ("done",)]
    assert machine.is_(RunState.IDLE) and done == [RunState.IDLE] and ca.seen == []
    machine.cancel(status=status)  # nothing runs: nothing happens
    assert machine.is_(RunState.IDLE) and (a.cancels, b.cancels) == (0, 1)


def test_a_job_cancelled_before_its_worker_started(qtbot):
    machine, (a, b), (ca, cb), done = _machine()
    machine.start(a)
    machine.cancel()
    machine.not_started()
    assert ca.seen == [("cancelled",), ("stopped",), ("done",)]
    assert machine.is_(RunState.IDLE) and done == [RunState.IDLE] and cb.seen == []


def test_start_binds_one_job_at_a_time(qtbot):
    machine, (a, b), _, _ = _machine()
    with pytest.raises(RuntimeError, match="say which one's job starts"):
        machine.start()
    machine.start(a)
    with pytest.raises(RuntimeError, match="cannot go from running to running"):
        machine.start(b)
    assert machine.job is a  # the refused start bound nothing
    with pytest.raises(RuntimeError, match="driven already"):
        machine.drive(a, print, print, print)
    single, (c,), (cc,), _ = _machine(1)
    single.start()  # one driven runner: its job
    assert single.job is c
    c.end()
    assert cc.seen == [("stopped",), ("done",)] and single.is_(RunState.IDLE)


def test_a_state_moved_by_hand_binds_no_job(qtbot):
    """The EM widget (and tests) move the state with ``to``: no driven runner's signal acts on it."""
    machine, (a, b), (ca, cb), done = _machine()
    machine.to(RunState.RUNNING)
    assert machine.job is None
    _signal_everything(a)
    assert machine.is_(RunState.RUNNING) and ca.seen == [] and done == []
    machine.to(RunState.IDLE)
    machine.start(b)
    machine.to(RunState.IDLE)  # by hand: the job is let go too
    assert machine.job is None
    b.stopped.emit()
    assert cb.seen == [] and done == []


def test_a_job_that_is_not_cancellable_ignores_cancel_and_its_controls_show_no_cancel(qtbot):
    """Review 1 of session 44 (D1): the machine, not the widget, knows that a save is written to its end."""
    from napari_nephi.widgets._state import RunControls

    machine = RunStateMachine()
    a, s = FakeRunner(), FakeRunner()
    ca, cs = Calls(), Calls()
    machine.drive(a, ca.finished, ca.failed, ca.cancelled)
    machine.drive(s, cs.finished, cs.failed, cs.cancelled, done=cs.done, cancellable=False)
    controls = RunControls(machine)
    qtbot.addWidget(controls)
    machine.start(s)
    assert not machine.cancellable and not controls.cancel_button.isEnabled()
    machine.cancel()
    assert machine.is_(RunState.RUNNING) and s.cancels == 0
    s.finished.emit("folder")
    machine.results_in()
    s.end()
    assert cs.seen == [("finished", "folder"), ("done",)] and machine.is_(RunState.IDLE)
    machine.start(a)
    assert machine.cancellable and controls.cancel_button.isEnabled()
